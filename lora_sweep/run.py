"""One job's life: validate, skip if already finished, an MLflow (child) run around `train`, an honest end status.

Knows MLflow and the queue's status-file protocol; knows nothing of launchers. Every way a job can end maps to one
MLflow status: FINISHED (trained to max_steps), KILLED (Ctrl-C / SIGTERM: stopped cleanly), FAILED (with the reason
as the `lora_sweep.failure` tag). A run is never left RUNNING and never marked FINISHED without its LoRA files.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from lora_sweep import tracking
from lora_sweep.atomic import write_text
from lora_sweep.config import config_hash, flatten, to_container
from lora_sweep.errors import UserError
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

    def progress(self, step, max_steps, loss, speed):
        self.bar.total = max_steps
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


def run_job(cfg, *, output_dir: Path, sweep_dir: Path | None = None, overrides: list[str] | None = None) -> JobOutcome:
    """Train one config as an MLflow run. Config errors are raised before any run exists."""
    label = variant_name(cfg, overrides)
    status = StatusFile(label)
    try:
        validate(cfg)
    except UserError as exc:
        status.update(force=True, state="failed", reason=str(exc))
        raise
    chash = config_hash(cfg)
    client = tracking.client(tracking.tracking_uri(cfg.tracking.uri))
    exp_id = tracking.experiment_id(client, cfg.tracking.experiment)
    if cfg.sweep.skip_finished:
        done = tracking.find_finished(client, exp_id, chash)
        if done:
            log.info("skipped %s: config %s already FINISHED as run %s (sweep.skip_finished=false to rerun)",
                     label, chash, done)
            status.update(force=True, state="skipped", run_id=done, reason=f"finished as run {done}")
            return JobOutcome("SKIPPED", done, reason=f"finished as run {done}")

    parent = _parent_run_id(sweep_dir)
    tags = {tracking.ROLE: "job", "variant": label, "config_hash": chash, "git_commit": git_commit(),
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "output_dir": str(output_dir)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    logger = tracking.RunLogger.start(client, exp_id, name=label, tags=tags, flush_every=cfg.tracking.flush_every)
    logger.log_params(flatten(to_container(cfg)))
    status.update(force=True, run_id=logger.run_id)
    sink = JobSink(logger, status, label)
    from lora_sweep.train import NonFiniteLoss, train

    outcome = JobOutcome("FAILED", logger.run_id)
    try:
        with _StopOnSignal() as stop:
            result = train(cfg, output_dir=output_dir, sink=sink, should_stop=lambda: stop.requested)
        outcome = JobOutcome("KILLED" if result.stopped_early else "FINISHED", logger.run_id,
                             reason="stopped by signal" if result.stopped_early else "",
                             final_loss=result.final_loss, files=result.files)
    except KeyboardInterrupt:
        outcome.status, outcome.reason = "KILLED", "interrupted (Ctrl-C twice)"
    except (UserError, NonFiniteLoss) as exc:
        outcome.reason = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # anything else: keep the traceback's tail as the reason
        outcome.reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    finally:
        sink.bar.close()
        logger.end(outcome.status, outcome.reason or None)
        status.update(force=True, state={"FINISHED": "finished", "KILLED": "killed"}.get(outcome.status, "failed"),
                      reason=outcome.reason.splitlines()[0] if outcome.reason else "", final_loss=outcome.final_loss)
    _closing_line(cfg, outcome, client.tracking_uri)
    return outcome


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
