"""One job's life: validate, check every folder it writes, skip if already finished, resume if a state says so, an
MLflow (child) run around `train`, an honest end status.

Knows MLflow and the queue's status-file protocol; knows nothing of launchers. Every way a job can end maps to one
MLflow status: FINISHED (trained to max_steps), KILLED (Ctrl-C / SIGTERM: stopped cleanly, with a state), FAILED
(with the reason as the `lora_sweep.failure` tag: NaN, out of memory, disk, ...). A run is never marked FINISHED
without its LoRA files; only a SIGKILL leaves it RUNNING, and the next run of its config continues it from its
newest state (if it saved one).

Resume (train.resume=auto): the newest state under `<state root>/<config_hash>/<run_id>/` whose run is in this
MLflow store and experiment and not FINISHED; that run is reopened (RUNNING again) and steps it already logged are not
logged twice. train.resume=PATH: that state, in its own run if it is that run's newest state, else in a new run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lora_sweep import preflight as preflight_lib, tracking
from lora_sweep.atomic import write_text
from lora_sweep.training.checkpoint import find_resumable, list_states, read_meta, resolve_state_arg, run_folder
from lora_sweep.config import config_hash, flatten, to_container
from lora_sweep.errors import UserError
from lora_sweep.paths import make_paths_absolute
from lora_sweep.training.failures import check_free_space, check_writable, failure_reason, sqlite_store_folder
from lora_sweep.validate import validate

log = logging.getLogger(__name__)
STATUS_ENV = "GPU_QUEUE_STATUS_FILE"


@dataclass
class JobOutcome:
    status: str  # FINISHED | FAILED | KILLED | SKIPPED
    run_id: str | None
    reason: str = ""
    final_loss: float | None = None
    files: dict | None = None


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

    def __init__(self, logger: tracking.RunLogger, status: StatusFile, label: str):
        from tqdm.auto import tqdm

        self.logger, self.status, self.bar = logger, status, tqdm(desc=label, unit="step", dynamic_ncols=True)

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
        if self.bar.total != max_steps:  # the first call, once set-up is done: the bar's clock starts here
            self.bar.reset(total=max_steps)
            self.bar.initial = step  # a resumed run: speed counts only the steps of this process
        self.bar.n = step
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.refresh()
        self.status.update(step=step, max_steps=max_steps, loss=loss, speed=speed)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def variant_name(cfg, overrides: list[str] | None) -> str:
    if cfg.tracking.variant:
        return cfg.tracking.variant
    return ",".join(o for o in (overrides or []) if not o.startswith(("hydra", "tracking"))) or "default"


class _StopOnSignal:
    """First SIGINT/SIGTERM: ask the loop to stop after this step; a second SIGINT: stop at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing the current step, saving, then stopping (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def run_job(cfg, *, output_dir: Path, sweep_dir: Path | None = None, overrides: list[str] | None = None,
            tags: dict[str, str] | None = None) -> JobOutcome:
    """Train one config as an MLflow run (a new one, or the unfinished one its latest state belongs to). Config,
    path and tracking-store errors are raised before any run exists. `tags` are added to the run's tags (sweep.py
    adds the Hydra job number and group choices the report orders and compares by)."""
    make_paths_absolute(cfg)  # before the hash: a relative path means where the command was started
    label = variant_name(cfg, overrides)
    status = StatusFile(label)
    chash = config_hash(cfg)
    try:
        validate(cfg)
        checked = preflight_lib.check_job(cfg)  # files: data, captions, buckets, prompts, lr groups, resume state
        if checked.problems:
            raise checked.error()
        preflight_lib.announce(checked.fallbacks)
        uri = tracking.tracking_uri(cfg.tracking.uri)
        state_root = preflight(cfg, Path(output_dir), uri)
        client = tracking.client(uri)
        exp_id = tracking.experiment_id(client, cfg.tracking.experiment)
        artifacts = tracking.local_artifact_folder(client, exp_id)
        if artifacts is not None:
            check_writable(artifacts, "tracking.uri (artifact folder)")
    except UserError as exc:
        status.update(force=True, state="failed", reason=str(exc))
        raise
    if cfg.sweep.skip_finished:
        done = tracking.find_finished(client, exp_id, chash)
        if done:
            log.info("skipped %s: config %s already FINISHED as run %s (sweep.skip_finished=false to rerun)",
                     label, chash, done)
            status.update(force=True, state="skipped", run_id=done, reason=f"finished as run {done}")
            return JobOutcome("SKIPPED", done, reason=f"finished as run {done}")

    resume_from, continued_run = plan_resume(cfg, client, exp_id, chash, state_root)
    tags = {tracking.ROLE: "job", "variant": label, "config_hash": chash, "git_commit": git_commit(),
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "output_dir": str(output_dir), **(tags or {})}
    pending = Path(output_dir) / "mlflow_pending.json"
    parent = _parent_run_id(sweep_dir)
    if parent:
        tags["mlflow.parentRunId"] = parent  # a continued run moves to the sweep that continues it
    if resume_from:
        tags["lora_sweep.resumed_from"] = str(resume_from)
    if continued_run:
        logger = tracking.RunLogger.reopen(client, continued_run, tags=tags, flush_every=cfg.tracking.flush_every,
                                           pending_file=pending)
    else:
        logger = tracking.RunLogger.start(client, exp_id, name=label, tags=tags, flush_every=cfg.tracking.flush_every,
                                          pending_file=pending)
    logger.log_params(flatten(to_container(cfg)))
    log_fallbacks(logger, checked, Path(output_dir))
    status.update(force=True, run_id=logger.run_id)
    sink = JobSink(logger, status, label)
    from lora_sweep.training.train import NonFiniteLoss, StateTarget, train

    states = StateTarget(run_folder(state_root, chash, logger.run_id), logger.run_id, chash, resume_from)
    outcome = JobOutcome("FAILED", logger.run_id)
    try:
        with _StopOnSignal() as stop:
            result = train(cfg, output_dir=output_dir, sink=sink, should_stop=lambda: stop.requested, states=states)
        outcome = JobOutcome("KILLED" if result.stopped_early else "FINISHED", logger.run_id,
                             reason="stopped by signal" if result.stopped_early else "",
                             final_loss=result.final_loss, files=result.files)
    except KeyboardInterrupt:
        outcome.status, outcome.reason = "KILLED", "interrupted (Ctrl-C twice)"
    except (UserError, NonFiniteLoss) as exc:
        outcome.reason = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # OOM, disk full, anything else (then with the traceback's tail)
        outcome.reason = failure_reason(cfg, exc)
    finally:
        sink.bar.close()
        spilled = logger.end(outcome.status, outcome.reason or None)
        status.update(force=True, state={"FINISHED": "finished", "KILLED": "killed"}.get(outcome.status, "failed"),
                      reason=outcome.reason.splitlines()[0] if outcome.reason else "", final_loss=outcome.final_loss,
                      **({"mlflow_pending": str(spilled)} if spilled else {}))
    _closing_line(cfg, outcome, client.tracking_uri)
    return outcome


def log_fallbacks(logger: tracking.RunLogger, checked: preflight_lib.Report, output_dir: Path) -> None:
    """The pre-flight's warnings on the run: `data.warnings` (how many) and, if any, `data/warnings.txt` (each
    with every path it concerns), so a sweep's report can show what trained on something other than asked."""
    logger.log_params({"data.warnings": len(checked.fallbacks)})
    if checked.fallbacks:
        logger.log_artifact(write_text(Path(output_dir) / "warnings.txt", checked.warnings_text()), "data")


def preflight(cfg, output_dir: Path, uri: str) -> Path:
    """Every folder this job writes, proven writable before the model loads; returns the state root."""
    from lora_sweep.training.session import cache_root, state_root

    check_writable(output_dir, "train.output_dir")
    root = check_writable(state_root(cfg), "train.state_dir")
    check_writable(cache_root(cfg), "data.cache_dir")
    store = sqlite_store_folder(uri)
    if store is not None:
        check_writable(store, f"tracking.uri ({uri})")
    check_free_space({output_dir: ("train.output_dir", 0), root: ("train.state_dir", 0)})
    return root


def plan_resume(cfg, client, exp_id: str, chash: str, root: Path) -> tuple[Path | None, str | None]:
    """(state to resume from, MLflow run to continue). auto: the newest state of an unfinished run of this config
    hash in this store; PATH: that state (in its own run if that run is this config's and unfinished)."""
    mode = cfg.train.resume
    if mode == "never":
        return None, None

    def resumable(run_id: str) -> bool:
        return tracking.resumable_run(client, exp_id, run_id)

    if mode == "auto":
        state = find_resumable(root / chash, resumable)
        if state is not None:
            log.info("resuming config %s from %s (train.resume=never to start over)", chash, state)
        return state, (state.parent.name if state is not None else None)
    state = resolve_state_arg(mode)
    meta = read_meta(state)
    if meta["config_hash"] != chash:
        log.warning("train.resume: %s was saved by config %s, this is %s: resuming its weights and optimizer in a new "
                    "run", state, meta["config_hash"], chash)
        return state, None
    newest = list_states(state.parent)
    same_run = resumable(meta["run_id"]) and newest and newest[-1].resolve() == state.resolve()
    return state, (meta["run_id"] if same_run else None)  # an older state starts a new run: one timeline per run


def _parent_run_id(sweep_dir: Path | None) -> str | None:
    if sweep_dir is None:
        return None
    marker = Path(sweep_dir) / tracking.PARENT_FILE
    return marker.read_text().strip() if marker.exists() else None


def _closing_line(cfg, outcome: JobOutcome, uri: str) -> None:
    where = f"MLflow run {outcome.run_id} in experiment '{cfg.tracking.experiment}' ({uri})"
    if outcome.status == "FINISHED":
        log.info("FINISHED %s: final loss %.4f; LoRA: %s (kohya) and %s (diffusers). Browse with `make ui`.",
                 where, outcome.final_loss, outcome.files["kohya"], outcome.files["diffusers"])
    else:
        log.error("%s %s: %s", outcome.status, where, (outcome.reason or "").splitlines()[0] if outcome.reason else "")
