"""LR schedules of the `optimizer` config group (optimizer.scheduler, warmup_steps), as kohya v0.8.7 builds them.

v0.8.7's `get_scheduler_fix` calls diffusers' schedule functions; so does this module (their formulas, written out
with kohya's quirks, are in docs/kohya-reference.md §6 and docs/options.md#schedules). Each is a LambdaLR stepped
once per optimizer update: the update with index k (0-based) uses lr x lambda(k).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from lora_sweep.errors import ConfigError, ConfigErrors

log = logging.getLogger(__name__)

SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "piecewise_constant",
              "polynomial", "adafactor")
# optimizer.lr_scheduler_args each schedule takes (diffusers 0.25's arguments that kohya does not pass itself)
SCHEDULE_ARGS: dict[str, tuple[str, ...]] = {"cosine": ("num_cycles",), "polynomial": ("lr_end",),
                                             "piecewise_constant": ("step_rules",)}
NO_WARMUP = ("constant", "adafactor")  # v0.8.7 raises "does not require num_warmup_steps" for these
POLYNOMIAL_LR_END = 1e-7  # diffusers' default lr_end


def kohya_scheduler_name(optimizer: torch.optim.Optimizer, scheduler: str) -> str:
    """v0.8.7's --lr_scheduler once the optimizer is built: Adafactor with relative_step=True rewrites any choice to
    "adafactor:<lr>" (docs/kohya-reference.md §6.4); `ss_lr_scheduler` records that name."""
    initial_lr = getattr(optimizer, "lora_sweep_adafactor_lr", None)
    return scheduler if initial_lr is None else adafactor_name(initial_lr)


def adafactor_name(lr: float) -> str:
    """v0.8.7's rewritten --lr_scheduler, f"adafactor:{args.learning_rate}" (a float: "adafactor:0.0001")."""
    return f"adafactor:{float(lr)}"


def _steps(count: int) -> str:
    return f"{count} step" if count == 1 else f"{count} steps"


def warmup_problem(warmup_steps: Any, max_steps: int) -> str | None:
    """Why optimizer.warmup_steps is not a count of optimizer steps (v0.8.7's is an int), or None."""
    if isinstance(warmup_steps, int) and not isinstance(warmup_steps, bool) and warmup_steps >= 0:
        return None
    if isinstance(warmup_steps, float) and 0 < warmup_steps < 1:
        steps = int(warmup_steps * max_steps)  # v0.9.0's conversion of a ratio
        return (f"optimizer.warmup_steps={warmup_steps}: kohya v0.8.7 takes the warmup in optimizer steps only (a "
                f"fraction of the run arrived in v0.9.0); {warmup_steps} of train.max_steps={max_steps} is "
                f"{_steps(steps)}: set optimizer.warmup_steps={steps}.")
    return f"optimizer.warmup_steps={warmup_steps!r}: must be a whole number of optimizer steps >= 0 (e.g. 0 or 100)."


def schedule_problems(scheduler: str, *, effective: str, optimizer_name: str, warmup_steps: int, max_steps: int,
                      lr: float, num_cycles: int, power: float, scheduler_args: Mapping[str, Any]) -> list[str]:
    """Every problem of the `optimizer` group's schedule settings, without building anything.

    `scheduler`: optimizer.scheduler as set; `effective`: the name v0.8.7 uses (`kohya_scheduler_name`; the
    Adafactor rewrite); `lr`: the optimizer's default lr, which polynomial decays from.
    """
    if scheduler not in SCHEDULERS:
        return [f"optimizer.scheduler='{scheduler}' is not a scheduler; choose one of {', '.join(SCHEDULERS)}."]
    problems = []
    rewritten = effective != scheduler
    if scheduler == "adafactor" and optimizer_name != "adafactor":
        problems.append(f"optimizer.scheduler: the adafactor schedule needs optimizer=adafactor (transformers' "
                        f"AdafactorSchedule reads Adafactor's own step size; v0.8.7 asserts this), not "
                        f"optimizer={optimizer_name}.")
    elif scheduler == "adafactor" and not rewritten:
        problems.append("optimizer.scheduler: the adafactor schedule needs Adafactor's relative_step=True (v0.8.7 "
                        "fails with an IndexError otherwise); with relative_step=False choose another schedule, e.g. "
                        "constant_with_warmup.")
    if warmup_steps and effective.split(":")[0] in NO_WARMUP:
        why = (f" (optimizer=adafactor with relative_step=True replaces optimizer.scheduler={scheduler} with it, as "
               f"v0.8.7 does)" if rewritten and scheduler != "adafactor" else "")
        problems.append(f"optimizer.warmup_steps={warmup_steps}: the {effective} schedule takes no warmup{why}; v0.8.7 "
                        f"raises 'does not require num_warmup_steps'. Set optimizer.warmup_steps=0"
                        + (" or use constant_with_warmup." if effective == "constant" else "."))
    problems += _argument_problems(scheduler, scheduler_args)
    if scheduler == "polynomial":
        problems += _polynomial_problems(warmup_steps, max_steps, lr, power, scheduler_args)
    if scheduler == "piecewise_constant" and isinstance(scheduler_args.get("step_rules"), str):
        problems += _step_rules_problems(scheduler_args["step_rules"])
    return problems


def _argument_problems(scheduler: str, scheduler_args: Mapping[str, Any]) -> list[str]:
    accepted = SCHEDULE_ARGS.get(scheduler, ())
    problems = [f"optimizer.lr_scheduler_args.{key}: the {scheduler} schedule of v0.8.7 (diffusers 0.25) takes "
                + (f"only {', '.join(accepted)} there." if accepted else "no arguments there.")
                + (" The warmup and length come from optimizer.warmup_steps and train.max_steps." if key in (
                    "num_warmup_steps", "num_training_steps") else "")
                for key in scheduler_args if key not in accepted]
    if scheduler == "piecewise_constant" and not isinstance(scheduler_args.get("step_rules"), str):
        problems.append("optimizer.lr_scheduler_args.step_rules: piecewise_constant needs its rules as a string "
                        "'multiplier:steps,...,last multiplier', e.g. '1:10,0.1:20,0.01' (lr x1 for steps 0-9, x0.1 "
                        "for 10-19, then x0.01).")
    for key in set(accepted) & set(scheduler_args) - {"step_rules"}:
        if not _is_number(scheduler_args[key]):
            problems.append(f"optimizer.lr_scheduler_args.{key}={scheduler_args[key]!r}: must be a number.")
    return problems


def _polynomial_problems(warmup_steps: int, max_steps: int, lr: float, power: float,
                         scheduler_args: Mapping[str, Any]) -> list[str]:
    problems = []
    lr_end = scheduler_args.get("lr_end", POLYNOMIAL_LR_END)
    if _is_number(lr_end) and not lr > lr_end:
        problems.append(f"optimizer.scheduler=polynomial decays train.lr={lr} to lr_end={lr_end}, so train.lr must "
                        f"be larger (v0.8.7 raises ValueError); set optimizer.lr_scheduler_args.lr_end below it.")
    if warmup_steps == max_steps:
        problems.append(f"optimizer.warmup_steps={warmup_steps} equals train.max_steps: polynomial then divides by "
                        f"zero decay steps at the last update (v0.8.7 fails there); use fewer warmup steps.")
    if power < 0:
        problems.append(f"optimizer.lr_scheduler_power={power}: polynomial raises 0 to this power at the last update "
                        f"(a ZeroDivisionError in v0.8.7); use a power >= 0.")
    return problems


def _step_rules_problems(step_rules: str) -> list[str]:
    from diffusers.optimization import get_piecewise_constant_schedule

    try:
        get_piecewise_constant_schedule(_dummy_optimizer(1.0), step_rules)
    except ValueError as error:
        return [f"optimizer.lr_scheduler_args.step_rules={step_rules!r}: not 'multiplier:steps,...,last multiplier' "
                f"(e.g. '1:10,0.1:20,0.01'): {error}."]
    return []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dummy_optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _schedule_kwargs(name: str, *, warmup_steps: int, total_steps: int, num_cycles: int, power: float,
                     scheduler_args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments v0.8.7's get_scheduler_fix passes to diffusers' schedule function `name`."""
    kwargs = dict(scheduler_args)
    if name in ("constant", "piecewise_constant"):
        return kwargs  # piecewise_constant ignores the warmup, as in v0.8.7
    kwargs["num_warmup_steps"] = warmup_steps
    if name == "constant_with_warmup":
        return kwargs
    kwargs["num_training_steps"] = total_steps  # max_train_steps x 1 process: updates, not micro-batches
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles  # plain cosine keeps diffusers' 0.5: --lr_scheduler_num_cycles is unused
    if name == "polynomial":
        kwargs["power"] = power
    return kwargs


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, *, warmup_steps: int, total_steps: int, num_cycles: int = 1,
    power: float = 1.0, scheduler_args: Mapping[str, Any] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR v0.8.7 builds for optimizer.scheduler=`name` (rewritten for Adafactor with relative_step=True,
    with a log line); advanced once per optimizer step taken (not on fp16-skipped ones).

    The pre-flight checks the values (`schedule_problems`); this refuses only a name or a length it cannot build.
    """
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    scheduler_args = dict(scheduler_args or {})
    effective = kohya_scheduler_name(optimizer, name)
    if name not in SCHEDULERS:
        raise ConfigError(f"optimizer.scheduler={name!r} is not a scheduler; choose one of {list(SCHEDULERS)}.")
    if warmup_steps < 0 or total_steps < 1:
        raise ConfigError(f"optimizer.warmup_steps={warmup_steps} must be >= 0 and the run must have >= 1 optimizer "
                          f"step (got {total_steps}).")
    if effective.split(":")[0] in NO_WARMUP and warmup_steps:
        raise ConfigError(f"optimizer.scheduler={effective} does not warm up but optimizer.warmup_steps="
                          f"{warmup_steps} (kohya refuses this too); use constant_with_warmup or warmup_steps=0.")
    if effective != name:
        if name != "adafactor":
            log.info("Adafactor with relative_step=True: the LR schedule is %s (Adafactor finds its own step size; the "
                     "schedule only reports it), not optimizer.scheduler=%s, as in kohya v0.8.7", effective, name)
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, float(effective.split(":")[1]))
    if name == "adafactor":
        raise ConfigError("optimizer.scheduler: the adafactor schedule needs optimizer=adafactor with "
                          "relative_step=True.")
    if name == "piecewise_constant" and warmup_steps:
        log.warning("optimizer.scheduler=piecewise_constant ignores optimizer.warmup_steps=%d, as kohya v0.8.7 does",
                    warmup_steps)
    elif warmup_steps >= total_steps:  # v0.8.7 trains so silently
        log.warning("optimizer.warmup_steps=%d is not below the run's %s: the lr is still warming up when the run "
                    "ends (at %d/%d of train.lr=%s) and never reaches train.lr; lower optimizer.warmup_steps",
                    warmup_steps, _steps(total_steps), total_steps, warmup_steps, optimizer.defaults.get("lr"))
    kwargs = _schedule_kwargs(name, warmup_steps=warmup_steps, total_steps=total_steps, num_cycles=num_cycles,
                              power=power, scheduler_args=scheduler_args)
    try:
        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)](optimizer, **kwargs)
    except (TypeError, ValueError) as error:
        problems = schedule_problems(name, effective=name, optimizer_name="", warmup_steps=warmup_steps,
                                     max_steps=total_steps, lr=optimizer.defaults["lr"], num_cycles=num_cycles,
                                     power=power, scheduler_args=scheduler_args)
        raise ConfigErrors(problems or [f"optimizer.scheduler={name}: {error}"]) from error


def lr_multiplier(schedule: str, step: int, *, warmup_steps: int, total_steps: int, num_cycles: int = 1,
                  power: float = 1.0, scheduler_args: Mapping[str, Any] | None = None, lr: float = 1.0) -> float:
    """lambda(step) of `schedule`: the factor on a group's lr after `step` optimizer updates (the update with
    0-based index `step` uses it). `lr`: the optimizer's default lr (polynomial's lr_init)."""
    scheduler = build_lr_scheduler(_dummy_optimizer(lr), schedule, warmup_steps=warmup_steps,
                                   total_steps=total_steps, num_cycles=num_cycles, power=power,
                                   scheduler_args=scheduler_args)
    return float(scheduler.lr_lambdas[0](step))

