"""Where the MLflow store is and what it holds: URIs, experiments, finished/resumable/stale runs, a sweep's job runs."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from lora_sweep.errors import UserError

log = logging.getLogger(__name__)
ROLE = "lora_sweep.role"
PARENT_FILE = ".mlflow_parent_run_id"  # written in a sweep's directory by the sweep callback
FAILURE = "lora_sweep.failure"
# MLflow 3's "Model training" experiment kind, whose UI opens on the runs table (not GenAI traces).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
HOST, PID, PID_STARTED = "lora_sweep.host", "lora_sweep.pid", "lora_sweep.pid_started"
MAX_PARAM_CHARS, MAX_TAG_CHARS = 6000, 8000  # mlflow.utils.validation MAX_PARAM_VAL_LENGTH / MAX_TAG_VAL_LENGTH
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
JOB_RUNS_TAG = "lora_sweep.job_runs"  # on a sweep's parent: `<job number>=<run id>` of every job that has a run
# MLflow's HTTP client retries for ~4 min by default (7 retries, backoff 2, 120 s timeout); ours gives up in seconds
# and the logger's writer retries in the background. A value the user set wins.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              # no "View run ... at: http://..." at each run's end: our closing line names the run and how to browse
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def tracking_uri(configured: str | None = None) -> str:
    """The store every process of a sweep must agree on (an absolute sqlite path, not a cwd-relative one)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from lora_sweep.paths import launch_dir  # where the command started, also inside a hydra.job.chdir=true job

    return f"sqlite:///{launch_dir().resolve() / 'mlflow.db'}"


def default_artifact_root(uri: str) -> str:
    """Artifacts of a sqlite store go to `mlruns/` beside the database, not MLflow's default cwd."""
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def fit(value: str, limit: int, where: str) -> str:
    """`value` cut to MLflow's `limit` characters, with a marker saying its length and where the whole value is."""
    marker = f" …[cut: {len(value)} characters in all; the whole value is in {where}]"
    return value if len(value) <= limit else value[:limit - len(marker)] + marker


def check_store_uri(uri: str) -> None:
    """Raise UserError naming the URI and the fixes for a store MLflow would refuse with a traceback.

    That is a file store without MLFLOW_ALLOW_FILE_STORE=true (MLflow 3); others are checked by `experiment_id`.
    """
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


def first_line(exc: BaseException) -> str:
    """An exception as one short line (MLflow's carry SQL statements and tracebacks on later lines)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def client(uri: str):
    """An MlflowClient for `uri`, checked first (`check_store_uri`), with MLflow's HTTP retries bounded and its
    run URLs unprinted (`CLIENT_ENV`)."""
    from mlflow.tracking import MlflowClient

    check_store_uri(uri)
    for name, value in CLIENT_ENV.items():
        os.environ.setdefault(name, value)
    with _opening(uri):
        return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _opening(uri: str):
    """Hold an exclusive lock on a sqlite store's folder: MLflow creates or migrates the database's tables as it
    opens it, and two processes doing so at once fail ("duplicate column name", "table ... already exists")."""
    folder = Path(uri.removeprefix("sqlite:///")).parent
    if not uri.startswith("sqlite:///") or not folder.is_dir():
        yield
        return
    import fcntl

    fd = os.open(folder, os.O_RDONLY)  # a lock on the folder writes nothing beside the user's database
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def experiment_id(mlflow_client, name: str) -> str:
    """Get or create the experiment (tagged model-training; UserError when the store is unreachable)."""
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
    """The experiment's runs table in MLflow 3's UI; `workflowType=machine_learning` forces the "Model training" view.
    """
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def local_artifact_folder(mlflow_client, exp_id: str) -> Path | None:
    """The experiment's artifact folder when on a local disk (checked for writability); None when remote."""
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


def finished_runs(mlflow_client, exp_id: str, config_hash: str) -> list:
    """FINISHED job runs with this config hash, newest first (skip-finished then compares their skip keys)."""
    return mlflow_client.search_runs(
        [exp_id], filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
        max_results=100, order_by=["attributes.start_time DESC"])


def job_runs_tags(job_runs: Mapping[int, str]) -> dict[str, str]:
    """A sweep's jobs and runs as parent tags: `lora_sweep.job_runs` = "0=<run id> 1=<run id> ...".

    Continued in `.2`, `.3`, ... past MLflow's 8,000 characters. Skipped jobs' runs (earlier sweeps) are listed too.
    """
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
    """The run's owner: host, pid and the process's start time (so a reused pid is not taken for the owner)."""
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
