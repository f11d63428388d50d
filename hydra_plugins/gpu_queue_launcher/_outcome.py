"""A job of the queue: what the launcher prepared, its life in the queue, and its verdict once its process is gone
(`finalize`: result file, return code, interrupts sent and status file, to `_job_outcome.verdict`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra_plugins._job_outcome import JobOutcome, read_status, verdict

from ._slots import Slot

DONE_STATES = ("FINISHED", "FAILED", "SKIPPED", "KILLED", "CANCELLED")


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
    signals_sent: int = 0  # 1: the sweep's signal, 2: SIGINT, 3: SIGKILL
    kill_at: float | None = None  # monotonic time of the SIGKILL that follows a second interrupt
    reason: str = ""
    status: dict[str, Any] = field(default_factory=dict)  # the job's status file, as last read
    job_return: Any = None
    traceback: str | None = None
    user_error: bool = False  # the reason is for the user: shown whole, without the log's tail
    run_id: str | None = None
    final_loss: float | None = None
    stopped_early: str = ""  # KILLED by the sweep's early-stopping rule: why

    @property
    def label(self) -> str:
        return str(self.status.get("label") or self.job.label)

    @property
    def duration(self) -> float | None:
        return self.ended_at - self.started_at if self.started_at and self.ended_at else None

    def outcome(self) -> JobOutcome:
        return JobOutcome(self.state, self.run_id, self.reason, self.user_error, self.final_loss, label=self.label,
                          stopped_early=self.stopped_early)

    @property
    def shown_state(self) -> str:
        """The state as the console names it: STOPPED EARLY for a job the rule stopped (its state is KILLED)."""
        return "STOPPED EARLY" if self.state == "KILLED" and self.stopped_early else self.state


def finalize(record: JobRecord) -> None:
    """Fill in a record whose process has exited: result file (then deleted), status file, verdict."""
    result, unreadable = None, ""
    if record.job.result_path.exists():
        import cloudpickle

        try:
            result = cloudpickle.loads(record.job.result_path.read_bytes())
        except Exception as exc:  # e.g. the return value's class cannot be imported here
            unreadable = f"result unreadable: {type(exc).__name__}: {exc}; "
        record.job.result_path.unlink(missing_ok=True)
    record.job.spec_path.unlink(missing_ok=True)  # it holds a copy of the environment
    record.status = read_status(record.job.status_path) or record.status
    record.job_return = result["job_return"] if result else None
    record.traceback = result["traceback"] if result else None
    ended = verdict(record.job_return, record.status, returncode=record.returncode, signals_sent=record.signals_sent)
    record.state, record.reason, record.user_error = ended.status, unreadable + ended.reason, ended.user_error
    record.run_id, record.final_loss, record.stopped_early = ended.run_id, ended.final_loss, ended.stopped_early




def verdict_before_start(record: JobRecord, outcome: JobOutcome) -> None:
    """Fill in a record that ended before it needed a process (the launcher's `precheck`), from its outcome."""
    record.status = read_status(record.job.status_path) or ({"label": outcome.label} if outcome.label else {})
    record.state, record.reason, record.user_error = outcome.status, outcome.reason, outcome.user_error
    record.run_id, record.final_loss, record.stopped_early = outcome.run_id, outcome.final_loss, outcome.stopped_early
    record.ended_at = time.time()
