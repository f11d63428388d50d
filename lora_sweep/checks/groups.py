"""Config groups as Hydra's loader sees them: a group's options, and options chosen together that disagree.

Hydra merges a list (`loss=[huber_snr,smooth_l1_snr]`) in order and the last value wins silently; a list is for
options that add up (`noise/offset_ip`), so one setting given two values is refused.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable

from omegaconf import OmegaConf

from lora_sweep.config import CONF_DIR, flatten, register_configs


@functools.lru_cache(maxsize=1)
def config_loader():
    """Hydra's config loader over conf/ and the search-path plugins, as `sweep.py` composes with it."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    register_configs()
    return ConfigLoaderImpl(config_search_path=create_config_search_path(f"file://{CONF_DIR}"))


def group_options(group: str) -> list[str]:
    """The options Hydra would accept for `group=` (`noise` -> ip, multires, ..., offset_ip)."""
    from hydra.core.object_type import ObjectType

    return config_loader().get_group_options(group, results_filter=ObjectType.CONFIG)


def missing_option_message(group: str, option: str, options: list[str]) -> str:
    """Hydra's words for an unknown group option, on one line, with the closest option (as `hydra_error_text`)."""
    near = difflib.get_close_matches(option, options, n=2, cutoff=0.5)
    return (f"Could not find '{group}/{option}'. Available options in '{group}': {', '.join(options)}."
            + (f" Did you mean {' or '.join(f'{group}={o}' for o in near)}?" if near else ""))


def option_conflicts(overrides: Iterable[str], config_name: str = "config") -> list[str]:
    """One message per pair of options of one group, chosen together, that set a key to different values; []
    when the defaults list cannot be computed (Hydra reports that itself)."""
    from hydra.types import RunMode

    loader = config_loader()
    try:
        defaults = loader.compute_defaults_list(config_name, list(overrides), RunMode.RUN).defaults
    except Exception:  # Hydra's own error reports a bad override
        return []
    chosen: dict[tuple, list] = {}
    for default in defaults:
        group = default.config_path.rpartition("/")[0] if default.config_path else ""
        if group and not default.is_self and not group.startswith("hydra"):
            chosen.setdefault((default.parent, group), []).append(default)
    problems = []
    for (_, group), options in chosen.items():
        setters: dict[str, tuple[str, object]] = {}
        for default in options:
            option = default.config_path.rpartition("/")[2]
            loaded = loader.repository.load_config(config_path=default.config_path)
            if loaded is None:
                continue
            prefix = f"{default.package}." if default.package else ""
            for key, value in flatten(OmegaConf.to_container(loaded.config, resolve=False)).items():
                first = setters.setdefault(prefix + key, (option, value))
                if first[1] != value:
                    problems.append(
                        f"{group}: the options {first[0]} and {option} both set {prefix + key} ({first[0]}: "
                        f"{first[1]!r}, {option}: {value!r}); in a list the last one would win without a word. "
                        f"Choose one of them ({group}={first[0]} or {group}={option}).")
    return list(dict.fromkeys(problems))
