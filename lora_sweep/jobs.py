"""A sweep's jobs: their names, and what they leave in the sweep folder for the sweep's parent run.

Names. A job's folder and its MLflow run name must not grow with its override values: a 2,000-character negative
prompt or a value holding `/` once made every job fail with ENAMETOOLONG or nested folders, and run names are
VARCHAR(250) in MLflow's Postgres/MySQL stores. So:
- the run name (also the `variant` tag and the queue's label) is the variant and the overrides the sweep varies,
  each value cut to 32 characters, the whole at most 100, with a hash when cut (`run_label`);
- the job folder is `<job number>_<that name>` made filesystem-safe and cut to 48 characters, with 8 hex digits
  of a sha256 of the name when anything was cut or replaced (`job_dir_name`, the `lora_sweep_job_dir` resolver of
  conf/config.yaml);
- the full override list is kept as the `lora_sweep.overrides` tag (within MLflow's 8,000 characters; the resolved
  config is always the run's `config.yaml` artifact).

Files in the sweep folder (shared by every launcher through the filesystem, as Hydra's own outputs are):
- `.mlflow_parent_run_id`: the parent run's id (tracking.PARENT_FILE), written by the sweep callback;
- `.lora_sweep/swept_keys.json`: the keys the sweep's command line varies (callback), for run names;
- `.lora_sweep/jobs/<job number>.json`: each job's outcome (status, reason, run id, label), written by the job,
  so the parent run can count finished / failed / skipped jobs, including those that failed before a run existed.

And the job's side of the gpu_queue launcher's protocols: its status file (`StatusFile`: state, label, progress,
reason, `user_error`, `note`), the trainer's sink (`JobSink`), and the stop-on-signal handler (`StopOnSignal`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_sweep.atomic import write_text

if TYPE_CHECKING:  # lora_sweep/__init__ imports this module (its resolver): it stays import-light
    from lora_sweep.data.fingerprint import Fingerprint

log = logging.getLogger(__name__)
STATUS_ENV = "GPU_QUEUE_STATUS_FILE"

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


def slug(text: str, limit: int = FOLDER_SLUG) -> str:
    """`text` as a safe file name of at most `limit` characters. Unchanged if it already is one; otherwise unsafe
    runs become "_" and the result ends with "-<short_hash(text)>", so "a/b" and "a_b" stay apart."""
    if text and len(text) <= limit and not _UNSAFE.search(text) and not text.startswith("."):
        return text
    safe = _UNSAFE.sub("_", text).lstrip("._") or "job"
    return f"{safe[:max(1, limit - 9)]}-{short_hash(text)}"


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

    Registered when `lora_sweep` is imported, so every process that resolves a job's folder has it: the sweep
    process, the queue's forked jobs (their fork server preloads lora_sweep) and Ray/Slurm workers (unpickling the
    task function imports lora_sweep)."""
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


def _state(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / STATE_DIR


def write_swept_keys(sweep_dir: Path, keys: Sequence[str]) -> None:
    write_text(_state(sweep_dir) / "swept_keys.json", json.dumps(list(keys)))


def read_swept_keys(sweep_dir: Path | None) -> list[str] | None:
    """The sweep's varied keys, or None outside a sweep (or if the callback did not run)."""
    if sweep_dir is None:
        return None
    try:
        return list(json.loads((_state(sweep_dir) / "swept_keys.json").read_text()))
    except (OSError, ValueError):
        return None


def write_outcome(sweep_dir: Path | None, job_num: int | None, **outcome: Any) -> None:
    """Record a job's end (status FINISHED | FAILED | KILLED | SKIPPED, reason, run_id, label, user_error) where
    the sweep's parent run will read it. Never raises: bookkeeping must not fail a job."""
    if sweep_dir is None or job_num is None:
        return
    try:
        write_text(_state(sweep_dir) / "jobs" / f"{int(job_num)}.json", json.dumps({"job": int(job_num), **outcome},
                                                                                    default=str))
    except OSError:
        pass


def read_outcomes(sweep_dir: Path) -> dict[int, dict[str, Any]]:
    """Every job outcome recorded in the sweep folder, by job number."""
    found: dict[int, dict[str, Any]] = {}
    for path in sorted((_state(sweep_dir) / "jobs").glob("*.json")):
        try:
            data = json.loads(path.read_text())
            found[int(data["job"])] = data
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


# --- the job's side of the queue's protocols (hydra_plugins/gpu_queue_launcher) -------------------------------


class StatusFile:
    """The queue's view of this job (see hydra_plugins/gpu_queue_launcher): rewritten atomically, at most 2x/s."""

    def __init__(self, label: str):
        self.path = os.environ.get(STATUS_ENV)
        self.state = {"state": "running", "label": label}
        self._last = 0.0

    def update(self, force: bool = False, **values) -> None:
        self.state.update(values)
        if self.path and (force or time.monotonic() - self._last > 0.5):
            write_text(self.path, json.dumps(self.state))
            self._last = time.monotonic()


class JobSink:
    """The trainer's `Sink`: MLflow run logger + progress bar + the queue's status file."""

    def __init__(self, logger: Any, status: StatusFile, label: str,  # logger: tracking.RunLogger
                 on_warning: Callable[[Any], None] | None = None):
        from tqdm.auto import tqdm

        self.logger, self.status, self.bar = logger, status, tqdm(desc=label, unit="step", dynamic_ncols=True)
        self.on_warning = on_warning

    def warn(self, fallback) -> None:
        """A fallback found while training (an image that failed to decode): the run's warnings, as the
        pre-flight's."""
        if self.on_warning is not None:
            self.on_warning(fallback)

    def params(self, values):
        self.logger.log_params(values)

    def metrics(self, values, step):
        self.logger.log_metrics(values, step)

    def artifact(self, path, artifact_path=None):
        self.logger.log_artifact(path, artifact_path)

    def image(self, image, key, step):
        self.logger.log_image(image, key, step)

    def flush(self):
        self.logger.flush()

    def progress(self, step, max_steps, loss, speed):
        """Step, loss and speed on the bar and in the status file; no loss before the first step (there is none yet,
        not a NaN one)."""
        if self.bar.total != max_steps:  # the first call, once set-up is done: the bar's clock starts here
            self.bar.reset(total=max_steps)
            self.bar.initial = step  # a resumed run: speed counts only the steps of this process
        self.bar.n = step
        shown = loss if step > 0 else None
        if shown is not None:
            self.bar.set_postfix(loss=f"{shown:.4f}", refresh=False)
        self.bar.refresh()
        self.status.update(step=step, max_steps=max_steps, loss=shown, speed=speed)


class StopOnSignal:
    """First SIGINT/SIGTERM: ask the loop to stop after this step (sampling and evaluation in progress give up at
    their next prompt, image or denoising step); a second SIGINT: stop at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: ending after the current step (no end-of-run sampling or evaluation), saving a "
                    "training state, then stopping (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


# Skip-finished: what a job finds already done. A FINISHED run counts only if it trained the same config (hash) on
# the same files: the skip key adds the absolute paths and the dataset's content fingerprint to the hash.

def dataset_of(cfg) -> Fingerprint:
    """The content fingerprint of the job's dataset (and validation folder), reusing the cache's file digests."""
    from lora_sweep.data.fingerprint import dataset_fingerprint
    from lora_sweep.data.photos import data_folder
    from lora_sweep.paths import cache_root

    folders = [data_folder(cfg), *([Path(cfg.data.validation_dir)] if cfg.data.validation_dir else [])]
    return dataset_fingerprint(folders, cfg.data.caption_extension, memo_dir=cache_root(cfg) / ".hashes")


def skip_key(cfg, chash: str, fingerprint: Fingerprint) -> str:
    """What a finished result depends on beyond the config hash: the absolute paths of the model, dataset, validation
    folder and prompt file (resolved against the working folder), and the dataset's content fingerprint."""
    paths = {}
    for field in ("model.path", "data.dir", "data.validation_dir", "sampling.prompt_file"):
        group, key = field.split(".")
        value = cfg[group][key]
        paths[field] = str(Path(str(value)).expanduser().resolve()) if value else None
    blob = json.dumps({"config_hash": chash, "paths": paths, "dataset": fingerprint.digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finished_match(client, exp_id: str, chash: str, key: str, fingerprint: Fingerprint,
                   label: str) -> tuple[str, str] | None:
    """(run id, skip line) of a FINISHED run with this config and skip key; else None, saying why a FINISHED run of
    the same config does not count."""
    from lora_sweep import tracking

    runs = tracking.finished_runs(client, exp_id, chash)
    for run in runs:
        if run.data.tags.get("lora_sweep.skip_key") == key:
            line = (f"config {chash} with {fingerprint.describe()} already FINISHED as run {run.info.run_id} "
                    "(sweep.skip_finished=false to train again)")
            log.info("skipped %s: %s", label, line)
            return run.info.run_id, line
    if runs:
        old = runs[0].data.tags.get("lora_sweep.dataset")
        why = (f"its dataset was {old} and is now {fingerprint.describe()}" if old and old != fingerprint.digest
               else "a model, dataset or prompt-file path differs" if old
               else "it predates dataset fingerprints")
        log.info("config %s FINISHED as run %s, but %s: training again", chash, runs[0].info.run_id, why)
    return None
