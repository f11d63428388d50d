"""The MLflow face of lora-sweep: where the store is, one run's logger, sweep parent runs, the UI server.

Conventions the report and the queue rely on:
- URI: `tracking.uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (artifacts in <cwd>/mlruns).
- A sweep is a parent run tagged `lora_sweep.role=sweep`; each job a child tagged `lora_sweep.role=job`,
  `mlflow.parentRunId`, `variant`, `config_hash`.
- Each run names its owning process (`lora_sweep.host`, `.pid`, `.pid_started`) so stale RUNNING runs can be
  ended from their pending file or marked KILLED (`stale.close_stale_runs`). Experiments are model-training ones,
  so MLflow 3's UI opens on runs.
- All calls go through `MlflowClient` with explicit run ids (the fluent API keeps globals, not thread-safe);
  metrics go out in batches (one call costs ~5 ms on sqlite).
"""
