"""What a job reports while it runs: its status file (progress; the end of a job with no MLflow run of its own), the
trainer's sink (`JobSink`) and the stop-on-signal handler (`StopOnSignal`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra_plugins._job_outcome import STATUS_ENV, status_path
from lora_sweep import progress as progress_lib
from lora_sweep.atomic import write_text

log = logging.getLogger(__name__)


def status_file_path(sweep_dir: Path | None, job_num: int | None) -> Path | None:
    """This job's status file: `STATUS_ENV` if its launcher set it, else from the sweep folder and job number;
    None in a single run."""
    given = os.environ.get(STATUS_ENV)
    if given:
        return Path(given)
    return status_path(sweep_dir, job_num) if sweep_dir is not None and job_num is not None else None


class StatusFile:
    """The launcher's view of this job: rewritten atomically, at most twice a second unless forced."""

    def __init__(self, label: str, path: Path | None = None):
        self.path = path
        self.state = {"state": "running", "label": label}
        self._last = 0.0

    def update(self, force: bool = False, **values) -> None:
        self.state.update(values)
        if self.path and (force or time.monotonic() - self._last > 0.5):
            write_text(self.path, json.dumps(self.state))
            self._last = time.monotonic()


class JobSink:
    """The trainer's `Sink`: MLflow run logger + progress (a bar on a terminal, else a log line every
    `progress.EVERY_S` seconds and at the last step) + the queue's status file."""

    def __init__(self, logger: Any, status: StatusFile, label: str,  # logger: tracking.logger.RunLogger
                 on_warning: Callable[[Any], None] | None = None):
        from tqdm.auto import tqdm

        self.logger, self.status, self.label = logger, status, label
        self.bar = tqdm(desc=label, unit="step", dynamic_ncols=True, disable=not progress_lib.on_terminal())
        self.on_warning = on_warning
        self._last_line = time.monotonic()

    def warn(self, fallback) -> None:
        """Record a fallback found while training (an image that failed to decode) with the run's warnings."""
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
        """Step, loss and speed on the bar and in the status file; loss is None before the first step."""
        if self.bar.total != max_steps:  # first call, after set-up: the bar's clock starts here
            self.bar.reset(total=max_steps)
            self.bar.initial = step  # a resumed run: speed counts only the steps of this process
        self.bar.n = step
        shown = loss if step > 0 else None
        if shown is not None:
            self.bar.set_postfix(loss=f"{shown:.4f}", refresh=False)
        self.bar.refresh()
        self.status.update(step=step, max_steps=max_steps, loss=shown, speed=speed)
        due = step >= max_steps or time.monotonic() - self._last_line >= progress_lib.EVERY_S
        if self.bar.disable and step > 0 and due:  # no terminal: a log line now and then
            self._last_line = time.monotonic()
            log.info("training %s: step %d/%d%s%s", self.label, step, max_steps,
                     f", loss {shown:.4f}" if shown is not None else "", f", {speed}" if speed else "")


class StopOnSignal:
    """First SIGINT, SIGTERM or SIGHUP (unless ignored, as under nohup): stop after this step (sampling and evaluation
    give up at their next prompt, image or denoising step); `signum` is that signal. A second SIGINT raises
    KeyboardInterrupt."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None

    def __enter__(self):
        caught = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # a closed terminal: save a state too
            caught.append(signal.SIGHUP)
        self._old = {s: signal.signal(s, self._handle) for s in caught}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested, self.signum = True, signum
        again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
        log.warning("%s received: ending after the current step (no end-of-run sampling or evaluation), saving a "
                    "training state, then stopping%s", signal.Signals(signum).name, again)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
