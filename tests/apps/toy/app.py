"""A toy Hydra app for the launcher tests: a pretend training that knows nothing of launchers.

It records where and when it ran (records/<label>.json: pid, CUDA_VISIBLE_DEVICES, slot, entered/returned times),
keeps the launchers' status file (hydra_plugins/_job_outcome.py), hands its outcome to the launcher as a job of
lora-sweep does (returns a JobOutcome, or raises JobNotFinished carrying one), stops cleanly on the first SIGINT
or SIGTERM (KILLED, naming it), and fails on demand: `fail=true` (with `fail_mode`), or per label while
`<fail_dir>/<label>.fail` exists (its text is the mode). Modes: raise, signal (SIGKILL itself, like the OOM
killer), nan (a FAILED outcome, the user's error), exit (os._exit(3)), sysexit (sys.exit(1)).
A finished config leaves done/<hash>; with skip_finished the next sweep reports it SKIPPED, as the real job does
with MLflow. Run with the repository root on PYTHONPATH so Hydra finds hydra_plugins.gpu_queue_launcher.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig
from toy_setup import setup

from hydra_plugins._job_outcome import JobNotFinished, JobOutcome


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class Status:
    def __init__(self, label: str):
        path = os.environ.get("GPU_QUEUE_STATUS_FILE")
        self.path = Path(path) if path else None
        self.data: dict = {"state": "running", "label": label}

    def update(self, **values) -> None:
        self.data.update(values)
        if self.path:
            write_json(self.path, self.data)


def fail_mode(cfg: DictConfig) -> str | None:
    if cfg.fail:
        return str(cfg.fail_mode)
    marker = Path(cfg.fail_dir) / f"{cfg.label}.fail"
    return (marker.read_text().strip() or "raise") if marker.exists() else None


def fail_now(mode: str, status: Status, step: int) -> JobOutcome | None:
    if mode == "raise":
        raise RuntimeError(f"toy job {status.data['label']} asked to fail at step {step}")
    if mode == "signal":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "nan":
        status.update(state="failed", loss=float("nan"), reason=f"loss is NaN at step {step}")
        return JobOutcome("FAILED", reason=f"loss is NaN at step {step}", user_error=True)
    if mode == "exit":
        sys.stdout.flush()
        os._exit(3)
    if mode == "sysexit":
        sys.exit(1)
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="toy")
def main(cfg: DictConfig) -> JobOutcome:
    entered = time.time()
    record_dir = Path(cfg.record_dir)
    (record_dir / "records").mkdir(parents=True, exist_ok=True)
    (record_dir / "done").mkdir(parents=True, exist_ok=True)
    label = str(cfg.label)
    record = {"label": label, "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "slot": os.environ.get("GPU_QUEUE_SLOT"), "entered": entered}
    print(f"toy {label}: pid {os.getpid()} CUDA_VISIBLE_DEVICES={record['cuda_visible_devices']!r}", flush=True)
    status = Status(label)
    config_hash = hashlib.sha1(f"{label}/{cfg.steps}".encode()).hexdigest()[:10]
    done = record_dir / "done" / config_hash
    if cfg.skip_finished and done.exists():
        reason = f"config {config_hash} already finished"
        status.update(state="skipped", run_id=done.read_text(), reason=reason)
        return JobOutcome("SKIPPED", done.read_text(), reason)
    outcome = train(cfg, status, entered)
    if outcome.status == "FINISHED":
        done.write_text(outcome.run_id)
    record.update(returned=time.time(), result=outcome.status.lower())
    write_json(record_dir / "records" / f"{label}.json", record)
    print(f"toy {label}: {outcome.status.lower()}", flush=True)
    if outcome.status != "FINISHED":
        raise JobNotFinished(outcome)
    return outcome


def train(cfg: DictConfig, status: Status, entered: float) -> JobOutcome:
    """The pretend training: `steps` steps over `sleep_s` seconds, a clean stop on SIGINT/TERM, the failure asked."""
    stop: dict = {"by": None}
    try:  # as lora-sweep's job: the first SIGINT or SIGTERM stops it cleanly
        handler = signal.SIG_IGN if cfg.ignore_sigint else (lambda signum, _: stop.update(by=stop["by"] or signum))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)
    except ValueError:  # not the main thread (some launchers): no clean stop, nothing else changes
        pass
    mode = fail_mode(cfg)
    for step in range(1, cfg.steps + 1):
        if stop["by"]:
            reason = f"stopped at step {step - 1} by {signal.Signals(stop['by']).name}"
            status.update(state="killed", reason=reason)
            return JobOutcome("KILLED", reason=reason)
        time.sleep(cfg.sleep_s / cfg.steps)
        speed = f"{step / max(time.time() - entered, 1e-6):.1f} it/s"
        status.update(step=step, max_steps=cfg.steps, loss=1.0 / step, speed=speed)
        failed = fail_now(mode, status, step) if mode and step == max(1, cfg.steps // 2) else None
        if failed is not None:
            return failed
    run_id = f"run-{status.data['label']}-{os.getpid()}"
    status.update(state="finished", run_id=run_id)
    return JobOutcome("FINISHED", run_id, final_loss=1.0 / cfg.steps)


if __name__ == "__main__":
    setup()
    main()
