"""One job's life: `run` (set-up, the MLflow run around training, resume), `inputs` (the dataset scans and prompts
a job reads once), `names` (run labels, job folder names, the `lora_sweep_job_dir` resolver), `status` (what a job
reports to the queue and to the sweep), `finished` (skip-finished: the dataset fingerprint, the skip key, the
finished match). Knows MLflow, not launchers.
"""
