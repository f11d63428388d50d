"""gpu_queue: a Hydra launcher that runs multirun jobs N at a time, each in its own process pinned to its own GPU.

    python app.py -m experiment=glob(v*) hydra/launcher=gpu_queue hydra.launcher.gpus=auto

Twelve jobs on four GPUs run four at a time; each new job starts the moment a slot frees (FIFO); a job that fails
is recorded and the others go on; Ctrl-C stops cleanly. It knows jobs, processes and GPUs, nothing about what a
job does: the task function runs through Hydra's own `run_job`, as under the basic, Ray and submitit launchers.

Settings (`hydra.launcher.*`, see config.py): `gpus` (`auto` or a list), `jobs_per_gpu` (1), `cpu_slots` (1, used
when there is no GPU), `preload` (modules for the fork server), `start_method` (forkserver | spawn), `console`,
`kill_grace_s`.

Job start. A fresh Python that imports torch + diffusers costs seconds before a job trains. The launcher starts
one fork server (a fresh interpreter, in its own session) that imports the `preload` list once and forks one child
per job; the child runs the job and exits. A crash, an OOM kill or a leaked CUDA context stays in that child. The
fork server never initialises CUDA (it only imports; if an import does initialise it, the launcher logs which one
and falls back to `spawn`) and runs no OpenMP parallel region, which a forked child could not reuse. An entry
that fails to import is logged and skipped. OpenMP read OMP_NUM_THREADS when the server imported torch, so to
limit a job's CPU threads call torch.set_num_threads in the job. Measured (`make bench`, figure 3 of BENCHMARKS.md,
2-core CPU box, conf/'s preload): about 0.45 s from a free slot to a lora-sweep job's MLflow run, against 10-12 s
for a fresh interpreter.

Protocols between the launcher and a job (the job side is optional: a job that ignores them still runs):

1. Outcome. The task function says how its job ended through Hydra's JobReturn, with the `JobOutcome` of
   hydra_plugins/_job_outcome.py (status FINISHED | FAILED | KILLED | SKIPPED, `run_id`, `reason`, `user_error`,
   `final_loss`): it returns one (FINISHED, SKIPPED), or raises `JobNotFinished` carrying one (FAILED, KILLED).
   Any other return is FINISHED; KeyboardInterrupt is KILLED; any other exception is FAILED with its type and
   message. `user_error` true: the reason is a message for the user, shown whole without a traceback (a true
   `user_error` attribute on another exception says the same); otherwise the failure counts as a bug, the summary
   shows its first line and the last lines of the job's log. A job that dies without a result is FAILED with its
   signal or exit code (KILLED if the launcher had interrupted it), a queued job that never starts CANCELLED; for
   these the launcher writes the verdict (`state`, `reason`, `user_error`) into the job's status file itself.
   The verdict is `_job_outcome.verdict`, shared with the Slurm launcher.
2. Status file. Each job gets env `GPU_QUEUE_STATUS_FILE=<sweep dir>/.job_status/<job number>.json` (the Slurm
   launcher gives the same, and a job of another launcher may keep it there itself). The job may rewrite it
   atomically (temp file + rename) with a JSON object of its live progress: `state` ("running"), `label` (the
   job's name, shown from its "started" line on), `step`, `max_steps`, `loss`, `speed` (e.g. "3.2 it/s"), `note`
   (shown on the slot line, e.g. "waiting for ..."), `run_id` (the run it writes to). A job may end it with a final
   `state` ("skipped", "failed", ...) and `reason` where it keeps no other record of its end (lora-sweep: a skipped
   job, a failure before its MLflow run existed), for readers of the sweep folder; the launcher reads the file for
   the live slot lines and for the label and run id of a job that died.
3. Slot. Each job gets `GPU_QUEUE_SLOT=<slot index>` and `CUDA_VISIBLE_DEVICES=<its GPU>` (one index or UUID,
   so the job sees it as cuda:0). A CPU slot gets `CUDA_VISIBLE_DEVICES=""`: no GPU at all, also on a machine that
   has some (that is what choosing CPU slots means; where there are no GPUs it changes nothing).
4. Output. A job's stdout and stderr (file descriptors 1 and 2, so also C libraries and crash dumps) go to
   `<job dir>/console.log`; the job directory is Hydra's (hydra.sweep.dir/hydra.sweep.subdir).
5. Signals. Each job leads its own process group, so a terminal's Ctrl-C reaches only the launcher. First
   SIGINT/SIGTERM to the launcher: no new jobs start, queued ones are CANCELLED, each running job's group gets
   SIGINT (the job should checkpoint and end KILLED). Second: another SIGINT (abort now; a
   Python job gets KeyboardInterrupt and can still end its run), then SIGKILL `kill_grace_s` (5) seconds later
   for any job still alive. Third: SIGKILL at once. Processes a job leaves in its group are killed when it
   exits. The sweep then exits with status 130. (Handlers are installed only when Hydra runs in the main thread.)
6. Exit status. Jobs whose verdict is FAILED, KILLED or CANCELLED become FAILED JobReturns; Hydra re-raises the
   first one after the batch, so `python app.py -m ...` exits 1 when any job failed and 0 when all finished or were
   skipped.
   What it re-raises is a compact one-line error (no "Error executing job" block, no second traceback): the
   summary table and one paragraph per distinct failure reason, printed just before, say what happened.
   Note (Hydra 1.3.8): that re-raise skips Callback.on_multirun_end, whatever the launcher. A task function
   that calls sys.exit is simply FAILED here, but under the Ray launcher it kills the worker and aborts the
   sweep: in a multirun, raise instead.
7. Sweep hooks (e.g. an MLflow parent run) belong in a Hydra Callback (hydra.callbacks); they work with every
   launcher. Jobs run in a fork of the fork server, never of the sweep process, so they inherit none of its
   state; the Hydra context, callbacks included, reaches them pickled (cloudpickle), as with the Ray launcher
   (if a callback cannot be pickled, each job builds fresh callbacks from hydra.callbacks instead). A job gets
   the sweep process's environment as it is when the job starts, plus the variables above.

Files: `<sweep dir>/gpu_queue_summary.json` (every job: state, reason, slot, pid, times, run_id, final_loss),
`<sweep dir>/.job_status/` (the status files), `<sweep dir>/.gpu_queue/` (the fork server's log; each job's spec
file while it runs, mode 0600 since it holds the environment).
"""
