"""slurm_sweep_launcher: hydra-submitit-launcher's Slurm launcher, with what a sweep needs on a real cluster.

`conf/hydra/launcher/submitit_slurm.yaml` points `_target_` here; every key is the plugin's own (SlurmQueueConf),
and jobs still run Hydra's `run_job` through submitit as one job array. What it changes (Slurm 22.05, submitit
1.5.4, tests/test_slurm_sweep.py):

1. **The sweep waits for every job.** The stock launcher raises at the first job that died without a result and
   reports nothing of the others; here each dead job is FAILED with Slurm's state and its log.
2. **Works without Slurm accounting.** Without slurmdbd, `sacct` never reports an end; `squeue` (which keeps
   finished jobs for MinJobAge, 300 s) is asked too, and a job gone without a result after a grace period is
   FAILED with its last state. submitit's "Bypassing sacct error" warning is shown once.
3. **A summary**: a table, each failure's reason with its logs' tail, and `<sweep dir>/slurm_summary.json`. Jobs
   speak the gpu_queue's protocols (outcome, status file) and are judged by `_job_outcome.verdict`.
4. **The time-limit warning stops training cleanly.** submitit checkpoints and requeues from inside its USR2
   handler, mid-step. Here USR2 goes to the training loop's stop handler: it saves a state and ends KILLED; only then
   does submitit's handler decide to requeue (the job resumes from that state in the same run) or not.
"""
