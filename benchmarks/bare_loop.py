"""The yardstick: a bare diffusers + peft + torch SDXL LoRA training step, as diffusers' training examples write it,
with no lora-sweep code at all.

The trainer-overhead figures divide lora-sweep's step time by this loop's, doing the same work (same UNet weights,
LoRA targets, rank, alpha, AdamW, clipping, precision, inputs), so the ratio is what lora-sweep's structure costs.
It takes encoded inputs, like a run with cached latents and text embeddings. It is an independent copy of the
step's math on purpose: the kohya target set is written out here, not imported, and tests/test_benchmarks.py checks
that it computes lora-sweep's loss and update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# kohya's SDXL LoRA targets: every Linear inside the UNet's transformer blocks (attn q/k/v/out, proj_in/out, ff).
KOHYA_UNET_TARGETS = (r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn1|attn2)\."
                      r"(to_q|to_k|to_v|to_out\.0)|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))")


@dataclass
class Batch:
    """Encoded inputs: latents already multiplied by the VAE scale, text context, pooled embedding, SDXL time ids."""

    latents: torch.Tensor  # (B, 4, h, w)
    context: torch.Tensor  # (B, 77, 2048)
    pooled: torch.Tensor  # (B, 1280)
    time_ids: torch.Tensor  # (B, 6)


class BareLoop:
    """unet + LoRA + AdamW + DDPM noise + MSE, as a diffusers example trains it.

    The frozen weights are used in the dtype they come in; autocast_dtype is the mixed-precision dtype (None: fp32),
    fp16 adds a GradScaler. LoRA params are kept in fp32.
    """

    def __init__(self, unet, *, rank: int, alpha: float, lr: float, max_grad_norm: float,
                 autocast_dtype: torch.dtype | None = None, fused: bool | None = None) -> None:
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        self.unet, self.max_grad_norm, self.autocast_dtype = unet, max_grad_norm, autocast_dtype
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                    target_modules=KOHYA_UNET_TARGETS))
        self.params = [p for p in unet.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        self.device_type = next(unet.parameters()).device.type
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                                           fused=fused)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=autocast_dtype == torch.float16)
        self.noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             num_train_timesteps=1000, clip_sample=False)
        unet.train()

    def step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on `batch`; returns the loss (detached; reading it is the caller's one sync)."""
        latents = batch.latents
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            pred = self.unet(noisy, timesteps, batch.context,
                             added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids}).sample
        loss = F.mse_loss(pred.float(), noise.float())
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def lora_values(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the LoRA tensors of a PEFT-wrapped UNet, by name."""
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def load_lora_values(unet: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Give `unet`'s LoRA tensors `values` (same PEFT names, every one of them)."""
    own = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    if own.keys() != values.keys():
        raise ValueError(f"LoRA tensors differ: {len(values)} given, {len(own)} in the UNet")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(values[name])


def wrapped_modules(unet: torch.nn.Module) -> set[str]:
    """Names of the modules that carry a LoRA (to check two UNets got the same target set)."""
    return {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A" in n}


def shared_bare_loop(s) -> BareLoop:
    """A BareLoop beside lora-sweep's session `s`: a second UNet module tree holding s's own frozen tensors (no copy,
    so one UNet is in memory), set up from s's config, starting from s's LoRA values."""
    from diffusers import UNet2DConditionModel

    cfg = s.cfg
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(s.unet.config)
    frozen = {name.replace(".base_layer.", "."): tensor for name, tensor in
              [*s.unet.named_parameters(), *s.unet.named_buffers()] if "lora_" not in name}
    unet.load_state_dict(frozen, strict=True, assign=True)
    dtype = next(iter(frozen.values())).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the bare loop has no {dtype} base weights (diffusers' examples have no fp8 training)")
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    bare = BareLoop(unet, rank=cfg.network.rank, alpha=cfg.network.alpha, lr=float(cfg.train.lr),
                    max_grad_norm=cfg.train.max_grad_norm, autocast_dtype=None if dtype == torch.float32 else dtype,
                    fused=cfg.optimizer.args.get("fused"))
    if wrapped_modules(bare.unet) != wrapped_modules(s.unet):
        raise AssertionError("the bare loop and lora-sweep put LoRA on different modules")
    load_lora_values(bare.unet, lora_values(s.unet))
    return bare
