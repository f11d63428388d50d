"""What happened to a job: its record, the status file it keeps, and the verdict once its process is gone.

The verdict (`decide`) is a pure function of four facts: the process's return code, the result file the job
process leaves when Hydra's run_job returns (absent if it died), the job's last status file, and how many
signals the launcher sent it. The status file outranks a clean return: a job that caught its own NaN, wrote
`failed` and returned normally is FAILED, and one that wrote `skipped` is SKIPPED.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException

from hydra_plugins._job_outcome import headline, read_status

from ._proc import describe_exit
from ._slots import Slot

DONE_STATES = ("FINISHED", "FAILED", "SKIPPED", "KILLED", "CANCELLED")


class JobFailed(RuntimeError, CompactHydraException):
    """What Hydra's sweeper re-raises for a job that did not finish. Hydra prints a CompactHydraException as its
    message alone: the summary above it already told the story, so no "Error executing job" block and no second
    traceback follow it. The job's own exception, if any, is `job_exception` (and the `__cause__`)."""

    def __init__(self, message: str, job_exception: BaseException | None = None):
        super().__init__(message)
        self.job_exception = job_exception


@dataclass
class Job:
    """One job of the batch, as prepared by the launcher before any slot is free."""

    idx: int
    overrides: list[str]
    label: str
    job_dir: Path
    spec_path: Path
    result_path: Path
    status_path: Path
    payload: bytes = field(repr=False)
    sweep_config: Any = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.job_dir / "console.log"


@dataclass
class JobRecord:
    """A job's life in the queue; times are epoch seconds (comparable with times the job records itself)."""

    job: Job
    state: str = "QUEUED"  # QUEUED STARTING RUNNING, then one of DONE_STATES
    slot: Slot | None = None
    pid: int | None = None
    slot_free_at: float | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    returncode: int | None = None
    signals_sent: int = 0  # 1: SIGINT, 2: second SIGINT, 3: SIGKILL
    kill_at: float | None = None  # monotonic time of the SIGKILL that follows a second interrupt
    reason: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    job_return: Any = None
    traceback: str | None = None
    user_error: bool = False  # the reason is a message for the user: shown whole, without the log's traceback

    @property
    def label(self) -> str:
        return str(self.status.get("label") or self.job.label)

    @property
    def duration(self) -> float | None:
        return self.ended_at - self.started_at if self.started_at and self.ended_at else None


def decide(returncode: int | None, job_return: Any, status: dict[str, Any] | None,
           signals_sent: int) -> tuple[str, str]:
    """(state, reason) of a job whose process has exited. `job_return` is Hydra's JobReturn or None."""
    written = (status or {}).get("state")
    written_reason = str((status or {}).get("reason") or "")
    failed = getattr(job_return, "status", None) is not None and job_return.status.name == "FAILED"
    exc = job_return._return_value if failed else None
    if written == "skipped" and job_return is not None and not failed:
        return "SKIPPED", written_reason or "skipped by the job"
    if written == "killed" or isinstance(exc, KeyboardInterrupt):
        return "KILLED", written_reason or "stopped on request"
    if written == "failed":
        return "FAILED", written_reason or (f"{type(exc).__name__}: {exc}" if exc is not None else "reported failed")
    if exc is not None:
        return "FAILED", f"{type(exc).__name__}: {exc}"
    if job_return is None:
        if signals_sent >= 3 and returncode == -signal.SIGKILL:
            return "KILLED", "killed (SIGKILL) after the interrupts"
        if signals_sent >= 1:  # e.g. interrupted before its own handler was installed
            return "KILLED", f"stopped by the interrupt ({describe_exit(returncode if returncode is not None else -1)})"
        return "FAILED", f"died without a result: {describe_exit(returncode if returncode is not None else -1)}"
    return "FINISHED", ""


def is_user_error(job_return: Any, status: dict[str, Any] | None) -> bool:
    """The job said its failure is the user's to fix: `user_error: true` in its status file, or a true
    `user_error` attribute on the exception its task function raised."""
    if (status or {}).get("user_error"):
        return True
    failed = getattr(job_return, "status", None) is not None and job_return.status.name == "FAILED"
    return bool(failed and getattr(job_return._return_value, "user_error", False))


def finalize(record: JobRecord) -> None:
    """Fill in a record whose process has exited: result file (then deleted), status file, verdict."""
    result = None
    if record.job.result_path.exists():
        import cloudpickle

        try:
            result = cloudpickle.loads(record.job.result_path.read_bytes())
        except Exception as exc:  # e.g. the return value's class cannot be imported here
            record.reason = f"result unreadable: {type(exc).__name__}: {exc}"
        record.job.result_path.unlink(missing_ok=True)
    record.job.spec_path.unlink(missing_ok=True)  # it holds a copy of the environment: keep it no longer than needed
    record.status = read_status(record.job.status_path) or record.status
    record.job_return = result["job_return"] if result else None
    record.traceback = result["traceback"] if result else None
    record.state, reason = decide(record.returncode, record.job_return, record.status, record.signals_sent)
    record.reason = reason if not record.reason else f"{record.reason}; {reason}"
    record.user_error = is_user_error(record.job_return, record.status)


class QuietJobReturn(JobReturn):
    """A JobReturn whose failure re-raises without Hydra's "Error executing job with overrides" line (the queue's
    summary already named the job and its reason)."""

    @property
    def return_value(self) -> Any:
        if self.status == JobStatus.FAILED:
            raise self._return_value
        return self._return_value

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value


def to_job_return(record: JobRecord, note: str = "") -> Any:
    """Hydra's JobReturn for a finished record: COMPLETED for FINISHED/SKIPPED, else FAILED with a JobFailed.

    Hydra's sweeper re-raises the first FAILED one after the batch, which makes `python app.py -m ...` exit 1,
    printing only its message (`note` is appended to it). The job's own exception is kept as `job_exception` and as
    the cause (sweepers may inspect it); the job's traceback stays in its log and in the summary's log tail.
    """
    src = record.job_return
    ret = QuietJobReturn(overrides=list(record.job.overrides), working_dir=str(record.job.job_dir))
    if src is not None:
        ret.overrides, ret.cfg, ret.hydra_cfg = src.overrides, src.cfg, src.hydra_cfg
        ret.working_dir, ret.task_name = src.working_dir, src.task_name
        ret.status, ret.return_value = src.status, src._return_value
    if record.state in ("FINISHED", "SKIPPED"):
        if ret.status != JobStatus.COMPLETED:
            ret.status, ret.return_value = JobStatus.COMPLETED, None
        return ret
    own = ret._return_value if ret.status == JobStatus.FAILED else None
    own = own if isinstance(own, BaseException) else None
    exc = JobFailed(f"job #{record.job.idx} ({record.label}) {record.state}: {headline(record.reason)}{note}", own)
    exc.__cause__ = own
    exc.user_error = record.user_error  # type: ignore[attr-defined]
    ret.status, ret.return_value = JobStatus.FAILED, exc
    return ret
