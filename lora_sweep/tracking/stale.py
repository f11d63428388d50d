"""Runs left RUNNING by a process that is gone from this host: their pending end replayed, else marked KILLED."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

from lora_sweep.tracking.replay import PENDING_NAME, ends_the_run, replay
from lora_sweep.tracking.store import FAILURE, HOST, PID, PID_STARTED, ROLE, first_line, process_alive

log = logging.getLogger(__name__)


def close_stale_runs(mlflow_client, exp_id: str, *, by: str, state_root: Path | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs whose owning process is gone from this host; returns their ids.

    A run whose pending file (in `state_root`, or a sweep's folder) holds its end is not killed: the file is
    replayed, or, if the store refuses it, the run stays RUNNING and the replay command is named. Runs of other
    hosts or without an owner tag are left alone: their process cannot be checked from here.
    """
    host = socket.gethostname()
    try:
        runs = mlflow_client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=5000)
    except Exception as exc:
        log.warning("could not look for stale runs in experiment %s: %s", exp_id, exc)
        return []
    closed = []
    for run in runs:
        tags = run.data.tags
        if tags.get(HOST) != host or not str(tags.get(PID, "")).isdigit():
            continue
        pid, started = int(tags[PID]), tags.get(PID_STARTED)
        if process_alive(pid, float(started) if started else None) or _replayed_its_end(mlflow_client, run, pid,
                                                                                         state_root):
            continue
        reason = (f"its process ({pid} on {host}) ended without closing the run (killed, or the machine went down); "
                  f"marked KILLED by {by} at {time.strftime('%Y-%m-%d %H:%M:%S')}. Rerun the same command to "
                  "resume it from its newest training state.")
        try:
            mlflow_client.set_tag(run.info.run_id, FAILURE, reason)
            mlflow_client.set_terminated(run.info.run_id, status="KILLED")
        except Exception as exc:
            log.warning("could not mark stale run %s KILLED: %s", run.info.run_id, exc)
            continue
        closed.append(run.info.run_id)
        log.warning("MLflow run %s (%s) was left RUNNING by process %d, which is gone: marked KILLED",
                    run.info.run_id, run.info.run_name, pid)
    return closed


def _replayed_its_end(mlflow_client, run, pid: int, state_root: Path | None) -> bool:
    """Replay a dead process's pending file for `run`; True if the run ended there or must wait for a replay."""
    run_id, tags = run.info.run_id, run.data.tags
    found = sorted(Path(state_root).glob(f"*/{run_id}/{PENDING_NAME}")) if state_root is not None else []
    if tags.get(ROLE) == "sweep" and tags.get("sweep_dir"):  # a sweep's parent keeps its file in its folder
        found.append(Path(tags["sweep_dir"]) / PENDING_NAME)
    pending = next((p for p in found if p.is_file()), None)
    if pending is None:
        return False
    ended = ends_the_run(pending)
    try:
        done = replay(pending, mlflow_client)
    except Exception as exc:  # noqa: BLE001  (the file stays; the run is not killed, it waits for a replay)
        log.warning("MLflow run %s (%s) was left RUNNING by process %d, which is gone; its records in %s could not "
                    "be sent (%s): it stays RUNNING until `python -m lora_sweep replay %s`", run_id,
                    run.info.run_name, pid, pending, first_line(exc), pending)
        return ended
    log.info("MLflow run %s (%s) of process %d, which is gone: replayed %s (%d metrics, %d other records)%s", run_id,
             run.info.run_name, pid, pending, done.metrics, done.others,
             f", status {done.status}" if done.status else "")
    return bool(done.status)
