"""kohya's datasets and subsets (sd-scripts v0.8.7 `library/config_util.py`; docs/datasets.md): what each image folder
trains with, after v0.8.7's precedence (subset -> dataset -> [general] -> the `data.*` keys -> kohya's defaults).

`data.dir` / `data.reg_data_dir` (folders named `<repeats>_<class>`), `data.datasets` and `data.dataset_config` all
become `DatasetSpec`s holding `Subset`s; the scan, the cache, the batches, the loss and the metadata read only these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    """One kohya dataset: its own buckets and batch size, and its subsets in order (train folders, then reg).

    `folders`: `<repeats>_<class>` trees (data.dir, data.reg_data_dir) with is_reg, each subfolder a subset made from
    `template` (its image_dir, num_repeats, class_tokens and is_reg replaced). Bucket fields read as `data.*` does
    (`buckets.bucket_settings`); min/max_bucket_reso None: lora-sweep's size-relative defaults.
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
