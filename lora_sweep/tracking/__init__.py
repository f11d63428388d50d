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
