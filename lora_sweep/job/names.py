"""A job's names, and the sweep's varied keys they are made from.

A job's folder and its MLflow run name must not grow with its override values: a 2,000-character negative
prompt or a value holding `/` once made every job fail with ENAMETOOLONG or nested folders, and run names are
VARCHAR(250) in MLflow's Postgres/MySQL stores. So:
- the run name (also the `variant` tag and the queue's label) is the variant and the overrides the sweep varies,
  each value cut to 32 characters, the whole at most 100, with a hash when cut (`run_label`);
- the job folder is `<job number>_<that name>` made filesystem-safe and cut to 48 characters, with 8 hex digits
  of a sha256 of the name when anything was cut or replaced (`job_dir_name`, the `lora_sweep_job_dir` resolver of
  conf/config.yaml);
- the full override list is kept as the `lora_sweep.overrides` tag (within MLflow's 8,000 characters; the resolved
  config is always the run's `config.yaml` artifact).

The keys the sweep's command line varies are written by the sweep callback to `.lora_sweep/swept_keys.json` in the
sweep folder (`state_folder`: lora-sweep's files there, shared by every launcher through the filesystem, as
Hydra's own outputs are), and read back here for run names.

Import-light: `lora_sweep.setup()` imports this module for its resolver.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lora_sweep.atomic import write_text

RESOLVER = "lora_sweep_job_dir"
STATE_DIR = ".lora_sweep"
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@-]+")  # everything else (/, spaces, quotes, *, ~, ...) becomes one "_"
FOLDER_SLUG = 48
VALUE_CHARS = 32
LABEL_CHARS = 100
IGNORED_PREFIXES = ("hydra.", "hydra/", "tracking.")  # not what distinguishes one job's training from another's


def short_hash(text: str) -> str:
    """8 hex digits of sha256(text): enough to tell apart the jobs of one sweep."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def job_dir_name(num: Any, variant: Any = None, overrides: Any = (), sweep_dir: Any = None) -> str:
    """`<num>_<the run label, filesystem-safe>`: a job's Hydra multirun subfolder (`3_v57`, `0_loss.huber_c=0.1`,
    `1_v57_noise=ip`), named like its MLflow run (`run_label`, from the keys the sweep varies, which the sweep
    callback wrote into `sweep_dir`). Unsafe characters become "_"; a name cut to FOLDER_SLUG characters ends with
    "-<hash>", the same hash as the run name's " #<hash>" (`short_hash` of the job's overrides). The job number
    alone keeps the folders of one sweep apart."""
    swept = read_swept_keys(Path(str(sweep_dir))) if sweep_dir not in (None, "") else None
    overrides = [str(o) for o in overrides or ()]
    label = run_label(str(variant) if variant not in (None, "") else None, overrides, swept)
    base, sep, tag = label.rpartition(" #")
    if not (sep and re.fullmatch(r"[0-9a-f]{8}", tag)):
        base, tag = label, ""
    name = _UNSAFE.sub("_", base).strip("._") or "job"
    if tag or len(name) > FOLDER_SLUG:
        name = f"{name[:FOLDER_SLUG - 9]}-{tag or label_hash(overrides)}"
    return f"{num}_{name}"


def label_hash(overrides: Sequence[str]) -> str:
    """The hash a cut run name ends with (" #<hash>"), and a cut job folder ("-<hash>"): of the job's overrides
    without the ones that do not tell jobs apart (hydra.*, tracking.*)."""
    return short_hash(" ".join(o for o in overrides if not override_key(o).startswith(IGNORED_PREFIXES)))


def register_resolver() -> None:
    """`${lora_sweep_job_dir:${hydra.job.num},${tracking.variant},${hydra.overrides.task},${hydra.sweep.dir}}`.

    Registered by `lora_sweep.setup()` in the sweep process; a job process gets it from the sweep process with
    Hydra's singleton state (`Singleton.get_state`, which the gpu_queue, Ray and Slurm launchers hand each job and
    set before Hydra's run_job resolves the job's folder)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, job_dir_name)


def override_key(override: str) -> str:
    """`+loss.huber_c=0.1` -> `loss.huber_c`; `experiment=v57` -> `experiment`."""
    return override.split("=", 1)[0].lstrip("+~")


def _shorten(override: str) -> tuple[str, bool]:
    key, sep, value = override.partition("=")
    if len(value) <= VALUE_CHARS:
        return override, False
    return f"{key}{sep}{value[:VALUE_CHARS - 1]}…", True


def run_label(variant: str | None, overrides: Sequence[str] | None, swept: Iterable[str] | None = None) -> str:
    """The short name of a job's run: the variant and the overrides that tell this job from the sweep's others.

    `swept`: the keys the sweep varies (None outside a sweep: every override counts, unless a variant names it).
    Values over 32 characters are cut with "…"; a name over 100 characters is cut too; either way it ends with
    " #<short_hash of the whole override list>" so that two jobs whose cut names agree still differ."""
    overrides = [o for o in (overrides or []) if not override_key(o).startswith(IGNORED_PREFIXES)]
    if swept is not None:
        keys = set(swept)
        picked = [o for o in overrides if override_key(o) in keys]
    else:
        picked = [] if variant else overrides
    if variant:
        picked = [o for o in picked if override_key(o) != "experiment"]  # the variant already says it
    parts, cut = ([str(variant)] if variant else []), False
    for override in picked:
        text, was_cut = _shorten(override)
        parts.append(text)
        cut |= was_cut
    label = " ".join(parts) or "default"
    if cut or len(label) > LABEL_CHARS:
        label = f"{label[:LABEL_CHARS - 10].rstrip()} #{label_hash(overrides)}"
    return label


def swept_keys(task_overrides: Sequence[str]) -> list[str]:
    """The keys a multirun command line varies (`loss.huber_c=0,0.1`, `experiment=glob(v*)`, `x=range(3)`), parsed
    with Hydra's own override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]


def state_folder(sweep_dir: Path) -> Path:
    """lora-sweep's own files in a sweep folder (`.lora_sweep/`)."""
    return Path(sweep_dir) / STATE_DIR


def write_swept_keys(sweep_dir: Path, keys: Sequence[str]) -> None:
    write_text(state_folder(sweep_dir) / "swept_keys.json", json.dumps(list(keys)))


def read_swept_keys(sweep_dir: Path | None) -> list[str] | None:
    """The sweep's varied keys, or None outside a sweep (or if the callback did not run)."""
    if sweep_dir is None:
        return None
    try:
        return list(json.loads((state_folder(sweep_dir) / "swept_keys.json").read_text()))
    except (OSError, ValueError):
        return None
