"""The MLflow face of lora-sweep: where the store is, one run's logger, sweep parent runs, the UI server (`ui`).

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

from lora_sweep.tracking.logger import RunLogger  # noqa: F401
from lora_sweep.tracking.store import (  # noqa: F401
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    FAILURE,
    FILE_STORE_ENV,
    HOST,
    JOB_RUNS_TAG,
    MAX_PARAM_CHARS,
    MAX_TAG_CHARS,
    PARENT_FILE,
    PID,
    PID_STARTED,
    ROLE,
    check_store_uri,
    client,
    close_stale_runs,
    default_artifact_root,
    experiment_id,
    find_finished,
    finished_runs,
    fit,
    job_runs_tags,
    last_logged_step,
    local_artifact_folder,
    process_alive,
    process_tags,
    read_job_runs,
    resumable_run,
    runs_page_url,
    tracking_uri,
)
