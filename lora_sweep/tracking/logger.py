"""One MLflow run's logger (`RunLogger`): params, tags, batched metrics, artifacts, images and its end status, all
sent by a background writer so that training never waits on the store."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_sweep.tracking.store import FAILURE, MAX_PARAM_CHARS, MAX_TAG_CHARS, first_line, fit, last_logged_step

log = logging.getLogger(__name__)


class RunLogger:
    """One MLflow run: params, tags, batched metrics, artifacts, images, and its end status.

    Every call only queues (a bounded buffer of `max_held` metrics); one writer thread sends the queue in order and,
    while the store is unreachable (an error, or a call unanswered for `stall_s` seconds, e.g. a sqlite store locked
    by another process), retries every `retry_s` seconds. What overflows the buffer, or is still unsent
    `end_wait_s` after `end`, goes to `pending_file` (`tracking.replay` sends it later, end status included). A
    resumed run skips steps up to `skip_through_step`, so each history holds each step once; that step itself is
    checked key by key (it may have been cut short) and its images go again (the report takes the newest).
    """

    def __init__(self, mlflow_client, run_id: str, flush_every: int = 25, pending_file: Path | None = None, *,
                 max_held: int = 200_000, retry_s: float = 5.0, end_wait_s: float = 30.0, stall_s: float = 3.0):
        self.client, self.run_id, self.flush_every = mlflow_client, run_id, max(1, flush_every)
        self.pending_file = pending_file
        self.max_held, self.retry_s, self.end_wait_s, self.stall_s = max_held, retry_s, end_wait_s, stall_s
        self.skip_through_step = -1
        self._batch: list = []  # this step's and the last few steps' metrics, handed over every flush_every steps
        self._known_params: dict[str, str] = {}  # a reopened run's params (MLflow refuses to change one)
        self._logged_at_boundary: dict[str, bool] = {}  # key -> already has a value at skip_through_step
        self._steps_since_flush = 0
        self._current_step: int | None = None
        self._queue: collections.deque = collections.deque()  # (kind, payload), sent in order by the writer
        self._held = 0  # metrics in the queue
        self._wake = threading.Condition()
        self._closing = self._abandoned = False
        self._failing_since: float | None = None
        self._sending_since: float | None = None  # when the writer's call in flight began
        self._refused: Exception | None = None
        self._spilled_early = 0
        self._staging: Path | None = None  # artifacts waiting for the writer (links or copies)
        self._staged = 0
        self.seconds_in_mlflow = 0.0  # time the training thread spent in this logger, for the benchmark
        self._writer = threading.Thread(target=self._write, name=f"mlflow-writer-{run_id[:8]}", daemon=True)
        self._writer.start()

    @classmethod
    def start(cls, mlflow_client, exp_id: str, *, name: str, tags: Mapping[str, str], flush_every: int = 25,
              pending_file: Path | None = None, **options):
        run = mlflow_client.create_run(exp_id, run_name=name, tags=dict(tags))
        return cls(mlflow_client, run.info.run_id, flush_every, pending_file, **options)

    @classmethod
    def reopen(cls, mlflow_client, run_id: str, *, tags: Mapping[str, str], flush_every: int = 25,
               pending_file: Path | None = None, **options):
        """Continue an unfinished run: RUNNING again, its failure tag cleared, already-logged steps skipped."""
        run = mlflow_client.get_run(run_id)
        mlflow_client.update_run(run_id, status="RUNNING")
        if FAILURE in run.data.tags:
            mlflow_client.delete_tag(run_id, FAILURE)
        logger = cls(mlflow_client, run_id, flush_every, pending_file, **options)
        logger.skip_through_step = last_logged_step(mlflow_client, run_id)
        resumes = int(run.data.tags.get("lora_sweep.resumes", "0")) + 1
        logger.set_tags({**tags, "lora_sweep.resumes": resumes})
        logger._known_params = dict(run.data.params)
        return logger

    # ------------------------------------------------------------------------------------------ training thread

    def _put(self, kind: str, payload: Any, size: int = 0) -> None:
        start = time.perf_counter()
        with self._wake:
            self._queue.append((kind, payload))
            self._held += size
            if self._held > self.max_held:
                self._overflow()
            self._wake.notify_all()
        self.seconds_in_mlflow += time.perf_counter() - start

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue params; on a reopened run only new keys (MLflow refuses to change a param)."""
        from mlflow.entities import Param

        fresh = {k: str(v) for k, v in params.items() if k not in self._known_params}
        self._known_params.update(fresh)  # a param logged twice with another value would fail the whole batch
        cut = sorted(k for k, v in fresh.items() if len(v) > MAX_PARAM_CHARS)
        if fresh:
            self._put("params", [Param(k, fit(v, MAX_PARAM_CHARS, "the run's config.yaml")) for k, v in fresh.items()])
        if cut:
            self.set_tags({"lora_sweep.cut_params": fit(", ".join(cut), MAX_TAG_CHARS, "config.yaml")})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._put("tags", [RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics for `step`; handed to the writer every `flush_every` steps when the next step begins (a
        step's metrics together), and at `flush()`."""
        from mlflow.entities import Metric

        self._check_stalled()
        if step < self.skip_through_step:
            return
        if step != self._current_step:
            if self._steps_since_flush >= self.flush_every:
                self._hand_over()
            self._current_step = step
            self._steps_since_flush += 1
        now = int(time.time() * 1000)
        self._batch += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]

    def _hand_over(self) -> None:
        self._steps_since_flush = 0
        if self._batch:
            batch, self._batch = self._batch, []
            self._put("metrics", batch, len(batch))

    def log_image(self, image, key: str, step: int) -> None:
        if step >= self.skip_through_step:
            self._hand_over()  # an image goes with (after) the metrics of its step
            self._put("image", (image.copy(), key, int(step)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file or folder; a hard link (else a copy) is taken now, so the caller may overwrite or delete it."""
        self._put("artifact", (self._stage(Path(path)), artifact_path))

    def _stage(self, path: Path) -> Path:
        import tempfile

        if self._staging is None:
            folder = self.pending_file.parent if self.pending_file else None
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix="mlflow-sending-", dir=folder))
        self._staged += 1
        staged = self._staging / f"{self._staged:05d}" / path.name
        staged.parent.mkdir()
        if path.is_dir():
            shutil.copytree(path, staged, copy_function=_link_or_copy)
        else:
            _link_or_copy(path, staged)
        return staged

    def flush(self, wait_s: float = 0.5) -> bool:
        """Hand everything to the writer and wait up to `wait_s` while the store answers (not at all while it is
        unreachable), so that a state written next rarely runs ahead of its metrics (what is unsent then still
        reaches the store, or the pending file at `end`); True if the store has it all."""
        self._check_stalled()
        self._hand_over()
        start = time.perf_counter()
        with self._wake:
            self._wake.wait_for(lambda: not self._queue or self._failing_since is not None, timeout=wait_s)
            sent = not self._queue
        self.seconds_in_mlflow += time.perf_counter() - start
        return sent

    def end(self, status: str, reason: str | None = None) -> Path | None:
        """Close the run as FINISHED, FAILED or KILLED, recording why it did not finish: waits up to `end_wait_s`
        for the writer (once, without retries, when the store is unreachable). Returns the pending file when the
        store did not take everything, the end status included (the run then still shows RUNNING there)."""
        self._hand_over()
        self._put("end", (status, reason))
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._writer.join(self.end_wait_s)
        with self._wake:
            self._abandoned = True  # a call still hanging in the writer is spilled too (replays are idempotent)
            left, self._queue = list(self._queue), collections.deque()
        try:
            if not left and not self._spilled_early:
                return None
            return self._spill(left, at_end=True)
        finally:
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
                with contextlib.suppress(OSError):  # a run folder made only for the staging
                    self._staging.parent.rmdir()

    # ---------------------------------------------------------------------------------------------- writer thread

    def _write(self) -> None:
        """Send the queue in order; an outage keeps the item and retries it (once more only when closing)."""
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._queue or self._closing or self._abandoned)
                if self._abandoned or not self._queue:
                    return
                kind, payload = self._queue[0]
                self._sending_since = time.monotonic()
            try:
                self._send(kind, payload)
            except Exception as exc:
                self._sending_since = None
                if getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE":
                    self._refused = self._refused or exc  # the store answered and refused: the run fails, not waits
                else:
                    self._unreachable(exc)
                    with self._wake:
                        if self._closing:
                            return
                        self._wake.wait(self.retry_s)  # `end` wakes it for one last try
                    continue
            with self._wake:
                if self._abandoned:
                    return
                self._queue.popleft()
                self._sending_since = None
                back, held = self._failing_since, self._held  # counted before this item's metrics leave it
                self._held -= len(payload) if kind == "metrics" else 0
                self._failing_since = None
                self._wake.notify_all()
            if back is not None:
                log.warning("MLflow store %s reachable again after %.0f s: sending the %d metrics held meanwhile",
                            self.client.tracking_uri, time.monotonic() - back, held)

    def _send(self, kind: str, payload: Any) -> None:
        run_id, client = self.run_id, self.client
        if kind == "metrics":
            metrics = [m for m in payload if m.step != self.skip_through_step or not self._logged_at_skip_step(m.key)]
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i:i + 1000])
        elif kind == "params":
            for i in range(0, len(payload), 100):
                client.log_batch(run_id, params=payload[i:i + 100])
        elif kind == "tags":
            client.log_batch(run_id, tags=payload)
        elif kind == "image":
            image, key, step = payload
            client.log_image(run_id, image, key=key, step=step)
        elif kind == "artifact":
            path, artifact_path = payload
            client.log_artifact(run_id, str(path), artifact_path)
            shutil.rmtree(path.parent, ignore_errors=True)  # the staged link or copy
        elif kind == "end":
            status, reason = payload
            if self._refused is not None:  # the run cannot count as finished
                status, reason = "FAILED", f"MLflow refused the run's data: {self._refused}\n{reason or ''}"
            if reason:
                client.set_tag(run_id, FAILURE, fit(reason, MAX_TAG_CHARS, "the job's log"))
            client.set_terminated(run_id, status=status)

    def _logged_at_skip_step(self, key: str) -> bool:
        if key not in self._logged_at_boundary:
            history = self.client.get_metric_history(self.run_id, key)
            self._logged_at_boundary[key] = any(m.step == self.skip_through_step for m in history)
        return self._logged_at_boundary[key]

    def _check_stalled(self) -> None:
        """(Training thread.) Count a writer call unanswered for `stall_s` as an outage, so it is said at once."""
        since = self._sending_since
        if since is None or self._failing_since is not None or time.monotonic() - since < self.stall_s:
            return
        with self._wake:
            stalled = self._sending_since == since and self._failing_since is None
        if stalled:
            self._unreachable(TimeoutError(f"a call has had no answer for {self.stall_s:g} s"))

    def _unreachable(self, exc: Exception) -> None:
        with self._wake:
            first = self._failing_since is None
            if first:
                self._failing_since = time.monotonic()
            self._wake.notify_all()  # a waiting `flush` stops waiting
        if first:
            log.warning("MLflow store %s unreachable (%s): training goes on; up to %d metrics are held in memory "
                        "and sent when it is back, more go to %s", self.client.tracking_uri, first_line(exc),
                        self.max_held, self.pending_file or "the log")

    # ------------------------------------------------------------------------------------------------- spilling

    def _overflow(self) -> None:
        """(Holding `_wake`.) Move queued metrics, oldest first but never the one in flight, to the pending file."""
        moved = [item for item in list(self._queue)[1:] if item[0] == "metrics"]
        for item in moved:
            self._queue.remove(item)
        count = sum(len(payload) for _, payload in moved)
        self._held -= count
        self._spill(moved, at_end=False)
        self._spilled_early += count

    def _spill(self, items: list, *, at_end: bool) -> Path | None:
        """Add `items` to the pending file and say what went there (at the end: everything held so far)."""
        from lora_sweep.tracking.replay import spill

        uri, metrics = self.client.tracking_uri, sum(len(p) for kind, p in items if kind == "metrics")
        metrics += self._spilled_early if at_end else 0
        if self.pending_file is None:
            log.error("MLflow store %s unreachable: run %s lost %d metrics and %d other records (no pending file)",
                      uri, self.run_id, metrics, len(items))
            return None
        spill(self.pending_file, self.run_id, uri, items)
        if not at_end:
            log.warning("MLflow store %s still unreachable: %d held metrics moved to %s", uri, metrics,
                        self.pending_file)
        else:
            ended = any(kind == "end" for kind, _ in items)
            log.error("MLflow store %s did not take all of run %s: %d metrics%s kept in %s; the LoRA files are on "
                      "local disk", uri, self.run_id, metrics, " and the run's end status" if ended else "",
                      self.pending_file)
        return self.pending_file


def _link_or_copy(source, target) -> None:
    """A hard link (instant, and the caller's later rewrite or removal leaves it intact), else a copy."""
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)
