"""Each Slurm job of a sweep as the sweep process sees it at the end (JobReturn or the error instead, last status
file, judged by `_job_outcome.verdict`), and the summary. No Slurm or submitit import: tested without a cluster.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra_plugins._job_outcome import JobOutcome, headline, log_tail, to_job_return, verdict

# squeue states after which a job will not run again (squeue -t all keeps them MinJobAge seconds, 300 by default).
FINAL_SLURM_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
})


@dataclass
class SlurmJob:
    """One job of the array: what was submitted, what came back, and (`finalize`) its verdict."""

    idx: int
    overrides: list[str]
    slurm_id: str
    log_files: list[str] = field(default_factory=list)
    job_return: Any = None  # hydra.core.utils.JobReturn, or None when the job left no result
    error: str = ""  # why the job left no result (submitit's message, or the squeue state)
    status: dict[str, Any] = field(default_factory=dict)  # the job's last status file
    outcome: JobOutcome = field(default_factory=lambda: JobOutcome("FAILED", reason="not judged yet"))

    @property
    def label(self) -> str:
        return str(self.outcome.label or self.status.get("label") or " ".join(self.overrides) or f"job {self.idx}")

    @property
    def state(self) -> str:
        return self.outcome.status

    @property
    def reason(self) -> str:
        return self.outcome.reason

    @property
    def shown_state(self) -> str:
        """The state as the summary names it: STOPPED EARLY for a job the sweep's rule stopped (KILLED)."""
        return "STOPPED EARLY" if self.state == "KILLED" and self.outcome.stopped_early else self.state


def finalize(job: SlurmJob) -> None:
    job.outcome = verdict(job.job_return, job.status, died=job.error or "no result")


def job_return(job: SlurmJob) -> Any:
    """Hydra's JobReturn for the job's verdict (see _job_outcome.to_job_return)."""
    return to_job_return(job.outcome, job.job_return, overrides=job.overrides,
                         message=f"job #{job.idx} ({job.label}, Slurm job {job.slurm_id}) {job.state}: "
                                 f"{headline(job.reason)}")


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def summary(jobs: Sequence[SlurmJob], tail_lines: int = 12) -> str:
    """The end-of-sweep table, then each failed or killed job's reason, log files and the tail of its error log."""
    counts: dict[str, int] = {}
    for o in jobs:
        counts[o.shown_state] = counts.get(o.shown_state, 0) + 1
    head = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    rows = [["#", "variant", "status", "Slurm job", "MLflow run", "final loss", "note"]]
    for o in jobs:
        note = o.outcome.stopped_early or (o.reason.splitlines()[0] if o.reason else "")
        loss = o.outcome.final_loss
        rows.append([str(o.idx), o.label[:48], o.shown_state, o.slurm_id, str(o.outcome.run_id or "-"),
                     f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                     note[:70] + ("..." if len(note) > 70 else "")])
    lines = ["", f"Slurm sweep: {len(jobs)} jobs: {head}", *("  " + ln for ln in _table(rows))]
    for o in jobs:
        if o.shown_state in ("FAILED", "KILLED"):
            lines += ["", f"#{o.idx} {o.label} {o.state}: {o.reason}", *(f"  log: {p}" for p in o.log_files)]
            if o.log_files:
                lines += [f"  | {ln}" for ln in log_tail(o.log_files[-1], tail_lines).splitlines()]
    return "\n".join(lines) + "\n"


def summary_json(jobs: Sequence[SlurmJob]) -> str:
    return json.dumps([
        {"idx": o.idx, "label": o.label, "overrides": o.overrides, "state": o.state, "reason": o.reason,
         "slurm_job": o.slurm_id, "run_id": o.outcome.run_id, "final_loss": o.outcome.final_loss,
         "log_files": o.log_files, "stopped_early": o.outcome.stopped_early}
        for o in jobs
    ], indent=2)
