"""slurm_sweep_launcher: hydra-submitit-launcher's Slurm launcher, with what a sweep needs on a real cluster.

`conf/hydra/launcher/submitit_slurm.yaml` points `_target_` here; every key is still the plugin's own
(SlurmQueueConf: partition, gpus_per_node, array_parallelism, timeout_min, ...), and the jobs still run Hydra's
`run_job` through submitit as one Slurm job array. What this subclass changes (and why, measured on Slurm 22.05
with submitit 1.5.4, tests/test_slurm_sweep.py):

1. **The sweep waits for every job.** The stock launcher returns `[job.results()[0] for job in jobs]`: the first
   job that died without a result (time limit, OOM kill, `scancel`, node failure) raises in the sweep process,
   which stops waiting for the others and reports nothing about them. Here every job is awaited; one that died is
   FAILED with Slurm's state (TIMEOUT, OUT_OF_MEMORY, CANCELLED, ...) and its log, and the others go on.
2. **Works without Slurm accounting.** submitit learns that a job ended from `sacct`; on a cluster without
   slurmdbd it never does, and a job that died without a result is waited for forever. This launcher also asks
   `squeue` (which keeps finished jobs for MinJobAge, 300 s by default): a job that has left the queue, or sits in
   a final state, without a result after a grace period is FAILED with that state. submitit's repeated
   "Bypassing sacct error" warning is shown once.
3. **A summary.** The sweep ends with a table (variant, status, Slurm job id, MLflow run, note), each failure's
   reason with its log files and their tail, and `<sweep dir>/slurm_summary.json`. Jobs speak the local queue's
   protocols (hydra_plugins/gpu_queue_launcher): the outcome the task function returns or raises, judged by the
   same verdict (hydra_plugins/_job_outcome.py), and the status file (env `GPU_QUEUE_STATUS_FILE`, at
   `<sweep dir>/.job_status/<job number>.json`) for the label and run of a job that died, whose verdict the
   launcher writes there.
4. **The time-limit warning stops training cleanly before submitit requeues.** submitit asks sbatch for
   `--signal=USR2@signal_delay_s` and, on USR2, checkpoints and requeues from inside the signal handler, in the
   middle of a training step: the run ended FAILED ("UncompletedJobError: Job not requeued because: timed-out too
   many times") and the steps since the last periodic state were lost. Here USR2 is forwarded as SIGTERM to the
   training loop, which finishes its step, saves a training state and ends its run KILLED; only then (the job's
   outcome says KILLED) does submitit's own handler run: with `max_num_timeout` > 0 (or on preemption) it requeues
   the job, which resumes from that state in the same MLflow run; otherwise the job is reported KILLED and rerunning
   the sweep resumes it.
"""
