"""Bad input across an import's sources, found at once: an optimizer or scheduler name sd-scripts v0.8.7 does not
know, an image folder or dataset config that does not exist here. Each is one paragraph naming the source file, its
key (and line) and what is wrong; `python -m lora_sweep import` then writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomllib

from lora_sweep.data.subsets import dataset_config_problems
from lora_sweep.errors import ConfigError
from lora_sweep.kohya.sources import KohyaSource
from lora_sweep.training.optim import not_shipped_class, resolve_optimizer_name
from lora_sweep.training.schedules import SCHEDULERS


def source_problems(sources: list[KohyaSource]) -> None:
    """Adds each source's problems to it. A folder-mode train_data_dir or reg_data_dir is checked only when no
    source gives a dataset config (v0.8.7 then ignores them)."""
    folder_mode = not any("dataset_config" in src.args for src in sources)
    for src in sources:
        _name_problems(src)
        for flag in ("train_data_dir", "reg_data_dir") if folder_mode else ():
            folder = src.args.get(flag)
            if folder and not Path(str(folder)).is_dir():
                src.problem(src.origin[flag], "the folder does not exist here: correct the path in the source")
        config = src.args.get("dataset_config")
        if config and not Path(str(config)).is_file():
            src.problem(src.origin["dataset_config"], "the file does not exist here: correct the path in the source")
        elif config:
            _dataset_problems(Path(str(config)), src)


def _name_problems(src: KohyaSource) -> None:
    """An optimizer_type v0.8.7 cannot build, or an lr_scheduler it does not know (one lora-sweep lacks but v0.8.7
    builds is a "not supported" row of the table instead)."""
    name = src.args.get("optimizer_type")
    if name:
        try:
            resolve_optimizer_name(str(name))
        except ConfigError:
            if not_shipped_class(str(name)) is None:
                src.problem(src.origin["optimizer_type"], "not an optimizer_type of sd-scripts v0.8.7 (AdamW, "
                                                          "AdamW8bit, Prodigy, DAdaptAdam, Adafactor, SGDNesterov, "
                                                          "Lion, a torch.optim class or a module.Class path)")
    scheduler = src.args.get("lr_scheduler")
    if scheduler and scheduler not in SCHEDULERS:
        src.problem(src.origin["lr_scheduler"], f"not an lr_scheduler of sd-scripts v0.8.7; choose one of "
                                                f"{', '.join(SCHEDULERS)}")


def _dataset_problems(path: Path, src: KohyaSource) -> None:
    """Its keys and their types as v0.8.7's schema has them, and each subset's image_dir that does not exist
    (relative to the working folder, as v0.8.7 reads it)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        src.problems.append(f"{path}: not a dataset config ({err}).")
        return
    src.problems += dataset_config_problems(str(path))
    for i, dataset in enumerate(data.get("datasets", [])):
        for j, subset in enumerate(dataset.get("subsets", [])):
            folder = subset.get("image_dir")
            if folder and not Path(folder).is_dir():
                relative = "" if Path(folder).is_absolute() else f" (read from the working folder, {Path.cwd()})"
                src.problems.append(f"{path}: datasets[{i}].subsets[{j}].image_dir = {folder!r}: the folder does "
                                    f"not exist here{relative}.")
