"""kohya's datasets and subsets (sd-scripts v0.8.7 `library/config_util.py`; docs/datasets.md): what each image folder
trains with, after v0.8.7's precedence (subset -> dataset -> [general] -> the `data.*` keys -> kohya's defaults).

`data.dir` / `data.reg_data_dir` (folders named `<repeats>_<class>`), `data.datasets` and `data.dataset_config` all
become `DatasetSpec`s holding `Subset`s; the scan, the cache, the batches, the loss and the metadata read only these.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_sweep.errors import ConfigError, ConfigErrors, Fallback, UserError


@dataclass(frozen=True)
class Subset:
    """One image folder and the options its images train with (kohya's DreamBooth subset), values resolved.

    `setting` names where it was given, for messages: `data.dir '10_cat'`, `data.datasets[0].subsets[1]`,
    `data.dataset_config 'ds.toml' line 12`.
    """

    image_dir: Path
    setting: str
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".txt"
    caption_separator: str = ","  # --caption_separator: one for every subset (not a dataset-config key)
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    flip_aug: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """One kohya dataset: its own buckets and batch size, and its subsets in file order (as v0.8.7's metadata).

    `folders`: `<repeats>_<class>` trees (data.dir, data.reg_data_dir) with is_reg, each subfolder a subset made from
    `template` (its image_dir, num_repeats, class_tokens and is_reg replaced). Bucket fields read as `data.*` does
    (`buckets.bucket_settings`); min/max_bucket_reso None: lora-sweep's size-relative defaults. `fallbacks`: what
    reading it left out or ignored (a duplicate image_dir, num_repeats < 1, cache_info), for the caller to warn.
    """

    setting: str
    resolution: tuple[int, int]
    batch_size: int
    enable_bucket: bool
    bucket_reso_steps: int
    bucket_no_upscale: bool
    min_bucket_reso: int | None
    max_bucket_reso: int | None
    network_multiplier: float = 1.0
    subsets: tuple[Subset, ...] = ()
    folders: tuple[tuple[Path, bool], ...] = ()
    template: Subset | None = None
    fallbacks: tuple[Fallback, ...] = field(default=(), compare=False)


# v0.8.7's key types (`CU:ConfigSanitizer L184-247`, docs/datasets.md): "number" takes an int or a float, "resolution"
# an int or [int, int], "pair" two floats
SUBSET_KEYS = {  # [general], [[datasets]] and [[datasets.subsets]]
    "num_repeats": int, "class_tokens": str, "caption_extension": str, "shuffle_caption": bool, "keep_tokens": int,
    "keep_tokens_separator": str, "secondary_separator": str, "enable_wildcard": bool, "caption_prefix": str,
    "caption_suffix": str, "caption_dropout_rate": "number", "caption_dropout_every_n_epochs": int,
    "caption_tag_dropout_rate": "number", "token_warmup_min": int, "token_warmup_step": "number", "flip_aug": bool,
    "color_aug": bool, "random_crop": bool, "face_crop_aug_range": "pair", "cache_info": bool,
}
DATASET_KEYS = {  # [general] and [[datasets]]
    "batch_size": int, "resolution": "resolution", "enable_bucket": bool, "min_bucket_reso": int,
    "max_bucket_reso": int, "bucket_reso_steps": int, "bucket_no_upscale": bool, "network_multiplier": float,
}
SUBSET_ONLY_KEYS = {"image_dir": str, "is_reg": bool}
# keys v0.8.7 refuses in the file (`CU L243-247`): where lora-sweep takes them instead
ELSEWHERE = {
    "caption_separator": "data.caption_separator (one separator for every subset, kohya's --caption_separator)",
    "prior_loss_weight": "loss.prior_loss_weight (one weight for every reg image, kohya's --prior_loss_weight)",
    "max_token_length": "kohya's --max_token_length, a command-line option, not a dataset key",
    "debug_dataset": "kohya's --debug_dataset, a command-line option that lora-sweep does not have",
}
NOT_SUPPORTED = {
    "metadata_file": "fine-tuning datasets (metadata_file) are not supported by lora-sweep: give image_dir with "
                     "caption files beside the images (a DreamBooth subset)",
    "conditioning_data_dir": "ControlNet / masked-loss datasets (conditioning_data_dir) are not supported by "
                             "lora-sweep",
}
PER_STEP_PIXELS = ("random_crop", "color_aug", "face_crop_aug_range")
NO_PIXELS_EACH_STEP = ("needs the pixels encoded at every step, which lora-sweep (like kohya with cached latents) "
                       "does not do")
_TYPE_NAMES = {bool: "true or false", int: "an int", float: "a float", str: "a string", "number": "a number",
               "resolution": "an int or [width, height] ints", "pair": "two floats [min, max]"}
_LEVELS = {"general": {**DATASET_KEYS, **SUBSET_KEYS}, "dataset": {**DATASET_KEYS, **SUBSET_KEYS, "subsets": list},
           "subset": {**SUBSET_KEYS, **SUBSET_ONLY_KEYS}}
# the Subset fields a level may set, read subset -> dataset -> general -> `data.<same name>`
_CAPTION_FIELDS = ("caption_extension", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
                   "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix", "caption_dropout_rate",
                   "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min",
                   "token_warmup_step", "flip_aug")
_BUCKET_FIELDS = ("enable_bucket", "bucket_reso_steps", "bucket_no_upscale", "min_bucket_reso", "max_bucket_reso")


def value_problem(key: str, value) -> str | None:
    """What a well-typed value of dataset key `key` (or its `data.*` namesake) must be, if `value` is not that."""
    def outside(ok: bool, accepted: str) -> str | None:
        return None if ok else f"must be {accepted}, got {value}"

    if value is None:
        return None
    if key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        return outside(0 <= value <= 1, "in [0, 1]")
    if key in ("caption_dropout_every_n_epochs", "keep_tokens", "token_warmup_step"):
        return outside(value >= 0, ">= 0")
    if key == "token_warmup_min":
        return outside(value >= 1, ">= 1")
    if key in ("batch_size", "min_bucket_reso", "max_bucket_reso"):
        return outside(value >= 1, ">= 1")
    if key == "bucket_reso_steps":
        return outside(value > 0 and value % 32 == 0, "a positive multiple of 32 for SDXL (32 or 64)")
    if key == "resolution":
        return outside(min(value) > 0, "positive (width and height > 0)")
    if key == "network_multiplier":
        return outside(math.isfinite(value), "a finite number")
    return None


def balance_reg(num_train_images: int, reg_repeats: Sequence[int]) -> list[int]:
    """Each reg image's repeats after v0.8.7's balancing (`TU:DreamBoothDataset.__init__ L1572-1638`, docs/datasets.md).

    `reg_repeats`: each reg image's folder repeats, in subset order then sorted path; `num_train_images`: the sum of
    repeats over the train images. The first pass takes images (at their folder repeats) until the total reaches
    the train count; images it does not reach stay 0 (never used); later passes add 1 round-robin until the totals
    are equal. As in v0.8.7 it runs also when reg outnumbers train, and not at all without reg repeats.
    """
    balanced = [0] * len(reg_repeats)
    if sum(reg_repeats) == 0:  # v0.8.7: "no regularization images", no loop
        return balanced
    taken, first_pass = 0, True
    while taken < num_train_images:
        for k, repeats in enumerate(reg_repeats):
            balanced[k] += repeats if first_pass else 1
            taken += repeats if first_pass else 1
            if taken >= num_train_images:
                break
        first_pass = False
    return balanced


def dataset_specs(cfg, train_folder: Path | None) -> list[DatasetSpec]:
    """The datasets `cfg` trains on (docs/datasets.md): folder mode (`data.dir`, `data.reg_data_dir`: one dataset),
    `data.datasets` or `data.dataset_config` (read as v0.8.7 reads it). `train_folder`: the resolved data.dir (or the
    bundled photos folder); None when the config names none. Raises ConfigError with every problem, one line each.
    """
    specs, problems = _read(cfg, train_folder)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigErrors(problems)
    return specs


def dataset_problems(cfg, train_folder: Path | None) -> list[str]:
    """`dataset_specs`'s problems, one line each naming the setting (and the file and line), without raising."""
    return _read(cfg, train_folder)[1]


def _read(cfg, train_folder: Path | None) -> tuple[list[DatasetSpec], list[str]]:
    """(the specs, every problem): a file, else data.datasets, else folder mode."""
    from omegaconf import OmegaConf

    d = cfg.data
    datasets = d.datasets
    datasets = OmegaConf.to_container(datasets, resolve=True) if OmegaConf.is_config(datasets) else list(datasets or [])
    problems = _mode_conflicts(d, bool(datasets))
    problems += [f"data.{key}: {NO_PIXELS_EACH_STEP}; set it to false." for key in ("random_crop", "color_aug")
                 if d.get(key)]
    if d.dataset_config:
        source, general, tables = _load_file(str(d.dataset_config), problems)
        specs = _datasets(cfg, source, general, tables, problems)
    elif datasets:
        specs = _datasets(cfg, _Source("data.datasets"), {}, datasets, problems)
    else:
        specs = [] if train_folder is None else [_folder_spec(cfg, Path(train_folder), problems)]
    return specs, list(dict.fromkeys(problems))  # data.resolution's problem once, however many datasets read it


def dataset_config_problems(value: str) -> list[str]:
    """A dataset config file's problems that need no other setting: its layout, and each key and its type as v0.8.7's
    schema has them (`CU:ConfigSanitizer`); whether an image_dir exists is the caller's to check."""
    problems: list[str] = []
    source, general, tables = _load_file(value, problems)
    _checked(source, None, general, "general", problems)
    for i, table in enumerate(tables):
        if not isinstance(table, Mapping):
            problems.append(f"{source.at((i,))}: must be a table of dataset keys, got {table!r}.")
            continue
        _checked(source, (i,), table, "dataset", problems)
        for j, subset in enumerate(table.get("subsets") or []):
            if isinstance(subset, Mapping):
                _checked(source, (i, j), subset, "subset", problems)
    return problems


def _mode_conflicts(d, has_datasets: bool) -> list[str]:
    """kohya ignores --train_data_dir and --reg_data_dir beside --dataset_config, with a warning; lora-sweep refuses."""
    given = [name for name, on in (("data.datasets", has_datasets), ("data.dataset_config", d.dataset_config)) if on]
    if not given:
        return []
    problems = []
    if len(given) == 2:
        problems.append("data.datasets and data.dataset_config are both set: give one of them (the datasets as a list "
                        "in the config, or a kohya dataset config file).")
    if d.get("dir"):
        problems.append(f"data.dir: '{d.dir}' is set together with {given[0]}; kohya ignores --train_data_dir then, "
                        "lora-sweep refuses: give that folder as subsets (image_dir, num_repeats, class_tokens) or "
                        "unset data.dir.")
    if d.reg_data_dir:
        problems.append(f"data.reg_data_dir: '{d.reg_data_dir}' is set together with {given[0]}; kohya ignores "
                        "--reg_data_dir then, lora-sweep refuses: give the reg images as a subset with is_reg = true.")
    return problems


def _folder_spec(cfg, train_folder: Path, problems: list[str]) -> DatasetSpec:
    """Folder mode (kohya's --train_data_dir / --reg_data_dir, `CU L578-615`): one dataset, every option from data.*."""
    from lora_sweep.paths import absolute

    d = cfg.data
    template = Subset(image_dir=train_folder, setting="data.dir", caption_separator=d.caption_separator,
                      **{key: d[key] for key in _CAPTION_FIELDS if d[key] is not None})
    reg = ((Path(absolute(d.reg_data_dir)), True),) if d.reg_data_dir else ()
    return DatasetSpec(setting="data.dir", resolution=_data_resolution(d, problems), batch_size=cfg.train.batch_size,
                       **{key: d[key] for key in _BUCKET_FIELDS}, folders=((train_folder, False), *reg),
                       template=template)


def _data_resolution(d, problems: list[str]) -> tuple[int, int]:
    """data.resolution as (W, H); (0, 0) and its problem when it is no resolution."""
    from lora_sweep.data.buckets import parse_resolution

    try:
        return parse_resolution(d.resolution)
    except ConfigError as exc:
        problems.append(str(exc))
        return (0, 0)


def _bucket_problems(at: str, resolution: tuple[int, int], min_reso: int | None, max_reso: int | None) -> list[str]:
    """What v0.8.7 asserts of a bucketed dataset's sizes (`TU:DreamBoothDataset.__init__ L1446-1452`): min <= each
    side <= max (and min <= max, as lora-sweep's data.* check)."""
    problems = []
    if min_reso is not None and max_reso is not None and min_reso > max_reso:
        problems.append(f"{at}: min_bucket_reso ({min_reso}) is larger than max_bucket_reso ({max_reso}).")
    if max_reso is not None and max(resolution) > max_reso:
        problems.append(f"{at}: max_bucket_reso ({max_reso}) is smaller than the resolution {resolution[0]}x"
                        f"{resolution[1]}; it must be >= both sides.")
    if min_reso is not None and min(resolution) < min_reso:
        problems.append(f"{at}: min_bucket_reso ({min_reso}) is larger than the shorter side of the resolution "
                        f"{resolution[0]}x{resolution[1]}.")
    return problems


@dataclass
class _Source:
    """Where tables come from, for messages: `data.datasets`, or a file (`lines`: a TOML file's key lines)."""

    name: str
    file: bool = False
    lines: _TomlLines | None = None

    def at(self, path: tuple[int, ...] | None, key: str | None = None) -> str:
        """`data.datasets[0].subsets[1].num_repeats` or `data.dataset_config 'ds.toml' line 12: datasets[0]...`."""
        tables = zip(("datasets", "subsets"), path or (), strict=False)
        label = ("general" if path is None else ".".join(f"{name}[{index}]" for name, index in tables))
        label += f".{key}" if key else ""
        if not self.file:
            return f"{self.name}{label.removeprefix('datasets')}"
        line = self.lines.line(path, key) if self.lines else None
        return f"{self.name}{f' line {line}' if line else ''}: {label}"

    def subset_setting(self, path: tuple[int, int]) -> str:
        """A Subset's `setting`: `data.datasets[0].subsets[1]` or `data.dataset_config 'ds.toml' line 12`."""
        line = self.lines.line(path) if self.lines else None
        if self.file and line:
            return f"{self.name} line {line}"
        return self.at(path).replace(": ", " ")


class _TomlLines:
    """The line of each table header and of each `key =` inside it, found in the text (tomllib gives no lines)."""

    _HEADER = re.compile(r"\[\[?\s*([A-Za-z0-9_.\s\"']+?)\s*\]\]?")
    _KEY = re.compile(r"[\"']?([A-Za-z0-9_-]+)[\"']?\s*=")

    def __init__(self, text: str):
        self.headers: dict[object, int] = {}
        self.keys: dict[object, dict[str, int]] = {}
        table: object = "top"
        dataset = subset = -1
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            header = self._HEADER.match(line) if line.startswith("[") else None
            if header:
                name = re.sub(r"[\s\"']", "", header.group(1))
                if name == "datasets.subsets":
                    subset += 1
                    table = (dataset, subset)
                elif name == "datasets":
                    dataset, subset = dataset + 1, -1
                    table = (dataset,)
                else:
                    table = None if name == "general" else name
                self.headers.setdefault(table, number)
            elif key := self._KEY.match(line):
                self.keys.setdefault(table, {}).setdefault(key.group(1), number)

    def line(self, path, key: str | None = None) -> int | None:
        table = path if path is None or isinstance(path, str) else tuple(path)
        found = self.keys.get(table, {}).get(key) if key else None
        return found or self.headers.get(table)


def _load_file(value: str, problems: list[str]) -> tuple[_Source, dict, list]:
    """The file's `general` and `datasets` (`CU:load_user_config L646-671`); a problem for anything unreadable."""
    from lora_sweep.paths import absolute

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the same parser, as a package before Python 3.11
        import tomli as tomllib

    source = _Source(f"data.dataset_config '{value}'", file=True)
    path = Path(absolute(value))
    if path.suffix.lower() not in (".toml", ".json"):
        problems.append(f"{source.name}: must be a .toml or .json file (as kohya's --dataset_config).")
        return source, {}, []
    if not path.is_file():
        problems.append(f"{source.name}: is not an existing file{' (it is a folder)' if path.is_dir() else ''} (a "
                        "relative path is read from the folder the command was started in).")
        return source, {}, []
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            content = json.loads(text)
        else:
            source.lines = _TomlLines(text)
            content = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"{source.name}: cannot be read as {path.suffix[1:].upper()}: {exc}.")
        return source, {}, []
    except json.JSONDecodeError as exc:
        problems.append(f"{source.name} line {exc.lineno}: not valid JSON: {exc.msg}.")
        return source, {}, []
    if not isinstance(content, dict):
        problems.append(f"{source.name}: must hold an object with 'general' and 'datasets', got "
                        f"{type(content).__name__}.")
        return source, {}, []
    for key in [key for key in content if key not in ("general", "datasets")]:
        line = (source.lines.line("top", key) or source.lines.line(key)) if source.lines else None  # key or [key]
        problems.append(f"{source.name}{f' line {line}' if line else ''}: {key}: unknown top-level key; a dataset "
                        "config holds only [general] and [[datasets]] (with [[datasets.subsets]]).")
    general, tables = content.get("general", {}), content.get("datasets", [])
    if not isinstance(general, dict):
        problems.append(f"{source.at(None)}: must be a table ([general]).")
        general = {}
    if not isinstance(tables, list):
        problems.append(f"{source.name}: datasets must be an array of tables ([[datasets]]).")
        tables = []
    if not tables:
        problems.append(f"{source.name}: has no [[datasets]]; give at least one, with [[datasets.subsets]] holding "
                        "image_dir.")
    return source, general, tables


def _datasets(cfg, source: _Source, general: dict, tables: list, problems: list[str]) -> list[DatasetSpec]:
    """Every dataset of data.datasets or a file, values resolved subset -> dataset -> general -> data.* -> defaults
    (`CU:BlueprintGenerator.generate L401-464`)."""
    general = _checked(source, None, general, "general", problems)
    specs = []
    for i, table in enumerate(tables):
        if not isinstance(table, Mapping):
            problems.append(f"{source.at((i,))}: must be a table of dataset keys, got {table!r}.")
            continue
        dataset = _checked(source, (i,), table, "dataset", problems)
        specs.append(_dataset(cfg, source, i, dataset, [general], problems))
    if specs and general.get("cache_info"):
        specs[0] = replace(specs[0], fallbacks=(_no_effect(source, None), *specs[0].fallbacks))
    return specs


def _no_effect(source: _Source, path) -> Fallback:
    return Fallback(source.name, "cache_info settings without effect (lora-sweep reads every image and caption "
                    "itself and caches by content)", (source.at(path, "cache_info").removeprefix(source.name + " "),))


def _dataset(cfg, source: _Source, i: int, dataset: dict, upper: list[dict], problems: list[str]) -> DatasetSpec:
    d = cfg.data
    levels = [dataset, *upper]

    def pick(key: str, fallback):
        return next((level[key] for level in levels if level.get(key) is not None), fallback)

    subsets, fallbacks, seen = [], [], set()
    tables = dataset.get("subsets") or []
    if not tables:
        problems.append(f"{source.at((i,))}: has no subsets; give each image folder as a subset with image_dir.")
    for j, table in enumerate(tables):
        if not isinstance(table, Mapping):
            problems.append(f"{source.at((i, j))}: must be a table of subset keys, got {table!r}.")
            continue
        kept = _checked(source, (i, j), table, "subset", problems)
        fallbacks += [_no_effect(source, (i, j))] if kept.get("cache_info") else []
        subset = _subset(cfg, source, (i, j), kept, levels)
        if subset is None:
            continue
        written = table["image_dir"]
        if not subset.image_dir.is_dir():
            problems.append(f"{source.at((i, j), 'image_dir')}: '{written}' is not an existing folder (a relative path "
                            "is read from the folder the command was started in).")
        if subset.num_repeats < 1:
            fallbacks.append(Fallback(subset.setting, "subsets not used: num_repeats < 1 (as kohya)", (written,)))
        elif written in seen:  # v0.8.7 compares image_dir as written (`DreamBoothSubset.__eq__`)
            fallbacks.append(Fallback(subset.setting, "subsets not used: an earlier subset of this dataset has the "
                                      "same image_dir (as kohya, the first one wins)", (written,)))
        else:
            seen.add(written)
            subsets.append(subset)
    fallbacks = [_no_effect(source, (i,))] * bool(dataset.get("cache_info")) + fallbacks
    resolution = pick("resolution", None) or _data_resolution(d, problems)
    buckets = {key: pick(key, d[key]) for key in _BUCKET_FIELDS}
    given = any(level.get(key) is not None for level in levels for key in ("resolution", *_BUCKET_FIELDS))
    if given and buckets["enable_bucket"]:  # data.*'s own are validate's
        problems += _bucket_problems(source.at((i,)), resolution, buckets["min_bucket_reso"],
                                     buckets["max_bucket_reso"])
    return DatasetSpec(
        setting=source.at((i,)).replace(": ", " "),
        resolution=resolution,
        batch_size=pick("batch_size", cfg.train.batch_size),
        **buckets,
        network_multiplier=float(pick("network_multiplier", 1.0)),
        subsets=tuple(subsets),
        fallbacks=tuple(fallbacks))


def _subset(cfg, source: _Source, path: tuple[int, int], table: dict, upper: list[dict]) -> Subset | None:
    from lora_sweep.paths import absolute

    if "image_dir" not in table:
        return None  # _checked named it
    d = cfg.data
    levels = [table, *upper]

    def pick(key: str, fallback):
        return next((level[key] for level in levels if level.get(key) is not None), fallback)

    extension = pick("caption_extension", d.caption_extension)
    caption = {key: pick(key, d[key]) for key in _CAPTION_FIELDS if pick(key, d[key]) is not None}
    caption["caption_extension"] = extension if not extension or extension.startswith(".") else "." + extension
    return Subset(image_dir=Path(absolute(table["image_dir"])), setting=source.subset_setting(path),
                  num_repeats=pick("num_repeats", 1), is_reg=bool(table.get("is_reg", False)),
                  class_tokens=pick("class_tokens", None), caption_separator=d.caption_separator, **caption)


_LEVEL_NAMES = {"general": "[general]", "dataset": "a dataset ([[datasets]])",
                "subset": "a subset ([[datasets.subsets]])"}


def _checked(source: _Source, path, table: Mapping, level: str, problems: list[str]) -> dict:
    """`table`'s keys that are valid at `level` with v0.8.7's types, converted (resolution -> (W, H)); a problem for
    each other key. From `data.datasets` (YAML) an int is accepted where a float is wanted."""
    allowed = _LEVELS[level]
    kept: dict = {}
    for key, value in table.items():
        at = source.at(path, key)
        if value is None:
            continue  # YAML's null: not set
        if key in ELSEWHERE:
            problems.append(f"{at}: not a dataset-config key (v0.8.7 refuses it there); set {ELSEWHERE[key]}.")
        elif key in NOT_SUPPORTED:
            problems.append(f"{at}: {NOT_SUPPORTED[key]}.")
        elif key not in allowed:
            problems.append(f"{at}: {_misplaced(key, level)}")
        else:
            converted, accepted = _typed(allowed[key], value, yaml=not source.file)
            wrong = accepted is not None
            problem = (f"must be {accepted}, got {value!r}{_type_hint(allowed[key], value)}" if wrong
                       else value_problem(key, converted))
            if problem:
                problems.append(f"{at}: {problem}.")
            elif key in PER_STEP_PIXELS and converted not in (False, None):
                fix = "remove it" if key == "face_crop_aug_range" else "remove it or set it to false"  # a range
                problems.append(f"{at}: {NO_PIXELS_EACH_STEP}; {fix}.")
            else:
                kept[key] = converted
    if level == "subset" and "image_dir" not in table:
        problems.append(f"{source.at(path)}: image_dir is required (the folder of this subset's images).")
    return kept


def _misplaced(key: str, level: str) -> str:
    if key in SUBSET_ONLY_KEYS:
        return f"only a subset ([[datasets.subsets]]) takes {key}, not {_LEVEL_NAMES[level]}."
    if key in DATASET_KEYS:
        return f"a dataset key: set it in a dataset ([[datasets]]) or [general], not {_LEVEL_NAMES[level]}."
    if key == "subsets":
        return "subsets belong in a dataset ([[datasets]])."
    close = difflib.get_close_matches(key, list(_LEVELS[level]), n=1)
    return f"unknown key in {_LEVEL_NAMES[level]}" + (f"; did you mean '{close[0]}'?" if close else ".")


def _typed(kind, value, *, yaml: bool) -> tuple[object, str | None]:
    """(value converted, None) when `value` has v0.8.7's type `kind` (exact isinstance: TOML's int is no float), else
    (None, what is accepted). A bool is no int here (Python's isinstance would take it)."""
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def real(v) -> bool:
        return isinstance(v, float) or (yaml and integer(v))

    accepted = _TYPE_NAMES.get(kind, "a list of tables")
    if kind is bool or kind is str or kind is list:
        return (value, None) if isinstance(value, kind) else (None, accepted)
    if kind is int:
        return (value, None) if integer(value) else (None, accepted)
    if kind is float:
        return (float(value), None) if real(value) else (None, accepted)
    if kind == "number":
        return (float(value), None) if integer(value) or isinstance(value, float) else (None, accepted)
    pair = isinstance(value, (list, tuple)) and len(value) == 2
    if kind == "resolution":
        if integer(value):
            return (value, value), None
        return (tuple(value), None) if pair and all(map(integer, value)) else (None, accepted)
    return (tuple(map(float, value)), None) if pair and all(map(real, value)) else (None, accepted)  # "pair"


def _type_hint(kind, value) -> str:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return f" (write {value}.0: v0.8.7 checks the type exactly, and {value} is an int)"
    if kind in (int, "resolution") and isinstance(value, float) and value.is_integer():
        return f" (write {int(value)}: v0.8.7 checks the type exactly, and {value} is a float)"
    return ""


# the caption options that make v0.8.7 process a caption differently at each step (kohya:
# is_text_encoder_output_cacheable), and enable_wildcard, whose `{a|b}` draws
PER_STEP_CAPTIONS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                     "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard")


def per_step_captions(cfg, specs: Sequence[DatasetSpec] | None = None) -> str | None:
    """The first setting under which a subset's captions may change per step (`PER_STEP_CAPTIONS`), as
    `data.<key>=<value>` or `<key>=<value> for the subset at <setting>`; None if none does. `specs`: None reads them
    (a config the checks refuse gives None: they name it)."""
    d = cfg.data
    if specs is None:
        try:  # the folder only names the subsets; their caption options come from data.*
            specs = dataset_specs(cfg, None if d.datasets or d.dataset_config else Path(d.dir or "."))
        except UserError:
            return None
    for spec in specs:
        for subset in [*([spec.template] if spec.template else []), *spec.subsets]:
            for key in PER_STEP_CAPTIONS:
                value = getattr(subset, key)
                if value:
                    shown = "true" if value is True else value
                    if subset is spec.template:
                        return f"data.{key}={shown}"
                    return f"{key}={shown} for the subset at {subset.setting}"  # its line, not the key's
    return None
