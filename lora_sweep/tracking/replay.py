"""What a run could not send to its store, kept on disk (`spill`) and sent later (`replay`), end status included.

A pending file is JSON: run_id, tracking_uri, status and reason ("" while the run's end is not in it), params,
tags, metrics, images (PNG files beside it) and artifacts (copies beside it). Replaying sends what is missing and
then deletes the file and its copies, so a second replay sends nothing; MLflow itself keeps one row per identical
metric (key, step, timestamp, value), which covers a replay cut short.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from lora_sweep.atomic import write_text
from lora_sweep.tracking.store import FAILURE, MAX_TAG_CHARS, fit

log = logging.getLogger(__name__)
PENDING_NAME = "mlflow_pending.json"  # in the run's state folder, where the next run of its config finds it


def _copies(path: Path) -> Path:
    return path.with_name(path.stem + "_files")


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _write(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1))


def spill(path: Path, run_id: str, tracking_uri: str, items: list) -> None:
    """Add the logger's queued `items` ((kind, payload) pairs) to the pending file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read(path) if path.exists() else {
        "run_id": run_id, "tracking_uri": tracking_uri, "status": "", "reason": None,
        "params": {}, "tags": {}, "metrics": [], "images": [], "artifacts": []}
    folder = _copies(path)
    for kind, payload in items:
        if kind == "metrics":
            data["metrics"] += [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                                for m in payload]
        elif kind == "params":
            data["params"].update({p.key: p.value for p in payload})
        elif kind == "tags":
            data["tags"].update({t.key: t.value for t in payload})
        elif kind == "image":
            image, key, step = payload
            folder.mkdir(exist_ok=True)
            file = folder / f"image{len(data['images']):05d}.png"
            image.save(file)
            data["images"].append({"file": file.name, "key": key, "step": step})
        elif kind == "artifact":
            source, artifact_path = payload
            if not source.exists():
                log.warning("%s was removed before it could be kept for MLflow run %s", source, run_id)
                continue
            folder.mkdir(exist_ok=True)
            copy = folder / f"{len(data['artifacts']):04d}" / source.name
            copy.parent.mkdir()
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, copy)
            data["artifacts"].append({"file": str(copy.relative_to(folder)), "artifact_path": artifact_path})
        elif kind == "end":
            data["status"], data["reason"] = payload
    _write(path, data)


def ends_the_run(path: Path) -> bool:
    """True if the pending file holds its run's end status (the store then still shows the run RUNNING)."""
    return bool(_read(path).get("status"))


@dataclass
class Replayed:
    run_id: str
    metrics: int
    others: int  # params, tags, images, artifacts
    status: str  # the end status set, "" if the file had none


def replay(path: Path, client=None) -> Replayed:
    """Send the pending file at `path` to its store (or `client`'s), then delete it and its copies.

    Raises whatever the store raises; what was sent before stays sent, and the file keeps the rest."""
    from mlflow.entities import Metric, Param, RunTag
    from PIL import Image

    from lora_sweep.tracking.store import client as store_client

    data = _read(path)
    client = client or store_client(data["tracking_uri"])
    run_id, folder = data["run_id"], _copies(path)
    known = client.get_run(run_id).data.params
    params = [Param(k, v) for k, v in data["params"].items() if k not in known]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    if data["tags"]:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in data["tags"].items()])
    metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in data["metrics"]]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    others, tagged_failure = len(params) + len(data["tags"]), FAILURE in data["tags"]
    data.update(params={}, tags={}, metrics=[])
    _write(path, data)  # images and artifacts are not idempotent: progress is kept
    while data["images"]:
        image = data["images"][0]
        with Image.open(folder / image["file"]) as opened:
            client.log_image(run_id, opened.copy(), key=image["key"], step=image["step"])
        data["images"].pop(0)
        others += 1
        _write(path, data)
    while data["artifacts"]:
        artifact = data["artifacts"][0]
        client.log_artifact(run_id, str(folder / artifact["file"]), artifact["artifact_path"])
        data["artifacts"].pop(0)
        others += 1
        _write(path, data)
    if data["status"]:
        if data["reason"]:
            client.set_tag(run_id, FAILURE, fit(data["reason"], MAX_TAG_CHARS, "the job's log"))
        elif not tagged_failure and FAILURE in client.get_run(run_id).data.tags:  # e.g. "marked KILLED" meanwhile
            client.delete_tag(run_id, FAILURE)
        client.set_terminated(run_id, status=data["status"])
    path.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    return Replayed(run_id, len(metrics), others, data["status"])


def pending_files(*roots: Path) -> list[Path]:
    """The pending files at or under `roots` (files as given, folders searched)."""
    found: list[Path] = []
    for root in roots:
        found += [root] if root.is_file() else sorted(root.rglob(PENDING_NAME)) if root.is_dir() else []
    return found


def replay_quietly(files: list[Path], client=None) -> list[Replayed]:
    """Replay each file; one warning line for each that the store does not take yet (the file stays)."""
    done = []
    for path in files:
        try:
            done.append(replay(path, client))
        except Exception as exc:  # noqa: BLE001  (the store is still down, or the run is gone: the file stays)
            from lora_sweep.tracking.store import first_line

            log.warning("could not replay %s yet (%s); `python -m lora_sweep replay %s` sends it later", path,
                        first_line(exc), path)
            continue
        log.info("replayed %s into MLflow run %s: %d metrics, %d other records%s", path, done[-1].run_id,
                 done[-1].metrics, done[-1].others, f", status {done[-1].status}" if done[-1].status else "")
    return done

