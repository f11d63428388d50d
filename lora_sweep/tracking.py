"""The MLflow face of lora-sweep: where the store is, one run's logger, sweep parent runs.

Conventions (the report and the queue rely on them):
- URI: `tracking.uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db with artifacts in <cwd>/mlruns.
- A sweep is a parent run tagged `lora_sweep.role=sweep`; each job a child run tagged `lora_sweep.role=job`,
  `mlflow.parentRunId`, `variant`, `config_hash`.
- Metrics go out in batches (`log_batch`), not one call each: one call costs ~5 ms on sqlite.
- Every run records the process that owns it (`lora_sweep.host`, `lora_sweep.pid`, `lora_sweep.pid_started`): a
  later sweep on the same host marks RUNNING runs whose process is gone KILLED (`close_stale_runs`).
- Experiments are created as model-training experiments (`mlflow.experimentKind`), so MLflow 3's UI offers its runs
  table, not its GenAI pages; `runs_page_url` is the address `make ui` prints.
All calls go through `MlflowClient` with explicit run ids (the fluent API is not thread-safe and keeps globals).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping

from lora_sweep.errors import UserError

log = logging.getLogger(__name__)
ROLE = "lora_sweep.role"
PARENT_FILE = ".mlflow_parent_run_id"  # written in a sweep's directory by the sweep callback
FAILURE = "lora_sweep.failure"
# MLflow 3's UI offers two experiment kinds (its selector's values): "genai_development" opens on traces and
# "custom_model_development" ("Model training") on the runs table; finetuning/regression/... map to the latter too.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
HOST, PID, PID_STARTED = "lora_sweep.host", "lora_sweep.pid", "lora_sweep.pid_started"
MAX_PARAM_CHARS, MAX_TAG_CHARS = 6000, 8000  # mlflow.utils.validation MAX_PARAM_VAL_LENGTH / MAX_TAG_VAL_LENGTH
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
JOB_RUNS_TAG = "lora_sweep.job_runs"  # on a sweep's parent: `<job number>=<run id>` of every job that has a run


def tracking_uri(configured: str | None = None) -> str:
    """The store every process of a sweep must agree on (an absolute sqlite path, not a cwd-relative one)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from lora_sweep.paths import launch_dir  # where the command started, also inside a hydra.job.chdir=true job

    return f"sqlite:///{launch_dir().resolve() / 'mlflow.db'}"


def default_artifact_root(uri: str) -> str:
    """Artifacts of a sqlite store go to `mlruns/` beside the database file (MLflow's own default is the cwd,
    which scatters them when jobs run from other folders)."""
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def fit(value: str, limit: int, where: str) -> str:
    """`value` cut to MLflow's `limit` characters with a visible marker saying how long it was and where the whole
    value is (MLflow would otherwise refuse the batch, and values cut without a marker pass for whole ones)."""
    marker = f" …[cut: {len(value)} characters in all; the whole value is in {where}]"
    return value if len(value) <= limit else value[:limit - len(marker)] + marker


def check_store_uri(uri: str) -> None:
    """Refuse, in one paragraph naming the URI and the fixes, a store MLflow itself would refuse with a traceback:
    a file store (`file:///...` or a bare path) without MLFLOW_ALLOW_FILE_STORE=true (MLflow 3 keeps it only in
    maintenance mode). Other stores are checked by their first use (`experiment_id`)."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme.lower()
    scheme = "" if len(scheme) == 1 else scheme  # a Windows drive letter: a path
    fixes = ("use a sqlite database (unset MLFLOW_TRACKING_URI and tracking.uri for sqlite:///<cwd>/mlflow.db, or "
             "sqlite:////absolute/path/mlflow.db), an MLflow server (http://host:port), or set "
             f"{FILE_STORE_ENV}=true to keep the file store")
    if scheme in ("", "file"):
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

        try:
            allowed = MLFLOW_ALLOW_FILE_STORE.get()
        except ValueError:  # MLflow's own parser: true/false/1/0 only
            raise UserError(f"{FILE_STORE_ENV}={os.environ.get(FILE_STORE_ENV)!r} is not one of true, false, 1, 0. "
                            "Nothing was trained.") from None
        if not allowed:
            raise UserError(
                f"tracking.uri / MLFLOW_TRACKING_URI: '{uri}' is an MLflow file store, which MLflow 3 refuses unless "
                f"{FILE_STORE_ENV}=true "
                f"(its file backend is in maintenance mode). Fix: {fixes}. Nothing was trained.")


def client(uri: str):
    """An MlflowClient for `uri` (checked first: a store MLflow cannot use is a UserError, not a traceback)."""
    from mlflow.tracking import MlflowClient

    check_store_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str) -> str:
    """Get or create the experiment; artifacts of a sqlite store go to ./mlruns as MLflow's own default does."""
    try:
        found = mlflow_client.get_experiment_by_name(name)
    except Exception as exc:  # network errors, bad URIs
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"tracking.uri: cannot reach the MLflow tracking store at '{mlflow_client.tracking_uri}' ({detail}). "
            "Start the server (or check its address), fix tracking.uri / MLFLOW_TRACKING_URI, or unset both to "
            "use sqlite:///<cwd>/mlflow.db. Nothing was trained."
        ) from exc
    if found is not None:
        if EXPERIMENT_KIND_TAG not in (found.tags or {}):  # made before lora-sweep tagged them; a user's choice stays
            try:
                mlflow_client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            except Exception as exc:  # a read-only server account: the UI only opens on another page
                log.debug("could not tag experiment %s: %s", name, exc)
        return found.experiment_id
    uri = mlflow_client.tracking_uri
    location = default_artifact_root(uri) if uri.startswith("sqlite:///") else None
    try:
        return mlflow_client.create_experiment(name, artifact_location=location,
                                               tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created by a concurrent job in the meantime
        return mlflow_client.get_experiment_by_name(name).experiment_id


def runs_page_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table in MLflow 3's UI. `workflowType=machine_learning` selects the UI's "Model
    training" view whatever the browser last used (MLflow 3.17's UI reads the view from the URL, else the browser's
    local storage, default GenAI)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def local_artifact_folder(mlflow_client, exp_id: str) -> Path | None:
    """The experiment's artifact folder when it is on a local disk (checked for writability before training);
    None for remote ones, including an MLflow server's proxied `mlflow-artifacts:/1` (not a relative folder)."""
    from urllib.parse import unquote, urlparse

    location = mlflow_client.get_experiment(exp_id).artifact_location or ""
    if location.startswith("file:"):
        return Path(unquote(urlparse(location).path))
    return Path(location) if location and not urlparse(location).scheme else None


def resumable_run(mlflow_client, exp_id: str, run_id: str) -> bool:
    """A job run of this store and experiment that did not finish: the one a resumed training continues."""
    try:
        run = mlflow_client.get_run(run_id)
    except Exception:  # not in this store
        return False
    info = run.info
    return info.experiment_id == exp_id and info.lifecycle_stage == "active" and info.status != "FINISHED"


def last_logged_step(mlflow_client, run_id: str, key: str = "train/loss") -> int:
    """The last optimizer step whose metrics reached the run (-1 if none)."""
    history = mlflow_client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


def find_finished(mlflow_client, exp_id: str, config_hash: str) -> str | None:
    """The id of a FINISHED job run with this config hash, if any (what skip-finished skips)."""
    runs = mlflow_client.search_runs(
        [exp_id],
        filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def finished_runs(mlflow_client, exp_id: str, config_hash: str) -> list:
    """FINISHED job runs with this config hash, newest first (skip-finished then compares their skip keys)."""
    return mlflow_client.search_runs(
        [exp_id], filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
        max_results=100, order_by=["attributes.start_time DESC"])


def job_runs_tags(job_runs: Mapping[int, str]) -> dict[str, str]:
    """A sweep's jobs and their runs as parent-run tags: `lora_sweep.job_runs` = "0=<run id> 1=<run id> ...", in
    job order, continued in `lora_sweep.job_runs.2`, `.3`, ... past MLflow's 8,000 characters a tag. A skipped job's
    run is the FINISHED run of an earlier sweep it matched: not a child of this sweep, yet part of its results."""
    chunks, current = [], ""
    for num, run_id in sorted(job_runs.items()):
        token = f"{num}={run_id}"
        if current and len(current) + 1 + len(token) > MAX_TAG_CHARS:
            chunks.append(current)
            current = ""
        current = f"{current} {token}" if current else token
    chunks += [current] if current else []
    return {JOB_RUNS_TAG if i == 0 else f"{JOB_RUNS_TAG}.{i + 1}": chunk for i, chunk in enumerate(chunks)}


def read_job_runs(tags: Mapping[str, str]) -> dict[int, str]:
    """{job number: run id} from a sweep parent's tags (see `job_runs_tags`); {} for a sweep without them."""
    found: dict[int, str] = {}
    for key, value in tags.items():
        if key == JOB_RUNS_TAG or key.startswith(JOB_RUNS_TAG + "."):
            for token in value.split():
                num, _, run_id = token.partition("=")
                if num.isdigit() and run_id:
                    found[int(num)] = run_id
    return found


def process_tags(pid: int | None = None) -> dict[str, str]:
    """Which process owns a run: host name, pid and the process's start time (so a reused pid is not mistaken for
    the owner)."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return {HOST: socket.gethostname(), PID: str(pid), PID_STARTED: f"{psutil.Process(pid).create_time():.2f}"}


def process_alive(pid: int, started: float | None) -> bool:
    """True if `pid` runs on this host and (when `started` is known) is the same process that started then."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def close_stale_runs(mlflow_client, exp_id: str, *, by: str) -> list[str]:
    """Mark KILLED the RUNNING runs of the experiment whose owning process (see `process_tags`) is gone from this
    host, e.g. after a SIGKILL, with the reason as the failure tag. Runs owned by other hosts, and runs without an
    owner tag, are left alone (their process cannot be checked from here). Returns the ids marked."""
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
        if process_alive(pid, float(started) if started else None):
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


class RunLogger:
    """One MLflow run: params, tags, batched metrics, artifacts, images, and its end status.

    If the tracking server drops mid-run, nothing stops the training: metrics, images and artifacts stay pending and
    are retried at each flush; what is still pending when the run ends is written to `pending_file` (JSON) beside
    the run's local outputs. On a resumed run, steps up to `skip_through_step` were logged before: they are not
    logged again, so every metric history holds each step once. That last step itself may have been logged only in
    part (a stop request cut its evaluation short): its metrics are checked key by key, and its images go again
    (the report takes the newest image of a key and step).
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
        """On a reopened run, only new keys: a value that legitimately changed (an output folder) stays as first
        logged, since MLflow refuses to change a param."""
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
        """Queue metrics for `step`; every `flush_every` steps, when the next step begins (so a step's metrics are
        sent together, never half of them), and at `flush()`, they are sent."""
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
