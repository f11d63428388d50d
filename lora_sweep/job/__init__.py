"""One job's life: `run` (set-up, the MLflow run around training, resume), `inputs` (its files, read once), `names`
(run labels, job folders), `status` (its status file, the trainer's sink, stop on signal), `finished`
(skip-finished). Knows MLflow, not launchers.
"""
