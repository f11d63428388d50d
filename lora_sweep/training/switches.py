"""kohya v0.8.7's remaining switches applied to a session: the zero terminal SNR schedule, full fp16/bf16 LoRA, the
U-Net's attention backend and torch.compile, and clip_skip (recorded only). docs/kohya-reference.md "Zero terminal
SNR", "Full fp16 and bf16", "Attention and torch.compile". build_session calls these; the math lives in noise.py,
precision.py and model/attention.py.
"""

from __future__ import annotations

import logging

import torch

from lora_sweep.model import attention
from lora_sweep.training.noise import zero_terminal_snr_alphas_cumprod
from lora_sweep.training.precision import PrecisionPolicy

log = logging.getLogger(__name__)


def training_alphas_cumprod(cfg, scheduler) -> torch.Tensor:
    """The abar that noises the latents and makes v targets: `scheduler`'s (kohya's DDPM schedule), rescaled by
    `noise.zero_terminal_snr_alphas_cumprod` with loss.zero_terminal_snr. Sampling keeps its own schedulers, as
    v0.8.7's does."""
    if not cfg.loss.zero_terminal_snr:
        return scheduler.alphas_cumprod
    if not cfg.model.v_prediction:  # v0.8.7 warns too: an eps model cannot denoise x_T = eps
        log.warning("loss.zero_terminal_snr without model.v_prediction: the training will be unexpected (at t = 999 "
                    "the noisy latent is pure noise); kohya v0.8.7 warns the same")
    return zero_terminal_snr_alphas_cumprod(scheduler.betas.float())


def full_precision_dtype(cfg, policy: PrecisionPolicy) -> torch.dtype | None:
    """The dtype precision.full_fp16 / full_bf16 put the LoRA in (v0.8.7's weight_dtype), None when both are off."""
    p = cfg.precision
    return policy.latent_dtype if p.full_fp16 or p.full_bf16 else None


def cast_lora(params: list[torch.nn.Parameter], dtype: torch.dtype | None, optimizer=None) -> None:
    """v0.8.7's `network.to(weight_dtype)` after the optimizer is made: the same Parameters, their values cast, so
    their grads and the optimizer's state (made at the first step) are in `dtype` too. Warns when `optimizer`'s
    eps rounds to 0 in fp16 (Adam's update of a zero gradient is then 0/0, as in v0.8.7)."""
    if dtype is None:
        return
    for param in params:
        param.data = param.data.to(dtype)  # at rest, outside any graph: the optimizer keeps the same Parameter
    eps = min((g["eps"] for g in getattr(optimizer, "param_groups", []) if isinstance(g.get("eps"), float)),
              default=None)
    if dtype == torch.float16 and eps is not None and torch.tensor(eps, dtype=dtype).item() == 0:
        log.warning("precision.full_fp16 with optimizer eps %g: fp16 rounds it to 0, so lora_down's first update "
                    "(its gradient is 0 while lora_up is 0) is 0/0 = NaN, as in kohya v0.8.7; raise it, e.g. "
                    "optimizer.args.eps=1e-4", eps)


def apply_unet_switches(cfg, unet: torch.nn.Module) -> None:
    """train.sdpa / xformers / mem_eff_attn (precedence as v0.8.7), then train.torch_compile with
    train.dynamo_backend, on the U-Net with its LoRA on the training device; notes model.clip_skip."""
    t = cfg.train
    backend = attention.attention_backend(sdpa=t.sdpa, xformers=t.xformers, mem_eff_attn=t.mem_eff_attn)
    attention.set_attention_backend(unet, backend)
    if t.torch_compile:
        attention.compile_unet(unet, t.dynamo_backend)
        log.info("the U-Net is compiled with torch.compile (backend %s) at its first step", t.dynamo_backend)
    if cfg.model.clip_skip is not None:  # v0.8.7 warns the same
        log.warning("model.clip_skip=%s is only recorded (ss_clip_skip): SDXL's text encoding ignores it, as in "
                    "kohya v0.8.7", cfg.model.clip_skip)
