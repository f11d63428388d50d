"""A job's names, made from the keys the sweep varies, and bounded in length whatever the override values.

- `run_label`: the MLflow run name (also the `variant` tag and the queue's label), at most 100 characters (MLflow's
  SQL stores hold 250), each value cut to 32, with " #<hash>" when cut;
- `job_dir_name`: the job folder `<num>_<label>`, filesystem-safe, at most 48 characters after the number (the
  `lora_sweep_job_dir` resolver of conf/config.yaml).
The sweep callback writes the varied keys to `.lora_sweep/swept_keys.json` in the sweep folder; every launcher's
jobs read them there. Import-light: `lora_sweep.setup()` imports it for the resolver.
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
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@-]+")  # each run of other characters becomes one "_"
FOLDER_SLUG = 48
VALUE_CHARS = 32
LABEL_CHARS = 100
IGNORED_PREFIXES = ("hydra.", "hydra/", "tracking.")  # they do not tell one job's training from another's


def short_hash(text: str) -> str:
    """8 hex digits of sha256(text): enough to tell apart the jobs of one sweep."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def job_dir_name(num: Any, variant: Any = None, overrides: Any = (), sweep_dir: Any = None) -> str:
    """`<num>_<run_label, filesystem-safe>` (`3_v57`, `1_v57_noise=ip`): a job's multirun subfolder. A name cut to
    FOLDER_SLUG characters ends with "-<hash>", the run name's hash. The job number alone keeps folders apart."""
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
    """The hash a cut run name or job folder ends with: of the overrides without IGNORED_PREFIXES."""
    return short_hash(" ".join(o for o in overrides if not override_key(o).startswith(IGNORED_PREFIXES)))


def register_resolver() -> None:
    """`${lora_sweep_job_dir:${hydra.job.num},${tracking.variant},${hydra.overrides.task},${hydra.sweep.dir}}`.
    Job processes get it with Hydra's singleton state, which every launcher hands them."""
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
    """A job's run name (MLflow's, the progress bar's, the queue's): the variant and the overrides of the `swept`
    keys; outside a sweep (`swept` None), unless a variant names it, the overrides that change what trains (not
    paths of states, outputs or caches, the device or saving: `config.is_hash_excluded`). Values over VALUE_CHARS
    end with "…", names over LABEL_CHARS are cut; either way " #<label_hash>" keeps two jobs apart."""
    from lora_sweep.config import is_hash_excluded

    overrides = [o for o in (overrides or []) if not override_key(o).startswith(IGNORED_PREFIXES)]
    if swept is not None:
        keys = set(swept)
        picked = [o for o in overrides if override_key(o) in keys]
    else:
        picked = [] if variant else [o for o in overrides if not is_hash_excluded(override_key(o))]
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
    """The keys a multirun command line varies (`a=0,0.1`, `glob(v*)`, `range(3)`), by Hydra's override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]


def state_folder(sweep_dir: Path) -> Path:
    """lora-sweep's own files in a sweep folder (`.lora_sweep/`)."""
    return Path(sweep_dir) / STATE_DIR


def write_swept_keys(sweep_dir: Path, keys: Sequence[str]) -> None:
    write_text(state_folder(sweep_dir) / "swept_keys.json", json.dumps(list(keys)))


def write_datasets_seen(sweep_dir: Path, seen: dict[str, dict[str, list[int]]]) -> None:
    """The pre-flight's `data.dataset.files_seen` by `seen_key` (folder, caption extension), for the jobs."""
    write_text(state_folder(sweep_dir) / "datasets_seen.json", json.dumps(seen))


def read_datasets_seen(sweep_dir: Path | None) -> dict[str, dict[str, list[int]]]:
    """What `write_datasets_seen` wrote; empty outside a sweep or before the pre-flight recorded anything."""
    if sweep_dir is None:
        return {}
    try:
        return dict(json.loads((state_folder(sweep_dir) / "datasets_seen.json").read_text()))
    except (OSError, ValueError):
        return {}


def read_swept_keys(sweep_dir: Path | None) -> list[str] | None:
    """The sweep's varied keys, or None outside a sweep (or if the callback did not run)."""
    if sweep_dir is None:
        return None
    try:
        return list(json.loads((state_folder(sweep_dir) / "swept_keys.json").read_text()))
    except (OSError, ValueError):
        return None
