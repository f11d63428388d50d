"""One MLflow run's logger (`RunLogger`): params, tags, batched metrics, artifacts, images and its end status."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_sweep.tracking.store import FAILURE, MAX_PARAM_CHARS, MAX_TAG_CHARS, fit, last_logged_step

log = logging.getLogger(__name__)


class RunLogger:
    """One MLflow run: params, tags, batched metrics, artifacts, images, and its end status.

    An unreachable store never stops the training: what fails stays pending, is retried at each flush, and is
    written to `pending_file` (JSON) if still pending at the end. A resumed run skips steps up to
    `skip_through_step`, so each history holds each step once; that step itself is checked key by key (it may have
    been cut short) and its images go again (the report takes the newest).
    """

    def __init__(self, mlflow_client, run_id: str, flush_every: int = 25, pending_file: Path | None = None):
        self.client, self.run_id, self.flush_every = mlflow_client, run_id, max(1, flush_every)
        self.pending_file = pending_file
        self.skip_through_step = -1
        self._pending: list = []
        self._pending_params: list = []
        self._pending_images: list = []  # (image, key, step): sent with the metrics of their step
        self._pending_artifacts: list[tuple[Path, str | None]] = []  # copies of files that failed to upload
        self._known_params: dict[str, str] = {}  # a reopened run's params (MLflow refuses to change one)
        self._logged_at_boundary: dict[str, bool] = {}  # key -> already has a value at skip_through_step
        self._steps_since_flush = 0
        self._current_step: int | None = None
        self._failing_since: float | None = None
        self.seconds_in_mlflow = 0.0  # tracking overhead, for the benchmark

    @classmethod
    def start(cls, mlflow_client, exp_id: str, *, name: str, tags: Mapping[str, str], flush_every: int = 25,
              pending_file: Path | None = None):
        run = mlflow_client.create_run(exp_id, run_name=name, tags=dict(tags))
        return cls(mlflow_client, run.info.run_id, flush_every, pending_file)

    @classmethod
    def reopen(cls, mlflow_client, run_id: str, *, tags: Mapping[str, str], flush_every: int = 25,
               pending_file: Path | None = None):
        """Continue an unfinished run: RUNNING again, its failure tag cleared, already-logged steps skipped."""
        run = mlflow_client.get_run(run_id)
        mlflow_client.update_run(run_id, status="RUNNING")
        if "lora_sweep.failure" in run.data.tags:
            mlflow_client.delete_tag(run_id, "lora_sweep.failure")
        logger = cls(mlflow_client, run_id, flush_every, pending_file)
        logger.skip_through_step = last_logged_step(mlflow_client, run_id)
        resumes = int(run.data.tags.get("lora_sweep.resumes", "0")) + 1
        logger.set_tags({**tags, "lora_sweep.resumes": resumes})
        logger._known_params = dict(run.data.params)
        return logger

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds_in_mlflow += time.perf_counter() - start

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue params and flush; on a reopened run only new keys (MLflow refuses to change a param)."""
        from mlflow.entities import Param

        fresh = {k: str(v) for k, v in params.items() if k not in self._known_params}
        self._pending_params += [Param(k, fit(v, MAX_PARAM_CHARS, "the run's config.yaml")) for k, v in fresh.items()]
        self._known_params.update(fresh)  # a param logged twice with another value would fail the whole batch
        cut = sorted(k for k, v in fresh.items() if len(v) > MAX_PARAM_CHARS)
        if cut:
            self.set_tags({"lora_sweep.cut_params": fit(", ".join(cut), MAX_TAG_CHARS, "config.yaml")})
        self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._timed(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics for `step`; sent every `flush_every` steps when the next step begins (a step's metrics
        together), and at `flush()`.
        """
        from mlflow.entities import Metric

        if step < self.skip_through_step:
            return
        if step == self.skip_through_step:
            metrics = {k: v for k, v in metrics.items() if not self._logged_at_skip_step(k)}
            if not metrics:
                return
        if step != self._current_step:
            if self._steps_since_flush >= self.flush_every:
                self.flush()
            self._current_step = step
            self._steps_since_flush += 1
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]

    def _logged_at_skip_step(self, key: str) -> bool:
        if key not in self._logged_at_boundary:
            history = self._timed(self.client.get_metric_history, self.run_id, key)
            self._logged_at_boundary[key] = any(m.step == self.skip_through_step for m in history)
        return self._logged_at_boundary[key]

    def log_image(self, image, key: str, step: int) -> None:
        if step >= self.skip_through_step:
            self._pending_images.append((image, key, int(step)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        try:
            self._timed(self.client.log_artifact, self.run_id, str(path), artifact_path)
        except Exception as exc:  # keep a copy (the caller may delete its file) and retry at the next flush
            self._pending_artifacts.append((self._keep_copy(Path(path)), artifact_path))
            self._unreachable(exc)

    def _keep_copy(self, path: Path) -> Path:
        import shutil

        folder = (self.pending_file.parent if self.pending_file else Path.cwd()) / "mlflow_pending_artifacts"
        folder.mkdir(parents=True, exist_ok=True)
        copy = folder / f"{len(self._pending_artifacts):04d}_{path.name}"
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
        return copy

    def flush(self) -> bool:
        """Send everything pending; True if the store took it all. A failure keeps it pending for the next flush."""
        self._steps_since_flush = 0
        try:
            while self._pending_params:
                self._timed(self.client.log_batch, self.run_id, params=self._pending_params[:100])
                self._pending_params = self._pending_params[100:]
            while self._pending:
                self._timed(self.client.log_batch, self.run_id, metrics=self._pending[:1000])
                self._pending = self._pending[1000:]
            while self._pending_images:
                image, key, step = self._pending_images[0]
                self._timed(self.client.log_image, self.run_id, image, key=key, step=step)
                self._pending_images.pop(0)
            while self._pending_artifacts:
                path, artifact_path = self._pending_artifacts[0]
                self._timed(self.client.log_artifact, self.run_id, str(path), artifact_path)
                self._pending_artifacts.pop(0)
        except Exception as exc:
            if getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE":
                raise  # the store answered and refused the data: a bug to report, not an outage to wait out
            self._unreachable(exc)
            return False
        if self._failing_since is not None:
            log.warning("MLflow store %s reachable again after %.0f s; pending metrics sent",
                        self.client.tracking_uri, time.monotonic() - self._failing_since)
            self._failing_since = None
        return True

    def _unreachable(self, exc: Exception) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("MLflow store %s unreachable (%s): training goes on, metrics are kept and retried",
                        self.client.tracking_uri, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)

    def spill(self, status: str = "", reason: str | None = None) -> Path | None:
        """Write what could not be sent to `pending_file` (metrics as JSON; artifacts stay in their copies)."""
        if not (self._pending or self._pending_params or self._pending_images or self._pending_artifacts) \
                or self.pending_file is None:
            return None
        from lora_sweep.atomic import write_text

        data = {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri, "status": status, "reason": reason,
                "params": {p.key: p.value for p in self._pending_params},
                "metrics": [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                            for m in self._pending],
                "images_not_sent": [{"key": k, "step": s} for _, k, s in self._pending_images],
                "artifacts_not_sent": [{"file": str(p), "artifact_path": a} for p, a in self._pending_artifacts]}
        write_text(self.pending_file, json.dumps(data, indent=1))
        log.error("MLflow store %s still unreachable at the end of run %s: %d metrics written to %s; the LoRA files "
                  "are on local disk", self.client.tracking_uri, self.run_id, len(self._pending), self.pending_file)
        return self.pending_file

    def end(self, status: str, reason: str | None = None) -> Path | None:
        """Flush and close the run as FINISHED, FAILED or KILLED, recording why it did not finish. Returns the
        pending file if the store could not take everything."""
        try:
            if not self.flush():
                return self.spill(status, reason)
        except Exception as exc:  # refused data: the run cannot count as finished
            status, reason = "FAILED", f"MLflow refused the run's data: {exc}\n{reason or ''}"
        try:
            if reason:
                self.set_tags({FAILURE: fit(reason, MAX_TAG_CHARS, "the job's log")})
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            log.error("could not mark MLflow run %s %s (%s)", self.run_id, status, exc)
        return None
