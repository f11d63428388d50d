"""A toy Hydra app for the launcher tests: a pretend training that knows nothing of launchers.

It records where and when it ran (records/<label>.json: pid, CUDA_VISIBLE_DEVICES, slot, entered/returned times),
keeps the queue's status file, stops cleanly on the first SIGINT (state "killed"), and fails on demand: `fail=true`
(with `fail_mode`), or per label while `<fail_dir>/<label>.fail` exists (its text is the mode). Modes: raise,
signal (SIGKILL itself, like the OOM killer), nan (writes state "failed" and returns normally), exit (os._exit(3)),
sysexit (sys.exit(1)).
A finished config leaves done/<hash>; with skip_finished the next sweep reports it "skipped", as the real job
does with MLflow. Run with the repository root on PYTHONPATH so Hydra finds hydra_plugins.gpu_queue_launcher.
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


def fail_now(mode: str, status: Status, step: int) -> None:
    if mode == "raise":
        raise RuntimeError(f"toy job {status.data['label']} asked to fail at step {step}")
    if mode == "signal":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "nan":
        status.update(state="failed", loss=float("nan"), reason=f"loss is NaN at step {step}")
    if mode == "exit":
        sys.stdout.flush()
        os._exit(3)
    if mode == "sysexit":
        sys.exit(1)


@hydra.main(version_base="1.3", config_path="conf", config_name="toy")
def main(cfg: DictConfig) -> str:
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
        status.update(state="skipped", run_id=done.read_text(), reason=f"config {config_hash} already finished")
        return "skipped"

    stop = {"requested": False}
    try:
        handler = signal.SIG_IGN if cfg.ignore_sigint else (lambda *_: stop.update(requested=True))
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (some launchers): no clean stop, nothing else changes
        pass
    mode = fail_mode(cfg)
    result = "finished"
    for step in range(1, cfg.steps + 1):
        if stop["requested"]:
            status.update(state="killed", reason=f"stopped at step {step - 1}")
            result = "killed"
            break
        time.sleep(cfg.sleep_s / cfg.steps)
        loss = 1.0 / step
        speed = f"{step / max(time.time() - entered, 1e-6):.1f} it/s"
        status.update(step=step, max_steps=cfg.steps, loss=loss, speed=speed)
        if mode and step == max(1, cfg.steps // 2):
            fail_now(mode, status, step)
            if status.data["state"] == "failed":
                result = "failed"
                break
    if result == "finished":
        run_id = f"run-{label}-{os.getpid()}"
        status.update(state="finished", final_loss=1.0 / cfg.steps, run_id=run_id)
        done.write_text(run_id)
    record.update(returned=time.time(), result=result)
    write_json(record_dir / "records" / f"{label}.json", record)
    print(f"toy {label}: {result}", flush=True)
    return result


if __name__ == "__main__":
    setup()
    main()
