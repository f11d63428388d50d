"""The speed options the GPU benchmark tries on top of lora-sweep's bf16 baseline, one at a time.

Each must leave the result unchanged (the benchmark compares the seeded loss sequence with the baseline's) and is
kept as a lora-sweep option only if it wins. One row is not an option but a cost: loop_checks adds what
`lora_sweep.training.train.train` does per step beyond the core step (the loss checked for NaN/Inf, and the gradients
through the total norm that clipping uses too: two host syncs), to show what that costs on a fast GPU. How each
option maps onto lora-sweep today:
- fused_adamw: `optimizer.args.fused=true` already passes through to torch.optim.AdamW;
- tf32: a global torch setting (what stays fp32 under autocast is elementwise, so little is expected);
- channels_last: the UNet's 4-D weights in NHWC for cuDNN's convolutions;
- compile: torch.compile of the repeated transformer blocks (diffusers' compile_repeated_blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OPTIONS = ("loop_checks", "tf32", "fused_adamw", "channels_last", "compile")
_TF32_DEFAULTS: list = []


def _tf32_knobs() -> list[tuple[object, str, object]]:
    """(object, attribute, TF32 value) for matmuls and cuDNN convolutions: torch's newer fp32_precision settings
    where they exist (mixing them with the legacy allow_tf32 flags is refused), else the legacy flags."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None and hasattr(conv, "fp32_precision"):
        return [(matmul, "fp32_precision", "tf32"), (conv, "fp32_precision", "tf32")]
    return [(matmul, "allow_tf32", True), (torch.backends.cudnn, "allow_tf32", True)]


def set_tf32(*, on: bool) -> None:
    """TF32 for every fp32 matmul and convolution (on), or torch's defaults back (off: fp32 matmuls exact, cuDNN
    convolutions TF32). A no-op without CUDA."""
    if not torch.cuda.is_available():
        return
    knobs = _tf32_knobs()
    if not _TF32_DEFAULTS:
        _TF32_DEFAULTS.extend(getattr(obj, name) for obj, name, _ in knobs)
    for (obj, name, value), default in zip(knobs, _TF32_DEFAULTS, strict=True):
        setattr(obj, name, value if on else default)


def compile_unet(unet) -> None:
    """Regional compilation: each repeated transformer block compiled once and reused, in a fraction of the time
    the whole UNet takes to compile."""
    if hasattr(unet, "compile_repeated_blocks"):
        unet.compile_repeated_blocks()
    else:
        unet.compile()


def option_step(option: str, unet, session: Callable[..., object], batch: int,
                lora: dict[str, torch.Tensor]) -> Callable[[], float]:
    """Apply `option` and return the step to time. `session(batch, ckpt, optimizer_args)` builds a fresh
    SyntheticSession on `unet`; `lora` is the starting LoRA every configuration shares."""
    from benchmarks.gpu_steps import lora_sweep_step

    if option == "loop_checks":
        return checked_step(session(batch, False))
    if option == "fused_adamw":
        return lora_sweep_step(session(batch, False, {"fused": True}))
    if option == "tf32":
        set_tf32(on=True)
        return lora_sweep_step(session(batch, False))
    if option == "channels_last":
        unet.to(memory_format=torch.channels_last)
        return lora_sweep_step(session(batch, False))
    if option == "compile":
        compile_unet(unet)
        return lora_sweep_step(session(batch, False))
    raise ValueError(f"unknown option {option!r}; known: {', '.join(OPTIONS)}")


def undo_option(option: str, unet) -> None:
    """Back to the baseline for the next option (compile is run last and not undone)."""
    set_tf32(on=False)
    if option == "channels_last":
        unet.to(memory_format=torch.contiguous_format)


def checked_step(s) -> Callable[[], float]:
    """core_step plus train()'s per-step checks: `torch.isfinite(loss)` before backward and `grads_finite` before
    the update (lora_sweep.training.train), as the loop runs them with train.on_nan=stop."""
    import random

    from lora_sweep.training import precision
    from lora_sweep.training.train import grads_finite, micro_batch_loss

    flip_rng, batch = random.Random(0), list(range(len(s.prepared.examples)))

    def step() -> float:
        terms = micro_batch_loss(s, batch, flip_rng)
        if not torch.isfinite(terms.loss):
            raise FloatingPointError(f"loss {float(terms.loss)}")
        s.scaler.scale(terms.loss / s.cfg.train.grad_accum).backward()
        norm = None if s.scaler.is_enabled() else precision.grad_total_norm(s.params)  # as train() does
        if grads_finite(s, 1, 0, None, norm) and precision.scaled_step(s.scaler, s.optimizer, s.params,
                                                                       s.cfg.train.max_grad_norm, norm):
            s.lr_scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        return float(terms.loss.detach())

    return step
