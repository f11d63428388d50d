"""gpu_queue: a Hydra launcher that runs multirun jobs N at a time, each in its own process pinned to its own GPU.

    python app.py -m experiment=glob(v*) hydra/launcher=gpu_queue hydra.launcher.gpus=auto

A new job starts the moment a slot frees (FIFO); a failed job is recorded and the others go on. It knows jobs,
processes and GPUs, not what a job does: the task function runs through Hydra's `run_job`. Settings
(`hydra.launcher.*`, config.py): `gpus`, `jobs_per_gpu`, `cpu_slots`, `preload`, `start_method`, `console`,
`kill_grace_s`, `precheck` (`module:function`, given each job's config in the sweep process: an outcome it returns,
e.g. SKIPPED, ends the job without a process; the fork server starts at the first job left).

Job start: one fork server (its own session) imports `preload` once and forks a child per job, so a job starts in
~0.45 s instead of 10-12 s (BENCHMARKS.md, figure 3) and a crash or leaked CUDA context stays in its child. The
server must never initialise CUDA (if an import does, the launcher names it and falls back to `spawn`) nor run an
OpenMP region; OMP_NUM_THREADS is read when it imports torch, so a job limits threads with torch.set_num_threads.

Protocols with a job (the job side is optional):
1. Outcome: the task function returns a `JobOutcome` (hydra_plugins/_job_outcome.py) or raises `JobNotFinished`
   carrying one; any other return is FINISHED, KeyboardInterrupt KILLED, another exception FAILED. `user_error`
   (or a true `user_error` attribute): the reason is shown whole; else it is a bug, shown by its first line and the
   log's tail. A job that dies is FAILED (KILLED if interrupted), one never started CANCELLED; the launcher writes
   these verdicts (`_job_outcome.verdict`, shared with Slurm) into the job's status file.
2. Status file: env `GPU_QUEUE_STATUS_FILE=<sweep dir>/.job_status/<num>.json`, which the job may rewrite
   atomically with `state`, `label`, `step`, `max_steps`, `loss`, `speed`, `note` (shown on the slot line),
   `run_id`, and a final `state` and `reason` where it keeps no other record of its end.
3. Slot: env `GPU_QUEUE_SLOT` and `CUDA_VISIBLE_DEVICES` (one GPU, seen as cuda:0; "" for a CPU slot).
4. Output: file descriptors 1 and 2 go to `<job dir>/console.log`.
5. Signals: each job leads its own process group. First SIGINT/SIGTERM: no new jobs, queued ones CANCELLED,
   running ones get that signal (a job's SIGTERM raises KeyboardInterrupt until it sets its own handler).
   Second: another SIGINT, then SIGKILL after `kill_grace_s`. Third: SIGKILL. The sweep
   exits 128 + the first signal (130 SIGINT, 143 SIGTERM). (Handlers only when Hydra runs in the main thread.)
6. Exit status: FAILED, KILLED and CANCELLED become FAILED JobReturns (a KILLED outcome carrying `stopped_early`,
   the sweep's early-stopping rule's why, completes: shown as STOPPED EARLY); Hydra re-raises the first as one compact
   line, so the sweep exits 1. Hydra 1.3.8 then skips Callback.on_multirun_end. Under Ray a sys.exit in a task
   kills the worker and the sweep: raise instead.
7. Sweep hooks belong in a Hydra Callback. Jobs fork from the fork server, not the sweep process: the Hydra
   context reaches them pickled (else each job builds fresh callbacks), with the environment at the job's start.

Files: `<sweep dir>/gpu_queue_summary.json`, `.job_status/`, `.gpu_queue/` (the server's log; job specs, mode 0600:
they hold the environment).
"""
