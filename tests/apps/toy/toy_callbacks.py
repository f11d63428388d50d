"""A Hydra Callback that cannot be pickled (it holds a lock, as a callback holding a client or a connection might):
the gpu_queue launcher must still run the jobs, with fresh instances built from hydra.callbacks in each job."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class LockedCallback(Callback):
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        marker = Path(config.record_dir) / "callbacks" / f"{config.label}.{os.getpid()}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("on_job_start")
