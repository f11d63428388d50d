"""Optimizer factories for the `optimizer` config group, with kohya v0.8.7's rules.

Reference: docs/kohya-reference.md §5. Each option names the class kohya's `--optimizer_type` loads and spells out
its defaults, so a config shows every value used; `optimizer.args` overrides them, and `optimizer.optimizer_args`
(kohya's "key=value" strings, read as v0.8.7 reads them) override both. Optimizer libraries (bitsandbytes,
prodigyopt, dadaptation, transformers) are imported only when an option is built.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from lora_sweep.errors import ConfigError, ConfigErrors

log = logging.getLogger(__name__)
_ADAM_BETAS = (0.9, 0.999)
_UNSET = object()


@dataclass(frozen=True)
class OptimizerOption:
    """import_path "module:Class"; kohya_name: --optimizer_type; adaptive: D-Adaptation/Prodigy (step d*lr,
    lr around 1.0); default_lr: the lr a config for this option starts from; defaults: the class's own defaults, as
    the option file spells them; fixed: keywords kohya passes itself (never set by the user); inserted: keywords
    kohya adds to the user's --optimizer_args, so `ss_optimizer` always lists them.
    """

    import_path: str
    kohya_name: str
    adaptive: bool
    default_lr: float
    defaults: Mapping[str, Any]
    fixed: Mapping[str, Any]
    inserted: tuple[str, ...]


def _option(path: str, kohya_name: str, adaptive: bool, default_lr: float, *, fixed: Mapping[str, Any] | None = None,
            inserted: tuple[str, ...] = (), **defaults: Any) -> OptimizerOption:
    return OptimizerOption(path, kohya_name, adaptive, default_lr, MappingProxyType(defaults),
                           MappingProxyType(dict(fixed or {})), inserted)


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
    "adafactor": _option(  # relative_step=True: its own step size, lr unused (docs/kohya-reference.md §5)
        "transformers.optimization:Adafactor", "Adafactor", False, 1e-4, inserted=("relative_step",),
        eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0, scale_parameter=True,
        relative_step=True, warmup_init=False,
    ),
    "sgd_nesterov": _option(  # kohya inserts momentum=0.9 when absent and passes nesterov=True itself
        "torch.optim:SGD", "SGDNesterov", False, 1e-4, fixed={"nesterov": True}, inserted=("momentum",),
        momentum=0.9, dampening=0.0, weight_decay=0.0,
    ),
    "paged_adamw8bit": _option(  # AdamW8bit's math with its state in paged (CUDA unified) memory
        "bitsandbytes.optim:PagedAdamW8bit", "PagedAdamW8bit", False, 1e-4,
        betas=_ADAM_BETAS, eps=1e-8, weight_decay=0.01, min_8bit_size=4096,
    ),
}
_KOHYA_ALIASES = {"dadaptation": "dadapt_adam_preprint"} | {o.kohya_name.lower(): n for n, o in OPTIMIZERS.items()}
# names v0.8.7's --optimizer_type accepts that lora-sweep does not ship, with the class kohya would build
NOT_SHIPPED = {
    "lion": "lion_pytorch.Lion", "sgdnesterov8bit": "bitsandbytes.optim.SGD8bit(nesterov=True)",
    "pagedadamw": "bitsandbytes.optim.PagedAdamW", "pagedadamw32bit": "bitsandbytes.optim.PagedAdamW32bit",
    "pagedlion8bit": "bitsandbytes.optim.PagedLion8bit", "dadaptadagrad": "dadaptation.DAdaptAdaGrad",
    "dadaptadan": "dadaptation.DAdaptAdan", "dadaptadanip": "dadaptation.experimental.DAdaptAdanIP",
    "dadaptlion": "dadaptation.DAdaptLion", "dadaptsgd": "dadaptation.DAdaptSGD",
}

LOW_ADAPTIVE_LR = 0.1  # kohya warns at or below this for D-Adaptation/Prodigy ("set learning rate around 1.0").
# kohya checks group 0's lr; here the largest group lr, so a frozen (lr 0) text-encoder group raises no false alarm.


def not_shipped_class(name: str) -> str | None:
    """The class v0.8.7's --optimizer_type `name` builds where lora-sweep ships no option for it, else None."""
    name = name.strip()
    if name.lower() in NOT_SHIPPED:
        return NOT_SHIPPED[name.lower()]
    if "." in name:
        return name
    if name[:1].isupper() and hasattr(torch.optim, name):
        return f"torch.optim.{name}"
    return None


def resolve_optimizer_name(name: str) -> str:
    """Our option name for `name`; kohya's --optimizer_type spellings ("Prodigy", "DAdaptation", ...) also work.

    A name v0.8.7 accepts but lora-sweep does not ship (Lion, PagedAdamW, torch.optim.<Name>, pkg.mod.Class) is
    refused saying which class kohya would have built.
    """
    key = name.strip().lower()
    if key in OPTIMIZERS:
        return key
    if key in _KOHYA_ALIASES:
        return _KOHYA_ALIASES[key]
    shipped = f"choose one of {sorted(OPTIMIZERS)}."
    kohya_class = not_shipped_class(name)
    if kohya_class is not None:
        raise ConfigError(f"optimizer={name!r}: kohya v0.8.7 would build {kohya_class}, which lora-sweep does not "
                          f"ship (each option is a conf/optimizer file with its defaults and checks); {shipped}")
    raise ConfigError(f"optimizer={name!r} is not an optimizer option; {shipped}")


def parse_kohya_args(items: Sequence[str], field: str) -> dict[str, Any]:
    """kohya v0.8.7's "key=value" list (--optimizer_args, --lr_scheduler_args): exactly one '=' per item, the value
    read by `ast.literal_eval`, so "betas=(0.9,0.99)" is a tuple, "True" a bool, and strings need quotes.

    ConfigErrors naming `field` and each item it cannot read; a later item overrides an earlier one, as in v0.8.7.
    """
    parsed, problems = {}, []
    for item in items:
        parts = str(item).split("=")
        if len(parts) != 2:
            problems.append(f"{field}: {str(item)!r} is not 'key=value' with exactly one '=' (kohya v0.8.7 splits each "
                            f"item on '=').")
            continue
        key, text = parts
        try:
            parsed[key] = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            problems.append(f"{field}: {str(item)!r}: the value {text!r} is not a Python literal, and kohya v0.8.7 "
                            f"reads values with ast.literal_eval: write True, False, None, numbers, tuples such as "
                            f"(0.9,0.99), and strings in quotes ({key}='{text}').")
    if problems:
        raise ConfigErrors(problems)
    return parsed


def _load_class(import_path: str) -> type[torch.optim.Optimizer]:
    module_name, class_name = import_path.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _construct(optimizer_class: type, param_groups: list[dict], lr: float | None, kwargs: Mapping[str, Any]):
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


@dataclass(frozen=True)
class Arguments:
    """An option's keyword arguments as kohya v0.8.7's get_optimizer passes them (besides params, lr and `fixed`).

    given: what the config sets (optimizer.args, then optimizer.optimizer_args over it); kwargs: the option's
    defaults updated by `given`, kohya's rules applied; listed: what `ss_optimizer` lists, in kohya's order (the
    --optimizer_args given, then what kohya inserts); labels: the setting each given key came from.
    """

    given: dict[str, Any]
    kwargs: dict[str, Any]
    listed: dict[str, Any]
    labels: dict[str, str]


def _kohya_rules(option_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """kohya's own changes to the arguments: Adafactor's warmup_init=True forces relative_step=True."""
    if option_name == "adafactor" and not kwargs.get("relative_step") and kwargs.get("warmup_init"):
        return {**kwargs, "relative_step": True}
    return kwargs


def finds_own_step(option_name: str, kwargs: Mapping[str, Any]) -> bool:
    """Adafactor with relative_step=True: it finds its own step size and takes lr=None."""
    return option_name == "adafactor" and bool(kwargs.get("relative_step"))


def optimizer_arguments(name: str, args: Mapping[str, Any] | None = None,
                        optimizer_args: Sequence[str] = ()) -> Arguments:
    """The arguments of option `name` from optimizer.args and optimizer.optimizer_args (kohya's strings).

    A key set away from the option's default in optimizer.args and to another value in optimizer.optimizer_args is
    refused (ConfigErrors), as is a string v0.8.7 cannot read.
    """
    option_name = resolve_optimizer_name(name)
    option = OPTIMIZERS[option_name]
    from_args = _normalized_args(args)
    from_strings = _normalized_args(parse_kohya_args(optimizer_args, "optimizer.optimizer_args"))
    chosen = {k: v for k, v in from_args.items() if option.defaults.get(k, _UNSET) != v}  # not the option file's
    clashes = [f"optimizer.args.{k}={_shown(chosen[k])} and optimizer.optimizer_args {k}={_shown(v)} disagree; set it "
               f"one way." for k, v in from_strings.items() if k in chosen and chosen[k] != v]
    if clashes:
        raise ConfigErrors(clashes)
    given = {**from_args, **from_strings}
    kwargs = _kohya_rules(option_name, {**option.defaults, **given})
    order = [*from_strings, *chosen, *option.inserted]
    listed = {k: kwargs[k] for k in dict.fromkeys(order) if k in kwargs}
    labels = {k: f"optimizer.optimizer_args {k}" if k in from_strings else f"optimizer.args.{k}" for k in given}
    return Arguments(given, kwargs, listed, labels)


def _accepted_names(optimizer_class: type) -> list[str] | None:
    """The keyword arguments `optimizer_class` takes besides params and lr; None if it takes any (**kwargs)."""
    signature = inspect.signature(optimizer_class.__init__)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return [p for p in signature.parameters if p not in ("self", "params", "lr")]


def _argument_name_problems(name: str, optimizer_class: type, arguments: Arguments) -> list[str]:
    """One line per given key the class does not take (with the closest real argument, difflib), or kohya sets."""
    import difflib

    labels, fixed = arguments.labels, OPTIMIZERS[name].fixed
    problems = [f"{labels[key]} is not allowed: the learning rate is train.lr, the params come from the LoRA network."
                for key in ("lr", "params") if key in labels]
    problems += [f"{labels[key]} is not allowed: optimizer={name} always passes {key}={fixed[key]} (kohya's "
                 f"{OPTIMIZERS[name].kohya_name})." for key in fixed if key in labels]
    accepted = _accepted_names(optimizer_class)
    if accepted is None:
        return problems
    for key in arguments.kwargs:
        if key not in accepted and key not in ("lr", "params"):
            near = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
            label = labels.get(key, f"optimizer.args.{key}")
            problems.append(f"{label} is not an argument of {optimizer_class.__name__} (optimizer={name})."
                            + (f" Did you mean {label.removesuffix(key)}{near[0]}?" if near else "")
                            + f" Accepted: {accepted}.")
    return problems


def _shown(value: Any) -> str:
    """A value as the user typed it on the command line: sequences as [a, b]."""
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _refusal(optimizer_class: type, kwargs: Mapping[str, Any], lr: float | None, *,
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


def _other_options_args(option_name: str, args: Mapping[str, Any] | None) -> str | None:
    """The other option whose file's argument names `args` has exactly (`optimizer.name` changed alone), or None."""
    return next((n for n, o in OPTIMIZERS.items() if n != option_name and args and set(o.defaults) == set(args)), None)


def optimizer_arg_problems(name: str, args: Mapping[str, Any] | None,
                           optimizer_args: Sequence[str] = ()) -> list[str]:
    """Every problem of `optimizer.args` and `optimizer.optimizer_args` for option `name`, without a model, one
    paragraph each naming the setting.

    Strings v0.8.7 cannot read, keys set two ways, unknown arguments (with the closest real one), sequences of the
    wrong length, and values the class refuses when built (and stepped, where it can step on CPU: bitsandbytes may
    need CUDA) on a dummy parameter at the default lr, each changed argument tried alone to name the one at fault.
    Imports the optimizer's library. Raises ConfigError for an unknown name.
    """
    option_name = resolve_optimizer_name(name)
    option = OPTIMIZERS[option_name]
    try:
        arguments = optimizer_arguments(option_name, args, optimizer_args)
    except ConfigErrors as error:
        return list(error.problems)
    optimizer_class = _load_class(option.import_path)
    label = f"{optimizer_class.__name__} (optimizer={option_name})"
    problems = _argument_name_problems(option_name, optimizer_class, arguments)
    other = _other_options_args(option_name, args)
    if other and any(" is not an argument of " in p for p in problems):
        return [f"optimizer.name={name}: optimizer.name changes the class only, and optimizer.args are still the "
                f"{other} option's ({', '.join(sorted(args))}), which {optimizer_class.__name__} does not take. "
                f"Choose the option instead: optimizer={option_name} (its conf/optimizer file brings "
                f"{optimizer_class.__name__}'s own arguments)."]
    accepted = _accepted_names(optimizer_class)
    given = {k: v for k, v in arguments.given.items()
             if k not in ("lr", "params", *option.fixed) and (accepted is None or k in accepted)}
    for key, value in list(given.items()):
        default = option.defaults.get(key)
        if isinstance(default, tuple) and not (isinstance(value, tuple) and len(value) == len(default)):
            problems.append(f"{arguments.labels[key]}={_shown(value)}: {label} takes {len(default)} values, like its "
                            f"default {_shown(default)}.")
            del given[key]

    def refusal(changes: Mapping[str, Any], step: bool) -> BaseException | None:
        kwargs = _kohya_rules(option_name, {**option.defaults, **changes})
        lr = None if finds_own_step(option_name, kwargs) else option.default_lr
        return _refusal(optimizer_class, {**kwargs, **option.fixed}, lr, step=step)

    step = refusal({}, step=True) is None  # bitsandbytes may need CUDA to step: then values are checked by building
    if refusal(given, step) is None:
        return problems
    changed = [key for key in given if key not in option.defaults or given[key] != option.defaults[key]]
    refused = []
    for key in changed:
        error = refusal({key: given[key]}, step)
        if error is not None:
            default = f" Its default is {_shown(option.defaults[key])}." if key in option.defaults else ""
            refused.append(f"{arguments.labels[key]}={_shown(given[key])}: {label} refuses it "
                           f"({type(error).__name__}: {str(error).rstrip('.')}).{default}")
    if not refused:  # each alone is accepted, together they are not
        error = refusal(given, step)
        together = ", ".join(f"{arguments.labels[k]}={_shown(given[k])}" for k in changed) or "its defaults"
        reason = f"{type(error).__name__}: {str(error).rstrip('.')}"
        refused.append(f"{together}: {label} refuses these together ({reason}).")
    return problems + refused


def _group_lrs(param_groups: list[dict], lr: float) -> list[tuple[str, float]]:
    return [(str(g.get("name", f"group {i}")), float(g.get("lr", lr))) for i, g in enumerate(param_groups)]


def _check_lrs(name: str, option: OptimizerOption, group_lrs: list[tuple[str, float]], lr: float, *,
               lr_unused: bool = False) -> None:
    if lr < 0:
        raise ConfigError(f"train.lr={lr} is negative; a learning rate must be >= 0.")
    for group_name, group_lr in group_lrs:
        if group_lr < 0:
            raise ConfigError(f"the learning rate of param group {group_name!r} is {group_lr}; it must be >= 0.")
        if group_lr == 0 and lr_unused:
            raise ConfigError(
                f"the learning rate of param group {group_name!r} is 0, but Adafactor with relative_step=True "
                f"ignores learning rates (kohya drops them), so it would train anyway. Leave the text encoders out "
                f"with network.train_text_encoder=false, or set optimizer.args.relative_step=false.")
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


def check_learning_rates(name: str, *, lr: float, text_encoder_lr: float | None, train_text_encoder: bool,
                         args: Mapping[str, Any] | None = None, optimizer_args: Sequence[str] = ()) -> None:
    """`build_optimizer`'s learning-rate checks on the groups `build_session` will make, for the pre-flight.

    Raises ConfigError (e.g. D-Adaptation/Prodigy with different non-zero group lrs); warns when an adaptive lr is low.
    """
    option_name = resolve_optimizer_name(name)
    groups = [{"name": "unet", "lr": lr}]
    if train_text_encoder:
        groups.insert(0, {"name": "text_encoder", "lr": lr if text_encoder_lr is None else text_encoder_lr})
    try:
        relative = finds_own_step(option_name, optimizer_arguments(option_name, args, optimizer_args).kwargs)
    except ConfigError:
        relative = False  # the arguments' own problems are optimizer_arg_problems'
    _check_lrs(option_name, OPTIMIZERS[option_name], _group_lrs(groups, lr), float(lr), lr_unused=relative)


def _log_adafactor(arguments: Arguments, param_groups: list[dict], lr: float) -> None:
    """kohya v0.8.7's messages about Adafactor's arguments and learning rates, in the run's log."""
    if arguments.given.get("relative_step") is False and arguments.kwargs["relative_step"]:
        log.info("Adafactor: relative_step set to True because warmup_init=True, as kohya v0.8.7 does")
    if not arguments.kwargs["relative_step"]:
        return
    if lr != 0:
        log.warning("Adafactor with relative_step=True finds its own step size: train.lr=%s is only the initial lr "
                    "its schedule reports (kohya v0.8.7)", lr)
    if any(g.get("lr", lr) != lr for g in param_groups):
        log.warning("Adafactor with relative_step=True: train.text_encoder_lr is ignored (kohya v0.8.7 drops the "
                    "groups' learning rates)")


def kohya_advice(optimizer: torch.optim.Optimizer, *, scheduler: str, max_grad_norm: float) -> list[str]:
    """kohya v0.8.7's warnings for Adafactor with relative_step=False, logged and returned; [] otherwise."""
    kwargs = getattr(optimizer, "lora_sweep_kwargs", {})
    if type(optimizer).__name__ != "Adafactor" or kwargs.get("relative_step", True):
        return []
    advice = []
    if max_grad_norm != 0:
        advice.append(f"Adafactor: train.max_grad_norm={max_grad_norm} clips gradients; kohya suggests 0")
    if scheduler != "constant_with_warmup":
        advice.append(f"Adafactor: optimizer.scheduler={scheduler}; kohya suggests constant_with_warmup")
    if kwargs.get("clip_threshold", 1.0) != 1.0:
        advice.append(f"Adafactor: clip_threshold={kwargs['clip_threshold']}; kohya suggests 1.0")
    for line in advice:
        log.warning(line)
    return advice


def build_optimizer(name: str, param_groups: list[dict], *, lr: float, args: Mapping[str, Any] | None = None,
                    optimizer_args: Sequence[str] = ()) -> torch.optim.Optimizer:
    """The optimizer `name` over `param_groups` ("params", optional "lr" and "name"), its defaults updated by `args`
    then by kohya's "key=value" `optimizer_args`.

    A group without "lr" uses `lr`, as in kohya. Adafactor with relative_step=True is built as v0.8.7 builds it:
    lr=None and no group lrs (it finds its own step size); `schedules.kohya_scheduler_name` then names its schedule.
    """
    option_name = resolve_optimizer_name(name)
    option = OPTIMIZERS[option_name]
    arguments = optimizer_arguments(option_name, args, optimizer_args)
    relative = finds_own_step(option_name, arguments.kwargs)
    _check_lrs(option_name, option, _group_lrs(param_groups, lr), float(lr), lr_unused=relative)
    optimizer_class = _load_class(option.import_path)
    problems = _argument_name_problems(option_name, optimizer_class, arguments)
    if problems:
        raise ConfigError("\n".join(problems))
    if option_name == "adafactor":
        _log_adafactor(arguments, param_groups, lr)
    if relative:
        param_groups = [{k: v for k, v in group.items() if k != "lr"} for group in param_groups]
    kwargs = {**arguments.kwargs, **option.fixed}
    try:
        optimizer = _construct(optimizer_class, param_groups, None if relative else lr, kwargs)
    except (ValueError, TypeError, IndexError) as err:
        raise ConfigError(f"{optimizer_class.__name__} ({option_name}) rejected its arguments {kwargs}: {err}") from err
    # torch keeps no record of what was passed: for resume (checkpoint.follow_config), metadata and the schedule
    optimizer.lora_sweep_kwargs = kwargs
    optimizer.lora_sweep_listed = arguments.listed
    optimizer.lora_sweep_adafactor_lr = float(lr) if relative else None
    return optimizer


def optimizer_description(optimizer: torch.optim.Optimizer) -> str:
    """kohya v0.8.7's `ss_optimizer`: "module.Class", plus "(k=v,...)" listing the user's --optimizer_args (here:
    optimizer.optimizer_args, and optimizer.args set away from the option's defaults) and what kohya inserts
    (Adafactor's relative_step, SGDNesterov's momentum); never lr, nor the defaults the option file spells out.
    """
    optimizer_class = type(optimizer)
    kwargs = getattr(optimizer, "lora_sweep_listed", {})
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
