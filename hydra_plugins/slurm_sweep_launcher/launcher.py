"""The Slurm launcher (__init__ says what it changes). `launch` runs in the sweep process: one job array, every job
awaited, the summary, one JobReturn per job. `__call__` runs on the node: the job's status file, and Slurm's
time-limit warning turned into a clean stop before submitit may requeue.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from hydra_plugins._job_outcome import STATUS_ENV, read_status, record_verdict, status_path, verdict

from ._outcome import FINAL_SLURM_STATES, SlurmJob, finalize, job_return, summary, summary_json

log = logging.getLogger(__name__)
NO_RESULT_GRACE_S = 30.0  # for a gone job's result file to appear on the shared file system
SQUEUE_EVERY_S = 10.0


class _OnceFilter(logging.Filter):
    """Lets submitit's "Bypassing sacct error" through once, with a note; drops the repeats (one per poll)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg, record.args = ("sacct failed (no Slurm accounting here?): the sweep also watches squeue to "
                                   "notice jobs that end without a result (%s)", (record.getMessage(),))
        return True


def _warning_signal() -> signal.Signals:
    """The signal submitit asks sbatch to send `signal_delay_s` before the time limit (USR2 unless overridden)."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    return signal.Signals[f"SIG{SlurmJobEnvironment.USR_SIG.removeprefix('SIG')}"]


def squeue_states(array_id: str) -> dict[str, str] | None:
    """{"<array>_<task>": state} of every task squeue still lists (final ones too); None if it cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", array_id, "-o", "%i|%T"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # also when every task has aged out of slurmctld's memory ("Invalid job id")
        return {} if "Invalid job id" in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job:
            states[job] = state.split()[0] if state else ""
    return states


def _warn_if_not_a_server(config: Any) -> None:
    """Jobs on other nodes write to the tracking store at once: that needs an MLflow server, not a file."""
    from urllib.parse import urlparse

    from omegaconf import OmegaConf

    uri = OmegaConf.select(config, "tracking.uri", default=None) or os.environ.get("MLFLOW_TRACKING_URI")
    if urlparse(uri or "").scheme not in ("http", "https", "databricks"):
        log.warning("the MLflow tracking store is %s, not a server: jobs on other nodes may not reach it, and "
                    "sqlite on a shared file system is not safe for concurrent writers. Start `mlflow server` "
                    "and set MLFLOW_TRACKING_URI=http://HOST:PORT (or tracking.uri).",
                    uri or "./mlflow.db (the default)")


class SlurmSubmitError(RuntimeError, CompactHydraException):
    """sbatch refused the sweep's job array (no controller, a bad option): Hydra prints the message alone, exit 1."""


def submit_error(exc: BaseException, jobs: int, params: dict[str, Any], folder: Any) -> str:
    """One paragraph: what sbatch said and its exit status (or that it cannot be run), what to check, that nothing
    ran."""
    called = exc.__cause__ if isinstance(exc.__cause__, subprocess.CalledProcessError) else None
    said = "; ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip()) or type(exc).__name__
    if isinstance(exc, OSError):
        head = f"sbatch could not be run ({said})"
    else:
        head = f"sbatch exited with status {called.returncode if called else '?'}: {said}"
    options = ", ".join(f"{k}={params[k]}" for k in ("partition", "account", "qos", "gpus_per_node", "timeout_min")
                        if params.get(k) is not None)
    conf = os.environ.get("SLURM_CONF")
    return (f"Slurm did not accept the sweep's job array of {jobs} job{'s' if jobs != 1 else ''}: {head}. Nothing "
            "was submitted. Check that this machine can reach a Slurm controller (`sinfo` should list the "
            f"partitions; SLURM_CONF={shlex.quote(conf) + ' names' if conf else 'is unset:'} Slurm's configuration "
            f"file{'' if conf else ' is found in its default place'}) and the options this sweep passed to sbatch "
            f"({options or 'none beyond the defaults'}; hydra.launcher.*). The submission script is under {folder}.")


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher: same settings, every job awaited, a summary, clean preemption."""

    sweep_dir: str | None = None  # set by launch() before the launcher is pickled for the jobs

    # ------------------------------------------------------------------------------------------ on the node
    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict[type, Singleton]) -> JobReturn:
        from submitit.core.utils import UncompletedJobError

        status_file = status_path(self.sweep_dir, job_num) if self.sweep_dir else None
        if status_file is not None:
            os.environ[STATUS_ENV] = str(status_file)
        warning = _warning_signal()
        submitit_handler = signal.getsignal(warning)
        warned: list[int] = []

        def on_warning(signum: int, frame: Any) -> None:
            warned.append(signum)
            stop = signal.getsignal(signal.SIGTERM)
            if callable(stop) and getattr(stop, "__name__", "") != "bypass":  # the training loop's handler
                log.warning("Slurm's %s (time limit or preemption near): stopping after this step, saving a "
                            "training state", signal.Signals(signum).name)
                stop(signum, frame)  # the run records the signal that stopped it
            else:
                log.warning("Slurm's %s arrived before training started: the job goes on; Slurm's SIGTERM at the "
                            "limit will stop it cleanly", signal.Signals(signum).name)

        signal.signal(warning, on_warning)
        try:
            ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        finally:
            signal.signal(warning, submitit_handler)
        if warned and callable(submitit_handler) and verdict(ret).status == "KILLED":
            try:  # a state is saved: submitit decides whether to requeue
                submitit_handler(warning, None)
            except UncompletedJobError as exc:
                log.warning("%s The run ended KILLED with a saved state: rerun the sweep to resume it.", exc)
        return ret

    # ---------------------------------------------------------------------------------- in the sweep process
    def _executor(self) -> Any:
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        params = dict(self.params)
        folder = params.pop("submitit_folder")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())  # keys without the slurm_ prefix in submitit
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra.core.utils import filter_overrides

        assert self.config is not None and len(job_overrides) > 0
        _warn_if_not_a_server(self.config)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        self.sweep_dir = str(sweep_dir.absolute())
        status_path(sweep_dir, 0).parent.mkdir(exist_ok=True)
        executor = self._executor()
        args = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        quiet = _OnceFilter()
        logging.getLogger("submitit").addFilter(quiet)
        try:
            from submitit.core.utils import FailedJobError

            try:  # silence submitit's own print of sbatch's stderr: the paragraph below says it
                with contextlib.redirect_stderr(io.StringIO()):
                    jobs = executor.map_array(self, *zip(*args, strict=True))
            except (FailedJobError, OSError) as exc:
                folder = Path(str(executor.folder))
                raise SlurmSubmitError(submit_error(exc, len(args), self.params,
                                                    folder.parent if "%" in folder.name else folder)) from None
            log.info("Slurm job array %s: %d jobs (at most %s at once); job logs in %s", jobs[0].job_id.split("_")[0],
                     len(jobs), self.params.get("array_parallelism"), jobs[0].paths.folder)
            judged = self._wait_all(jobs, [list(o) for o in job_overrides], initial_job_idx)
        finally:
            logging.getLogger("submitit").removeFilter(quiet)
        for one in judged:
            if one.job_return is None:  # it died
                record_verdict(status_path(sweep_dir, one.idx), one.outcome)
        text = summary(judged)
        log.info("%s", text)
        (sweep_dir / "slurm_summary.json").write_text(summary_json(judged))
        return [job_return(one) for one in judged]

    def _wait_all(self, jobs: Sequence[Any], overrides: list[list[str]], first_idx: int) -> list[SlurmJob]:
        """Every job's verdict, however it ended; a job Slurm no longer runs and that left no result within
        NO_RESULT_GRACE_S is FAILED with its last Slurm state."""
        judged = [SlurmJob(first_idx + i, overrides[i], job.job_id, [str(job.paths.stdout), str(job.paths.stderr)])
                  for i, job in enumerate(jobs)]
        open_jobs = dict(enumerate(jobs))
        ended_at: dict[int, tuple[float, str]] = {}
        next_squeue = time.monotonic() + SQUEUE_EVERY_S
        array_id = jobs[0].job_id.split("_")[0]
        while open_jobs:
            for i, job in list(open_jobs.items()):
                if job.done():
                    self._collect(job, judged[i])
                    del open_jobs[i]
            if open_jobs and time.monotonic() >= next_squeue:
                next_squeue = time.monotonic() + SQUEUE_EVERY_S
                states = squeue_states(array_id)
                for i, job in list(open_jobs.items()) if states is not None else []:
                    state = states.get(job.job_id, "no longer listed")
                    if state not in FINAL_SLURM_STATES and state != "no longer listed":
                        ended_at.pop(i, None)  # e.g. requeued: running again
                        continue
                    since, _ = ended_at.setdefault(i, (time.monotonic(), state))
                    if time.monotonic() - since >= NO_RESULT_GRACE_S and not job.paths.result_pickle.exists():
                        judged[i].error = f"Slurm job {job.job_id} ended without a result (squeue: {state})"
                        del open_jobs[i]
            time.sleep(1.0)
        for one in judged:
            one.status = read_status(status_path(self.sweep_dir, one.idx)) if self.sweep_dir else {}
            finalize(one)
        return judged

    @staticmethod
    def _collect(job: Any, judged: SlurmJob) -> None:
        try:
            judged.job_return = job.results()[0]
        except Exception as exc:  # submitit: no result (died), or the job raised outside Hydra's run_job
            text = str(exc).strip()
            judged.error = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            if "has not produced any output" in text:
                judged.error = f"Slurm job {job.job_id} {text.splitlines()[1].strip()}"
