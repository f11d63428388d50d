"""The MLflow face of lora-sweep: where the store is, one run's logger, sweep parent runs.

Conventions (the report and the queue rely on them):
- URI: `tracking.uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db with artifacts in <cwd>/mlruns.
- A sweep is a parent run tagged `lora_sweep.role=sweep`; each job a child run tagged `lora_sweep.role=job`,
  `mlflow.parentRunId`, `variant`, `config_hash`.
- Metrics go out in batches (`log_batch`), not one call each: one call costs ~5 ms on sqlite.
All calls go through `MlflowClient` with explicit run ids (the fluent API is not thread-safe and keeps globals).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from lora_sweep.errors import UserError

ROLE = "lora_sweep.role"
PARENT_FILE = ".mlflow_parent_run_id"  # written in a sweep's directory by the sweep callback


def tracking_uri(configured: str | None = None) -> str:
    """The store every process of a sweep must agree on (an absolute sqlite path, not a cwd-relative one)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def default_artifact_root() -> str:
    return (Path.cwd().resolve() / "mlruns").as_uri()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str) -> str:
    """Get or create the experiment; artifacts of a sqlite store go to ./mlruns as MLflow's own default does."""
    try:
        found = mlflow_client.get_experiment_by_name(name)
    except Exception as exc:  # network errors, bad URIs
        raise UserError(
            f"tracking.uri: cannot reach the MLflow store '{mlflow_client.tracking_uri}' ({exc}). Start the server, "
            "fix MLFLOW_TRACKING_URI, or unset it to use sqlite:///<cwd>/mlflow.db."
        ) from exc
    if found is not None:
        return found.experiment_id
    location = default_artifact_root() if mlflow_client.tracking_uri.startswith("sqlite:") else None
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # created by a concurrent job in the meantime
        return mlflow_client.get_experiment_by_name(name).experiment_id


def find_finished(mlflow_client, exp_id: str, config_hash: str) -> str | None:
    """The id of a FINISHED job run with this config hash, if any (what skip-finished skips)."""
    runs = mlflow_client.search_runs(
        [exp_id],
        filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


class RunLogger:
    """One MLflow run: params, tags, batched metrics, artifacts, images, and its end status."""

    def __init__(self, mlflow_client, run_id: str, flush_every: int = 25):
        self.client, self.run_id, self.flush_every = mlflow_client, run_id, max(1, flush_every)
        self._pending: list = []
        self._steps_since_flush = 0
        self.seconds_in_mlflow = 0.0  # tracking overhead, for the benchmark

    @classmethod
    def start(cls, mlflow_client, exp_id: str, *, name: str, tags: Mapping[str, str], flush_every: int = 25):
        run = mlflow_client.create_run(exp_id, run_name=name, tags=dict(tags))
        return cls(mlflow_client, run.info.run_id, flush_every)

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds_in_mlflow += time.perf_counter() - start

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._timed(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._timed(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics for `step`; they are sent every `flush_every` steps and at `flush()`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._steps_since_flush += 1
        if self._steps_since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            self._timed(self.client.log_batch, self.run_id, metrics=batch)
        self._steps_since_flush = 0

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._timed(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_image(self, image, key: str, step: int) -> None:
        self._timed(self.client.log_image, self.run_id, image, key=key, step=int(step))

    def end(self, status: str, reason: str | None = None) -> None:
        """Flush and close the run as FINISHED, FAILED or KILLED, recording why it did not finish."""
        try:
            self.flush()
        finally:
            if reason:
                self.set_tags({"lora_sweep.failure": reason[:4900]})
            self.client.set_terminated(self.run_id, status=status)
