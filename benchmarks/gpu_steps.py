"""The two training steps the GPU benchmark times on the same UNet, and how one configuration is measured.

lora-sweep's step is `benchmarks.cpu_figures.core_step` (micro_batch_loss + scaled backward + scaled_step), run on a
`SyntheticSession`: the attributes `micro_batch_loss` reads, filled by lora-sweep's own set-up code (add_lora,
apply_base_precision, gradient checkpointing, build_optimizer, make_grad_scaler) around random "cached" examples
that live on the CPU, as a real session's do. The bare step is bare_loop.BareLoop on a second build of the UNet.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.bare_loop import BareLoop, Batch
from benchmarks.gpu_model import Shape, synthetic_batch


def bench_config(precision: str, batch: int, rank: int, gradient_checkpointing: bool, optimizer_args: dict):
    """lora-sweep's structured config with the benchmark's values (defaults everywhere else: kohya's l2, no noise
    options, AdamW lr 1e-4, clip 1.0)."""
    from omegaconf import OmegaConf

    from lora_sweep.config import Config

    cfg = OmegaConf.structured(Config)
    cfg.precision.name, cfg.train.batch_size, cfg.network.rank = precision, batch, rank
    cfg.network.alpha = float(rank)
    cfg.train.gradient_checkpointing = gradient_checkpointing
    cfg.optimizer.args = dict(optimizer_args)
    return cfg


@dataclass
class SyntheticSession:
    """What `lora_sweep.training.train.micro_batch_loss` and `core_step` read from a Session, nothing more."""

    cfg: Any
    device: torch.device
    unet: Any
    policy: Any
    prepared: Any
    params: list
    optimizer: Any
    lr_scheduler: Any
    scaler: Any
    alphas_cumprod: torch.Tensor
    noise_scheduler: Any
    vae_scale: float = 0.13025
    one_timestep_per_batch: bool = False
    lora: dict = field(default_factory=dict)

    def text_for(self, examples) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached-embeddings branch of Session.text_for."""
        return (torch.stack([e.context for e in examples]).to(self.device),
                torch.stack([e.pooled for e in examples]).to(self.device))


def lora_sweep_unet(unet, precision_name: str, rank: int, device) -> tuple[Any, list]:
    """lora-sweep's model set-up on `unet`: LoRA on kohya's targets, then base weights in the policy's dtype."""
    from lora_sweep.model.network import UNET_TARGETS, add_lora, lora_parameters
    from lora_sweep.training import precision

    policy = precision.precision_policy(precision_name, torch.device(device).type)
    add_lora(unet, rank=rank, alpha=float(rank), targets=UNET_TARGETS)
    unet.train()
    precision.apply_base_precision(unet, policy)
    return policy, lora_parameters(unet)


def make_session(unet, policy, params: list, shape: Shape, *, batch: int, gradient_checkpointing: bool,
                 optimizer_args: dict, rank: int, device) -> SyntheticSession:
    """A fresh optimizer, scaler and examples around an already prepared UNet (one config of the matrix)."""
    from lora_sweep.model.loading import kohya_noise_scheduler
    from lora_sweep.training import optim, precision

    cfg = bench_config(policy.name, batch, rank, gradient_checkpointing, optimizer_args)
    if gradient_checkpointing:
        precision.enable_gradient_checkpointing(unet)
    else:
        unet.disable_gradient_checkpointing()
    groups = [{"name": "unet", "params": params, "lr": float(cfg.train.lr)}]
    optimizer = optim.build_optimizer(cfg.optimizer.name, groups, lr=float(cfg.train.lr), args=dict(cfg.optimizer.args))
    scheduler = optim.build_lr_scheduler(optimizer, cfg.optimizer.scheduler, warmup_steps=0, total_steps=1000)
    data = synthetic_batch(shape, batch)
    examples = [SimpleNamespace(latents=data["latents"][i], latents_flipped=None, time_ids=data["time_ids"][i],
                                time_ids_flipped=None, context=data["context"][i], pooled=data["pooled"][i])
                for i in range(batch)]
    noise_scheduler = kohya_noise_scheduler()
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    device = torch.device(device)
    return SyntheticSession(cfg=cfg, device=device, unet=unet, policy=policy,
                            prepared=SimpleNamespace(examples=examples), params=params, optimizer=optimizer,
                            lr_scheduler=scheduler, scaler=precision.make_grad_scaler(policy, device.type),
                            alphas_cumprod=noise_scheduler.alphas_cumprod.to(device), noise_scheduler=noise_scheduler,
                            lora=named)


def bare_batch(shape: Shape, batch: int, device, dtype: torch.dtype) -> Batch:
    """The same synthetic inputs as make_session's, stacked on the device the way diffusers' examples feed them
    (latents scaled and in the weight dtype)."""
    data = synthetic_batch(shape, batch)
    return Batch(latents=(data["latents"] * 0.13025).to(device, dtype), context=data["context"].to(device),
                 pooled=data["pooled"].to(device), time_ids=data["time_ids"].to(device))


def bare_loop(unet, precision_name: str, rank: int, fused: bool | None = None) -> BareLoop:
    """The diffusers-example equivalent of a lora-sweep precision (base weights cast whole, LoRA fp32)."""
    dtypes = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, torch.bfloat16),
              "fp16": (torch.float16, torch.float16)}
    if precision_name not in dtypes:
        raise ValueError(f"the bare loop has no {precision_name} (diffusers' examples have no fp8 base training)")
    weight_dtype, autocast_dtype = dtypes[precision_name]
    return BareLoop(unet, rank=rank, alpha=float(rank), weight_dtype=weight_dtype, autocast_dtype=autocast_dtype,
                    fused=fused)


def load_lora_state(unet, state: dict[str, torch.Tensor]) -> None:
    """Put the snapshot LoRA values back (each configuration starts from the same LoRA)."""
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if name in state:
                param.copy_(state[name])


def lora_state(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in unet.named_parameters() if "lora_" in n}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], float], device, *, warmup: int, steps: int, seed: int = 0) -> dict:
    """Seeded first step, warm-up, then `steps` timed steps. The seeded loss sequence is the configuration's
    fingerprint: the first loss checks the forward, the later ones the updates. Each step reads its loss on the
    host (as every training loop does for logging), so steps do not overlap."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    started = time.perf_counter()
    first_loss = step()
    first_s = time.perf_counter() - started
    losses = [first_loss] + [step() for _ in range(max(0, warmup - 1))]
    _sync(device)
    started = time.perf_counter()
    losses += [step() for _ in range(steps)]
    _sync(device)
    step_s = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"first_loss": first_loss, "losses": losses, "first_step_s": first_s, "step_s": step_s,
            "peak_mem_bytes": peak, "losses_finite": all(x == x and abs(x) != float("inf") for x in losses)}


def lora_sweep_step(s: SyntheticSession) -> Callable[[], float]:
    from benchmarks.cpu_figures import core_step

    flip_rng, batch = random.Random(0), list(range(len(s.prepared.examples)))
    return lambda: core_step(s, batch, flip_rng)


def bare_step(loop: BareLoop, batch: Batch) -> Callable[[], float]:
    return lambda: float(loop.step(batch))
