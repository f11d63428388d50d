"""What happened to each Slurm job of a sweep: the verdict, Hydra's JobReturn for it, and the end-of-sweep summary.

Pure functions over three facts per job: the JobReturn submitit brought back (None if the job left no result),
the error submitit raised instead (the job died: time limit, OOM kill, cancelled, node failure), and the job's
last status file (hydra_plugins/_job_outcome.py). No Slurm or submitit import: tested without a cluster.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra_plugins._job_outcome import log_tail

# squeue states after which a job will not run again (squeue -t all keeps them MinJobAge seconds, 300 by default).
FINAL_SLURM_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
})


class JobDied(RuntimeError):
    """A Slurm job that ended without a result (its process was killed or never started)."""


class JobNotFinished(RuntimeError):
    """A job whose own status says it did not finish, although its task function returned."""


@dataclass
class JobOutcome:
    """One job of the array, as the sweep process sees it at the end."""

    idx: int
    overrides: list[str]
    slurm_id: str
    log_files: list[str] = field(default_factory=list)
    job_return: Any = None  # hydra.core.utils.JobReturn, or None when the job left no result
    error: str = ""  # why the job left no result (submitit's message, or the squeue state)
    status: dict[str, Any] = field(default_factory=dict)  # the job's last status file
    state: str = ""  # FINISHED | SKIPPED | FAILED | KILLED
    reason: str = ""

    @property
    def label(self) -> str:
        return str(self.status.get("label") or " ".join(self.overrides) or f"job {self.idx}")


def decide(job_return: Any, error: str, status: dict[str, Any]) -> tuple[str, str]:
    """(state, reason) of a job: its status file outranks a clean return, a missing result is FAILED."""
    written, written_reason = status.get("state"), str(status.get("reason") or "")
    failed = job_return is not None and getattr(job_return.status, "name", "") == "FAILED"
    exc = job_return._return_value if failed else None
    if job_return is None:
        note = f" (its last status: {written}{': ' + written_reason if written_reason else ''})" if written else ""
        return "FAILED", (error or "no result") + note
    if written == "killed":
        return "KILLED", written_reason or "stopped by a signal"
    if written == "failed":
        return "FAILED", written_reason or (f"{type(exc).__name__}: {exc}" if exc is not None else "reported failed")
    if exc is not None:
        return "FAILED", f"{type(exc).__name__}: {exc}"
    if written == "skipped":
        return "SKIPPED", written_reason or "skipped by the job"
    return "FINISHED", ""


def finalize(outcome: JobOutcome) -> None:
    outcome.state, outcome.reason = decide(outcome.job_return, outcome.error, outcome.status)


def to_job_return(outcome: JobOutcome) -> Any:
    """Hydra's JobReturn: COMPLETED for FINISHED/SKIPPED; otherwise FAILED with the job's own exception when it
    raised one, else JobDied / JobNotFinished. Hydra's sweeper re-raises the first FAILED one after the batch, so
    the sweep exits non-zero when any job failed."""
    from hydra.core.utils import JobReturn, JobStatus

    ret = outcome.job_return or JobReturn(overrides=list(outcome.overrides))
    if outcome.state in ("FINISHED", "SKIPPED"):
        return ret
    own = ret._return_value if ret.status == JobStatus.FAILED else None
    if not isinstance(own, BaseException):
        kind = JobDied if outcome.job_return is None else JobNotFinished
        own = kind(f"job #{outcome.idx} ({outcome.label}, Slurm job {outcome.slurm_id}) {outcome.state}: "
                   f"{outcome.reason.splitlines()[0] if outcome.reason else ''}")
    ret.status, ret.return_value = JobStatus.FAILED, own
    return ret


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def summary(outcomes: Sequence[JobOutcome], tail_lines: int = 12) -> str:
    """The end-of-sweep table, then each failed or killed job's reason, log files and the tail of its error log."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.state] = counts.get(o.state, 0) + 1
    head = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    rows = [["#", "variant", "status", "Slurm job", "MLflow run", "final loss", "note"]]
    for o in outcomes:
        note = o.reason.splitlines()[0] if o.reason else ""
        loss = o.status.get("final_loss")
        rows.append([str(o.idx), o.label[:48], o.state, o.slurm_id, str(o.status.get("run_id") or "-"),
                     f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                     note[:70] + ("..." if len(note) > 70 else "")])
    lines = ["", f"Slurm sweep: {len(outcomes)} jobs: {head}", *("  " + ln for ln in _table(rows))]
    for o in outcomes:
        if o.state in ("FAILED", "KILLED"):
            lines += ["", f"#{o.idx} {o.label} {o.state}: {o.reason}", *(f"  log: {p}" for p in o.log_files)]
            if o.log_files:
                lines += [f"  | {ln}" for ln in log_tail(o.log_files[-1], tail_lines).splitlines()]
    return "\n".join(lines) + "\n"


def summary_json(outcomes: Sequence[JobOutcome]) -> str:
    return json.dumps([
        {"idx": o.idx, "label": o.label, "overrides": o.overrides, "state": o.state, "reason": o.reason,
         "slurm_job": o.slurm_id, "run_id": o.status.get("run_id"), "final_loss": o.status.get("final_loss"),
         "log_files": o.log_files}
        for o in outcomes
    ], indent=2)
