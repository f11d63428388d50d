"""What the gpu_queue and Slurm launchers share about a job's end: the status file and how logs are read.

The status file is a JSON object a job keeps about itself (hydra_plugins/gpu_queue_launcher describes its keys):
`STATUS_ENV` names it in the job's environment, and every launcher puts it at `status_path(sweep dir, job number)`,
`<sweep dir>/.job_status/<job number>.json`, so a job that is given no path (Ray, the basic launcher) can still
find its own from its sweep folder and number, and a reader of the sweep folder finds them all.

Knows Hydra and files, nothing of what a job does (tests/test_layout.py). The leading underscore keeps Hydra's
plugin scan from executing this module a second time (a scan re-runs every `hydra_plugins` module it finds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATUS_ENV = "GPU_QUEUE_STATUS_FILE"
STATUS_DIR = ".job_status"


def status_path(sweep_dir: str | os.PathLike, job_num: int) -> Path:
    """Where job `job_num` of the sweep in `sweep_dir` keeps its status file."""
    return Path(sweep_dir) / STATUS_DIR / f"{int(job_num)}.json"


def read_status(path: str | os.PathLike | None) -> dict[str, Any]:
    """A status file's object ({} when absent or unreadable: it is replaced by rename, so never half written)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def headline(reason: str) -> str:
    """The first line of a reason; a header line ending in ':' ("Invalid configuration:") takes the next one too."""
    lines = [line.strip() for line in (reason or "").strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def log_tail(path: str | os.PathLike, lines: int) -> str:
    """The last `lines` non-blank lines of a log (its last 64 KiB read; tqdm's carriage returns end lines too)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join(kept[-lines:]) if lines > 0 else ""
