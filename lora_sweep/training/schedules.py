"""LR schedules of the `optimizer` config group (optimizer.scheduler, warmup_steps), as kohya v0.8.7 builds them.

Reference: docs/kohya-reference.md §6.
"""

from __future__ import annotations

import math

import torch

from lora_sweep.errors import ConfigError

SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")


def lr_multiplier(schedule: str, step: int, *, warmup_steps: int, total_steps: int) -> float:
    """The factor on the base lr after `step` optimizer steps (diffusers' formulas, as kohya).

    Warmup rises linearly from 0; cosine is a half cosine to 0 at total_steps, linear a line to 0.
    """
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    raise ConfigError(f"optimizer.scheduler={schedule!r} is not a scheduler; choose one of {list(SCHEDULERS)}.")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR advanced once per optimizer step taken (not on fp16-skipped ones); steps count optimizer updates."""
    if name not in SCHEDULERS:
        raise ConfigError(f"optimizer.scheduler={name!r} is not a scheduler; choose one of {list(SCHEDULERS)}.")
    if warmup_steps < 0 or total_steps < 1:
        raise ConfigError(f"optimizer.warmup_steps={warmup_steps} must be >= 0 and the run must have >= 1 optimizer "
                          f"step (got {total_steps}).")
    if name == "constant" and warmup_steps != 0:
        raise ConfigError(f"optimizer.scheduler=constant does not warm up but optimizer.warmup_steps={warmup_steps} "
                          f"(kohya refuses this too); use optimizer.scheduler=constant_with_warmup or warmup_steps=0.")

    def multiplier(step: int) -> float:
        return lr_multiplier(name, step, warmup_steps=warmup_steps, total_steps=total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
