"""What happened to a job: its record, the status file it keeps, and the verdict once its process is gone.

The verdict (`decide`) is a pure function of four facts: the process's return code, the result file the job
process leaves when Hydra's run_job returns (absent if it died), the job's last status file, and how many
signals the launcher sent it. The status file outranks a clean return: a job that caught its own NaN, wrote
`failed` and returned normally is FAILED, and one that wrote `skipped` is SKIPPED.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._proc import describe_exit
from ._slots import Slot

DONE_STATES = ("FINISHED", "FAILED", "SKIPPED", "KILLED", "CANCELLED")


class JobFailed(RuntimeError):
    """A job that failed without an exception of its own (died, went NaN, was killed)."""


class RemoteTraceback(Exception):
    """Carries a job process's traceback text as the __cause__ of the exception re-raised in the launcher."""

    def __str__(self) -> str:
        return f"\n\n(traceback in the job process)\n{self.args[0]}"


@dataclass
class Job:
    """One job of the batch, as prepared by the launcher before any slot is free."""

    idx: int
    overrides: list[str]
    label: str
    job_dir: Path
    spec_path: Path
    result_path: Path
    payload: bytes = field(repr=False)
    sweep_config: Any = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.job_dir / "console.log"

    @property
    def status_path(self) -> Path:
        return self.job_dir / ".status.json"


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

    @property
    def label(self) -> str:
        return str(self.status.get("label") or self.job.label)

    @property
    def duration(self) -> float | None:
        return self.ended_at - self.started_at if self.started_at and self.ended_at else None


def read_status(path: Path) -> dict[str, Any] | None:
    """The job's status file, or None when absent or unreadable (it is rewritten by rename, so never half)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def log_tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) if lines > 0 else ""


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


def to_job_return(record: JobRecord) -> Any:
    """Hydra's JobReturn for a finished record: COMPLETED for FINISHED/SKIPPED, else FAILED with an exception.

    Hydra's sweeper re-raises the first FAILED one after the batch, which makes `python app.py -m ...` exit 1.
    The job's own exception is kept when there is one (sweepers may inspect it), with the job process's
    traceback attached as its cause.
    """
    from hydra.core.utils import JobReturn, JobStatus

    ret = record.job_return or JobReturn(overrides=list(record.job.overrides), working_dir=str(record.job.job_dir))
    if record.state in ("FINISHED", "SKIPPED"):
        if ret.status != JobStatus.COMPLETED:
            ret.status, ret.return_value = JobStatus.COMPLETED, None
        return ret
    own = ret._return_value if ret.status == JobStatus.FAILED else None
    if not isinstance(own, Exception):
        own = JobFailed(f"job #{record.job.idx} ({record.label}) {record.state}: {record.reason}")
    exc = own
    if record.traceback and exc.__cause__ is None:
        exc.__cause__ = RemoteTraceback(record.traceback)
    ret.status, ret.return_value = JobStatus.FAILED, exc
    return ret
