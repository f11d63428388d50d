"""Checks of `python sweep.py` overrides made before Hydra composes anything, so that every problem of the command
line is reported at once.

Hydra stops at the first problem it meets (one misspelt group option, one value of the wrong type), and for a key
the schema lacks it advises adding it with '+', which would train without it. Here every override is checked on its
own: keys against the schema (with the closest real keys), `group=option` against the options Hydra's config loader
lists for the group (also each option of a sweep `noise=a,b` or a list `loss=[a,b]`), and values against the schema's
types. What needs the composed config (ranges, combinations, files) is the pre-flight's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_sweep.checks.groups import group_options, missing_option_message
from lora_sweep.config import Config, _is_free_form, config_groups, schema_keys, unknown_key_message

_LEFT_TO_HYDRA = ("-h", "--help", "--hydra-help", "--version")


def _values(override) -> list[Any]:
    """The values one override stands for: each of a sweep (`a,b`, `range(1,3)`), else the one value. A glob is
    Hydra's to expand (empty here)."""
    if override.is_sweep_override():
        return [] if override.value_type.name == "GLOB_CHOICE_SWEEP" else list(override.sweep_iterator())
    return [override.value()]


def _option_names(value: Any) -> Iterable[str]:
    """The option names a group value holds: one name, or each name of a list (`loss=[huber_snr,min_snr]`)."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str):
            yield item


def _type_problem(template, key: str, value: Any, text: str) -> str | None:
    if isinstance(value, str) and "${" in value:
        return None  # an interpolation: resolved (and typed) after composition
    try:
        OmegaConf.update(template.copy(), key, value, merge=True)
    except OmegaConfBaseException as exc:
        return f"Error merging override {key}={text}. {str(exc).splitlines()[0].rstrip('.')}."
    return None


def command_line_problems(argv: list[str]) -> list[str]:
    """Every problem of `python sweep.py` overrides that can be found before Hydra composes, one message each:
    a key the schema lacks (`noise.ofset=0.1`, `trian.lr=1`, also swept), a group option that does not exist
    (`noise=ofset`, each of a sweep or list), a value of the wrong type (`train.max_steps=abc`). Overrides with `+`,
    `++` or `~`, of `hydra.*` and of free-form maps are left to Hydra and the pre-flight; so is everything when
    another config is chosen (--config-path/-name/-dir), and group options when `hydra.searchpath` adds folders."""
    if any(a in _LEFT_TO_HYDRA for a in argv):  # Hydra answers these and exits
        return []
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, _ = parser.parse_known_args(argv)
        if args.config_path or args.config_dir or args.config_name not in (None, "config"):
            return []
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (Exception, SystemExit):  # Hydra says what is wrong with the command line itself
        return []
    keys = set(schema_keys())
    nodes = {k.split(".")[0] for k in keys}
    groups = set(config_groups())
    check_options = not any(o.key_or_group.startswith("hydra.searchpath") for o in overrides)
    template = OmegaConf.structured(Config)
    problems = []
    for override in overrides:
        key = override.key_or_group
        if override.is_add() or override.is_force_add() or override.is_delete() or override.package is not None:
            continue
        if key.startswith("hydra") or _is_free_form(key):
            continue
        if "/" in key or key in groups:
            if check_options:
                problems += _group_problems(key, _values(override))
            continue
        if key not in keys:
            top = key.split(".")[0]
            if top in nodes or top not in groups:  # `experiment.x` and the like: Hydra says what it means
                problems.append(unknown_key_message(key))
            continue
        for value in _values(override):
            text = override.get_value_element_as_str() if not override.is_sweep_override() else str(value)
            problem = _type_problem(template, key, value, text)
            if problem:
                problems.append(problem)
    return list(dict.fromkeys(problems))


def _group_problems(group: str, values: list[Any]) -> list[str]:
    options = group_options(group)
    if not options:
        return []  # not a group Hydra knows (`hydra/...` plugins load later): Hydra's own error says so
    return [missing_option_message(group, name, options)
            for value in values for name in _option_names(value) if name not in options]
