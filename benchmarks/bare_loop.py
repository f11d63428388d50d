"""The yardstick: a bare diffusers + peft + torch SDXL LoRA training step, the way diffusers' training examples write
it, with no lora-sweep code at all.

Why it exists: "trainer overhead" (figure 1 of `make bench`) and the GPU comparison need a loop that does the same
work as lora-sweep's step (same UNet, LoRA targets, rank, alpha, optimizer, clipping, precision, batch) and nothing
else, so the ratio of the two step times is what lora-sweep's structure costs. It takes already-encoded inputs,
like a run with cached latents and text embeddings. The kohya target set is written out here on purpose rather than
imported: the smoke test checks that both sides wrap the same modules.
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

    weight_dtype: the frozen base weights' dtype (the examples' `unet.to(weight_dtype)`); autocast_dtype: the
    mixed-precision dtype or None for fp32; fp16 adds a GradScaler. LoRA params are kept in fp32.
    """

    def __init__(self, unet, *, rank: int = 4, alpha: float = 1.0, lr: float = 1e-4, max_grad_norm: float = 1.0,
                 weight_dtype: torch.dtype = torch.float32, autocast_dtype: torch.dtype | None = None,
                 fused: bool | None = None) -> None:
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        self.unet, self.max_grad_norm, self.autocast_dtype = unet, max_grad_norm, autocast_dtype
        unet.requires_grad_(False)
        if weight_dtype != torch.float32:
            unet.to(dtype=weight_dtype)
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


def copy_lora_weights(source: torch.nn.Module, target: torch.nn.Module) -> int:
    """Give `target`'s LoRA tensors the values of `source`'s (same PEFT names); returns how many were copied.

    Both sides then start from the same LoRA init, so their losses can be compared step by step."""
    wanted = {n: p for n, p in source.named_parameters() if "lora_" in n}
    copied = 0
    with torch.no_grad():
        for name, param in target.named_parameters():
            if "lora_" in name:
                param.copy_(wanted[name].to(param.device, param.dtype))
                copied += 1
    if copied != len(wanted):
        raise ValueError(f"LoRA tensors differ: {len(wanted)} in source, {copied} copied into target")
    return copied


def wrapped_modules(unet: torch.nn.Module) -> set[str]:
    """Names of the modules that carry a LoRA (to check two UNets got the same target set)."""
    return {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A" in n}
