"""Optimizer factories for the `optimizer` config group, with kohya v0.8.7's rules.

Reference: docs/kohya-reference.md §5 and §6. Each option names the class kohya's `--optimizer_type` loads and
spells out its defaults, so a config shows every value used; `optimizer.args` overrides them (--optimizer_args).
Optimizer libraries (bitsandbytes, prodigyopt, dadaptation) are imported only when an option is built.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from lora_sweep.errors import ConfigError

_ADAM_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class OptimizerOption:
    """import_path "module:Class"; kohya_name: --optimizer_type; adaptive: D-Adaptation/Prodigy (step d*lr,
    lr around 1.0); default_lr: the lr a config for this option starts from.
    """

    import_path: str
    kohya_name: str
    adaptive: bool
    default_lr: float
    defaults: Mapping[str, Any]


def _option(path: str, kohya_name: str, adaptive: bool, default_lr: float, **defaults: Any) -> OptimizerOption:
    return OptimizerOption(path, kohya_name, adaptive, default_lr, MappingProxyType(defaults))


OPTIMIZERS: dict[str, OptimizerOption] = {
    "adamw": _option("torch.optim:AdamW", "AdamW", False, 1e-4, betas=_ADAM_BETAS, eps=1e-8, weight_decay=0.01),
    "adamw8bit": _option(
        "bitsandbytes.optim:AdamW8bit", "AdamW8bit", False, 1e-4,
        betas=_ADAM_BETAS, eps=1e-8, weight_decay=0.01, min_8bit_size=4096,
    ),
    "lion8bit": _option(
        "bitsandbytes.optim:Lion8bit", "Lion8bit", False, 1e-4, betas=(0.9, 0.99), weight_decay=0.0, min_8bit_size=4096
    ),
    "prodigy": _option(
        "prodigyopt:Prodigy", "Prodigy", True, 1.0,
        betas=_ADAM_BETAS, beta3=None, eps=1e-8, weight_decay=0.0, decouple=True, use_bias_correction=False,
        safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=math.inf,
    ),
    "dadapt_adam_preprint": _option(  # kohya's "DAdaptation" / "DAdaptAdamPreprint"
        "dadaptation.experimental:DAdaptAdamPreprint", "DAdaptAdamPreprint", True, 1.0,
        betas=_ADAM_BETAS, eps=1e-8, weight_decay=0.0, decouple=False, d0=1e-6, growth_rate=math.inf,
    ),
    "dadapt_adam": _option(
        "dadaptation:DAdaptAdam", "DAdaptAdam", True, 1.0,
        betas=_ADAM_BETAS, eps=1e-8, weight_decay=0.0, decouple=False, use_bias_correction=False, d0=1e-6,
        growth_rate=math.inf,
    ),
}
_KOHYA_ALIASES = {"dadaptation": "dadapt_adam_preprint"} | {o.kohya_name.lower(): n for n, o in OPTIMIZERS.items()}

LOW_ADAPTIVE_LR = 0.1  # kohya warns at or below this for D-Adaptation/Prodigy ("set learning rate around 1.0").
# kohya checks group 0's lr; here the largest group lr, so a frozen (lr 0) text-encoder group raises no false alarm.


def resolve_optimizer_name(name: str) -> str:
    """Our option name for `name`; kohya's --optimizer_type spellings ("Prodigy", "DAdaptation", ...) also work."""
    key = name.strip().lower()
    if key in OPTIMIZERS:
        return key
    if key in _KOHYA_ALIASES:
        return _KOHYA_ALIASES[key]
    raise ConfigError(f"optimizer={name!r} is not an optimizer option; choose one of {sorted(OPTIMIZERS)}.")


def _load_class(import_path: str) -> type[torch.optim.Optimizer]:
    module_name, class_name = import_path.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _construct(optimizer_class: type, param_groups: list[dict], lr: float, kwargs: Mapping[str, Any]):
    """`optimizer_class(param_groups, lr=lr, **kwargs)`, its prints kept off the console (prodigyopt prints "Using
    decoupled weight decay"; the run's optimizer line says every argument)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return optimizer_class(param_groups, lr=lr, **kwargs)


def _normalized_args(args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Sequences (YAML lists, OmegaConf ListConfig) become tuples: optimizers expect betas=(b1, b2)."""
    normalized = {}
    for key, value in (args or {}).items():
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            value = tuple(value)
        normalized[str(key)] = value
    return normalized


def _accepted_names(optimizer_class: type) -> list[str] | None:
    """The keyword arguments `optimizer_class` takes besides params and lr; None if it takes any (**kwargs)."""
    signature = inspect.signature(optimizer_class.__init__)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return [p for p in signature.parameters if p not in ("self", "params", "lr")]


def _argument_name_problems(name: str, optimizer_class: type, kwargs: Mapping[str, Any]) -> list[str]:
    """One line per `optimizer.args` key the class does not take, with the closest real argument (difflib)."""
    import difflib

    problems = [f"optimizer.args.{key} is not allowed: the learning rate is train.lr, the params come from the "
                f"LoRA network." for key in ("lr", "params") if key in kwargs]
    accepted = _accepted_names(optimizer_class)
    if accepted is None:
        return problems
    for key in kwargs:
        if key not in accepted and key not in ("lr", "params"):
            near = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
            problems.append(f"optimizer.args.{key} is not an argument of {optimizer_class.__name__} (optimizer={name})."
                            + (f" Did you mean optimizer.args.{near[0]}?" if near else "") + f" Accepted: {accepted}.")
    return problems


def _check_accepted(name: str, optimizer_class: type, kwargs: Mapping[str, Any]) -> None:
    problems = _argument_name_problems(name, optimizer_class, kwargs)
    if problems:
        raise ConfigError("\n".join(problems))


def _shown(value: Any) -> str:
    """A value as the user typed it on the command line: sequences as [a, b]."""
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _refusal(optimizer_class: type, kwargs: Mapping[str, Any], lr: float, *,
             step: bool = False) -> BaseException | None:
    """The exception `optimizer_class` raises when built with `kwargs` on a one-element dummy (and, with `step`, on one
    step), else None. Any exception type counts: AdamW raises IndexError for one beta, Prodigy TypeError in step().
    """
    dummy = torch.nn.Parameter(torch.zeros(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = _construct(optimizer_class, [{"params": [dummy]}], lr, kwargs)
            if step:
                dummy.grad = torch.ones(1)
                optimizer.step()
    except Exception as error:  # noqa: BLE001  (the class's own validation: whatever it raises is the answer)
        return error
    return None


def _steps_on_cpu(optimizer_class: type, defaults: Mapping[str, Any], lr: float) -> bool:
    """Whether the class can step a CPU dummy with its defaults (bitsandbytes may need CUDA); if not, values are
    checked by building only.
    """
    return _refusal(optimizer_class, defaults, lr, step=True) is None


def optimizer_arg_problems(name: str, args: Mapping[str, Any] | None) -> list[str]:
    """Every problem of `optimizer.args` for option `name`, without a model, one paragraph each naming the setting.

    Unknown arguments (with the closest real one), sequences of the wrong length, and values the class refuses when
    built (and stepped, where it can step on CPU) on a dummy parameter at the default lr, each changed argument tried
    alone to name the one at fault. Imports the optimizer's library. Raises ConfigError for an unknown name.
    """
    option_name = resolve_optimizer_name(name)
    option = OPTIMIZERS[option_name]
    optimizer_class = _load_class(option.import_path)
    label = f"{optimizer_class.__name__} (optimizer={option_name})"
    given = _normalized_args(args)
    problems = _argument_name_problems(option_name, optimizer_class, {**option.defaults, **given})
    accepted = _accepted_names(optimizer_class)
    given = {k: v for k, v in given.items() if k not in ("lr", "params") and (accepted is None or k in accepted)}
    for key, value in list(given.items()):
        default = option.defaults.get(key)
        if isinstance(default, tuple) and not (isinstance(value, tuple) and len(value) == len(default)):
            problems.append(f"optimizer.args.{key}={_shown(value)}: {label} takes {len(default)} values, like its "
                            f"default {_shown(default)}.")
            del given[key]
    kwargs = {**option.defaults, **given}
    step = _steps_on_cpu(optimizer_class, option.defaults, option.default_lr)
    if _refusal(optimizer_class, kwargs, option.default_lr, step=step) is None:
        return problems
    changed = [key for key in given if key not in option.defaults or given[key] != option.defaults[key]]
    refused = []
    for key in changed:
        error = _refusal(optimizer_class, {**option.defaults, key: given[key]}, option.default_lr, step=step)
        if error is not None:
            default = f" Its default is {_shown(option.defaults[key])}." if key in option.defaults else ""
            refused.append(f"optimizer.args.{key}={_shown(given[key])}: {label} refuses it "
                           f"({type(error).__name__}: {str(error).rstrip('.')}).{default}")
    if not refused:  # each alone is accepted, together they are not
        error = _refusal(optimizer_class, kwargs, option.default_lr, step=step)
        together = ", ".join(f"optimizer.args.{k}={_shown(given[k])}" for k in changed) or "its defaults"
        reason = f"{type(error).__name__}: {str(error).rstrip('.')}"
        refused.append(f"{together}: {label} refuses these together ({reason}).")
    return problems + refused


def _group_lrs(param_groups: list[dict], lr: float) -> list[tuple[str, float]]:
    return [(str(g.get("name", f"group {i}")), float(g.get("lr", lr))) for i, g in enumerate(param_groups)]


def _check_lrs(name: str, option: OptimizerOption, group_lrs: list[tuple[str, float]], lr: float) -> None:
    if lr < 0:
        raise ConfigError(f"train.lr={lr} is negative; a learning rate must be >= 0.")
    for group_name, group_lr in group_lrs:
        if group_lr < 0:
            raise ConfigError(f"the learning rate of param group {group_name!r} is {group_lr}; it must be >= 0.")
    if not option.adaptive:
        return
    if lr <= 0:
        raise ConfigError(f"train.lr={lr}: {name} needs a positive lr (it multiplies the adapted step d); use 1.0.")
    nonzero = {group_lr for _, group_lr in group_lrs if group_lr != 0}
    if len(nonzero) > 1:
        listing = ", ".join(f"{n}: lr={v}" for n, v in group_lrs)
        raise ConfigError(
            f"optimizer={name}: it shares one adapted step size d across param groups and fails at its first step "
            f"when groups have "
            f"different non-zero learning rates ({listing}). Set train.text_encoder_lr=null (the text encoders then "
            f"use train.lr, {lr}), or train.text_encoder_lr=0 to freeze the text-encoder LoRA."
        )
    effective_lr = max(nonzero, default=lr)  # these optimizers scale d by the largest group lr
    if effective_lr <= LOW_ADAPTIVE_LR:
        warnings.warn(
            f"learning rate {effective_lr} is too low for {name}: D-Adaptation and Prodigy find the step size d "
            f"themselves and the lr only scales it; set train.lr around 1.0 (kohya's advice).",
            UserWarning,
            stacklevel=3,
        )


def check_learning_rates(name: str, *, lr: float, text_encoder_lr: float | None, train_text_encoder: bool) -> None:
    """`build_optimizer`'s learning-rate checks on the groups `build_session` will make, for the pre-flight.

    Raises ConfigError (e.g. D-Adaptation/Prodigy with different non-zero group lrs); warns when an adaptive lr is low.
    """
    option_name = resolve_optimizer_name(name)
    groups = [{"name": "unet", "lr": lr}]
    if train_text_encoder:
        groups.insert(0, {"name": "text_encoder", "lr": lr if text_encoder_lr is None else text_encoder_lr})
    _check_lrs(option_name, OPTIMIZERS[option_name], _group_lrs(groups, lr), float(lr))


def build_optimizer(
    name: str, param_groups: list[dict], *, lr: float, args: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The optimizer `name` over `param_groups` ("params", optional "lr" and "name"), defaults updated by `args`.

    A group without "lr" uses `lr`, as in kohya.
    """
    option_name = resolve_optimizer_name(name)
    option = OPTIMIZERS[option_name]
    kwargs = {**option.defaults, **_normalized_args(args)}
    _check_lrs(option_name, option, _group_lrs(param_groups, lr), float(lr))
    optimizer_class = _load_class(option.import_path)
    _check_accepted(option_name, optimizer_class, kwargs)
    try:
        optimizer = _construct(optimizer_class, param_groups, lr, kwargs)
    except (ValueError, TypeError, IndexError) as err:
        raise ConfigError(f"{optimizer_class.__name__} ({option_name}) rejected its arguments {kwargs}: {err}") from err
    optimizer.lora_sweep_kwargs = dict(kwargs)  # for optimizer_description; torch keeps no record of what was passed
    return optimizer


def optimizer_description(optimizer: torch.optim.Optimizer) -> str:
    """kohya's `ss_optimizer` metadata form "module.Class(k=v,...)", listing every keyword passed but lr.

    kohya lists only the user's --optimizer_args; here the option defaults are explicit.
    """
    optimizer_class = type(optimizer)
    kwargs = getattr(optimizer, "lora_sweep_kwargs", None)
    if kwargs is None:
        kwargs = {k: v for k, v in optimizer.defaults.items() if k != "lr"}
    arguments = ",".join(f"{k}={v}" for k, v in kwargs.items())
    qualified = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    return f"{qualified}({arguments})" if arguments else qualified


def _reporting_group(optimizer: torch.optim.Optimizer, group: int | None) -> dict:
    """The group whose lr is "the" lr: `group`, or the first with a non-zero base lr.

    kohya reads group 0; skipping a zero-lr text-encoder group picks the same group.
    """
    groups = optimizer.param_groups
    if group is not None:
        return groups[group]
    return next((g for g in groups if g.get("initial_lr", g["lr"]) != 0), groups[0])


def current_lr(optimizer: torch.optim.Optimizer, group: int | None = None) -> float:
    """The lr now in effect (after the scheduler's multiplier) of the reporting group."""
    return float(_reporting_group(optimizer, group)["lr"])


def d_times_lr(optimizer: torch.optim.Optimizer, group: int | None = None) -> float | None:
    """d*lr, the effective step of D-Adaptation/Prodigy (d is shared by all groups); None for other optimizers."""
    chosen = _reporting_group(optimizer, group)
    if "d" not in chosen:
        return None
    return float(chosen["d"]) * float(chosen["lr"])


def lr_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """train/lr, and d*lr as `train/d_lr` for adaptive optimizers (MLflow names may not contain '*').

    Call it after optimizer.step() and lr_scheduler.step(), as kohya logs them.
    """
    metrics = {"train/lr": current_lr(optimizer)}
    step = d_times_lr(optimizer)
    if step is not None:
        metrics["train/d_lr"] = step
    return metrics
