"""Helpers for the launcher tests: run the toy sweep as a real subprocess and read back what happened.

Every sweep runs with a unique GQ_TEST_TOKEN in its environment; every process it starts inherits it (jobs get the
launcher's environment), so `processes_with_token` finds anything left behind, whatever it was reparented to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
APP = Path(__file__).resolve().parent / "app.py"
PYTHON = sys.executable


def sweep_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_QUEUE_", "HYDRA_"))}
    env.update(PYTHONPATH=str(ROOT), GQ_TEST_TOKEN=uuid.uuid4().hex, PYTHONUNBUFFERED="1", **extra)
    return env


def toy_command(record_dir: Path, labels: Iterable[str], *overrides: str) -> list[str]:
    return [PYTHON, str(APP), "-m", f"label={','.join(labels)}", f"record_dir={record_dir}", *overrides]


def run_sweep(record_dir: Path, labels: Iterable[str], *overrides: str, timeout: float = 60,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(toy_command(record_dir, labels, *overrides), cwd=ROOT, env=env or sweep_env(),
                          capture_output=True, text=True, timeout=timeout)


def records(record_dir: Path) -> dict[str, dict[str, Any]]:
    """What each toy job recorded about itself (only jobs that got to return)."""
    return {p.stem: json.loads(p.read_text()) for p in (record_dir / "records").glob("*.json")}


def summary(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The launcher's per-job summary, by toy label."""
    data = json.loads((sweep_dir / "gpu_queue_summary.json").read_text())
    return {next(o.split("=", 1)[1] for o in job["overrides"] if o.startswith("label=")): job for job in data["jobs"]}


def status_files(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """Each job's status file (hydra_plugins/_job_outcome.py), by toy label."""
    out = {}
    for path in sweep_dir.glob(".job_status/*.json"):
        data = json.loads(path.read_text())
        out[data["label"]] = data
    return out


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def processes_with_token(token: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose environment carries `token`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            if proc.environ().get("GQ_TEST_TOKEN") == token:
                found.append((proc.pid, " ".join(proc.info["cmdline"] or [])[:200]))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def no_processes_left(token: str, timeout: float = 10) -> list[tuple[int, str]]:
    """Wait up to `timeout` for every tokened process to be gone; return the ones that are not."""
    wait_until(lambda: not processes_with_token(token), timeout, interval=0.2)
    return processes_with_token(token)
