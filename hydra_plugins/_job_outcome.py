"""How a sweep job ended, decided in one place for the gpu_queue and Slurm launchers and for the job itself.

- `JobOutcome`: returned by the task function, or carried by `JobNotFinished`, inside Hydra's JobReturn.
- The status file at `status_path` (`<sweep dir>/.job_status/<num>.json`, named by `STATUS_ENV`): what a job
  says while it runs (keys listed in hydra_plugins/gpu_queue_launcher).
- `verdict`: how a job whose process is gone ended (its JobReturn, else the evidence of its death);
  `record_verdict` writes it for a job that could not; `to_job_return` makes Hydra's JobReturn of it.
Knows Hydra and files, not what a job does. The leading underscore keeps Hydra's plugin scan from importing this
module a second time (which would define its classes anew).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException

STATUS_ENV = "GPU_QUEUE_STATUS_FILE"
STATUS_DIR = ".job_status"


@dataclass
class JobOutcome:
    """How a job ended: FINISHED | FAILED | KILLED | SKIPPED (or a verdict's CANCELLED: never started); `run_id`
    records it (SKIPPED: the run it matched); `user_error`: `reason` is for the user, shown whole without a
    traceback; `files` a finished job wrote; `label` names the job where the launcher shows it; `stopped_early`:
    a KILLED job the sweep's early-stopping rule stopped, why in one line (it fails nothing)."""

    status: str
    run_id: str | None = None
    reason: str = ""
    user_error: bool = False
    final_loss: float | None = None
    files: dict[str, Any] | None = None
    label: str | None = None
    stop_signal: int | None = None  # KILLED by this signal: a single run exits 128 + it, as a shell reports
    stopped_early: str = ""


class JobNotFinished(RuntimeError):
    """Raised by a task function whose job ended FAILED or KILLED; launchers read `outcome`."""

    def __init__(self, outcome: JobOutcome, message: str | None = None):
        super().__init__(message or f"{outcome.status}: {headline(outcome.reason)}")
        self.outcome = outcome

    def __reduce__(self) -> tuple[Any, ...]:  # keep the outcome when pickled to the launcher
        return type(self), (self.outcome, str(self))


def status_path(sweep_dir: str | os.PathLike, job_num: int) -> Path:
    """Where job `job_num` of the sweep in `sweep_dir` keeps its status file."""
    return Path(sweep_dir) / STATUS_DIR / f"{int(job_num)}.json"


def read_status(path: str | os.PathLike | None) -> dict[str, Any]:
    """A status file's object; {} when absent or unreadable (written by rename, never half written)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_statuses(sweep_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Every status file of a sweep folder, by job number."""
    found = {}
    for path in (Path(sweep_dir) / STATUS_DIR).glob("*.json"):
        if path.stem.isdigit() and (data := read_status(path)):
            found[int(path.stem)] = data
    return found


def remove_statuses(sweep_dir: str | os.PathLike) -> None:
    """Delete the status files of a sweep folder (an earlier sweep's)."""
    for path in (Path(sweep_dir) / STATUS_DIR).glob("*.json"):
        path.unlink(missing_ok=True)


def write_status(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Replace a status file atomically, making its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(data), default=str))
    os.replace(tmp, path)


def record_verdict(path: str | os.PathLike, outcome: JobOutcome) -> None:
    """Write the verdict of a job that could not (died, killed, never started) into its status file, keeping what
    the job last wrote there."""
    known = read_status(path)
    write_status(path, {"label": outcome.label, **known, "state": outcome.status.lower(), "reason": outcome.reason,
                        "user_error": outcome.user_error})


def verdict(job_return: Any, status: Mapping[str, Any] | None = None, *, returncode: int | None = None,
            died: str = "", signals_sent: int = 0) -> JobOutcome:
    """How a job whose process is gone ended: its `job_return`, else `died` (e.g. Slurm's state), else `returncode`
    and `signals_sent` (1 the sweep's signal, 2 SIGINT, 3 SIGKILL). `status`: its last status file (label, run id)."""
    status = status or {}
    if job_return is None:
        state, reason = _death(status, returncode, died, signals_sent)
        return JobOutcome(state, status.get("run_id"), reason, label=status.get("label"))
    said = _reported(job_return)
    if said.status == "FAILED" and not said.user_error:
        said = dataclasses.replace(said, reason=said.reason.strip().split("\n")[0])  # the traceback stays in its log
    return dataclasses.replace(said, run_id=said.run_id or status.get("run_id"),
                               label=said.label or status.get("label"))


def _reported(job_return: Any) -> JobOutcome:
    """The outcome the task function returned or raised, else what its return or exception implies."""
    value = job_return._return_value
    if job_return.status != JobStatus.FAILED:
        return value if isinstance(value, JobOutcome) else JobOutcome("FINISHED")
    if isinstance(value, JobNotFinished):
        return value.outcome
    if isinstance(value, KeyboardInterrupt):
        return JobOutcome("KILLED", reason="stopped on request")
    return JobOutcome("FAILED", reason=f"{type(value).__name__}: {value}",
                      user_error=bool(getattr(value, "user_error", False)))


def _death(status: Mapping[str, Any], returncode: int | None, died: str, signals_sent: int) -> tuple[str, str]:
    exit_text = describe_exit(returncode if returncode is not None else -1)
    if signals_sent >= 3 and returncode == -signal.SIGKILL:
        return "KILLED", "killed (SIGKILL) after the interrupts"
    if signals_sent >= 1:  # e.g. interrupted before its own handler was installed
        return "KILLED", f"stopped by the interrupt ({exit_text})"
    if died:
        written, said = status.get("state"), str(status.get("reason") or "")
        return "FAILED", died + (f" (its last status: {written}{': ' + said if said else ''})" if written else "")
    return "FAILED", f"died without a result: {exit_text}"


def describe_exit(returncode: int) -> str:
    """'exit code 3' / 'killed by SIGKILL (9)', with the usual cause of a SIGKILL nobody asked for."""
    if returncode >= 0:
        return f"exit code {returncode}"
    sig = -returncode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if sig == signal.SIGKILL else ""
    return f"killed by {name} ({sig}){hint}"


def headline(reason: str) -> str:
    """The first line of a reason; a header line ending in ':' ("Invalid configuration:") takes the next one too."""
    lines = [line.strip() for line in (reason or "").strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def log_tail(path: str | os.PathLike, lines: int) -> str:
    """The last `lines` non-blank lines of a log (its last 64 KiB read; tqdm's carriage returns end lines too)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join(kept[-lines:]) if lines > 0 else ""


class JobFailed(RuntimeError, CompactHydraException):
    """Re-raised by Hydra's sweeper for a job that did not finish; printed as its message alone (the launcher's
    summary told the rest). The job's own exception, if any, is `job_exception` and `__cause__`."""

    def __init__(self, message: str, job_exception: BaseException | None = None, user_error: bool = False):
        super().__init__(message)
        self.job_exception = job_exception
        self.user_error = user_error


class QuietJobReturn(JobReturn):
    """A JobReturn whose failure re-raises without Hydra's "Error executing job with overrides" line."""

    @property
    def return_value(self) -> Any:
        if self.status == JobStatus.FAILED:
            raise self._return_value
        return self._return_value

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value


def to_job_return(outcome: JobOutcome, job_return: Any, *, overrides: Sequence[str], message: str,
                  working_dir: str | None = None) -> JobReturn:
    """Hydra's JobReturn for a verdict: COMPLETED for FINISHED, SKIPPED and a job the rule stopped early, else
    FAILED with a JobFailed saying `message` (Hydra re-raises the first after the batch: exit 1)."""
    ret = QuietJobReturn(overrides=list(overrides), working_dir=working_dir)
    if job_return is not None:
        ret.overrides, ret.cfg, ret.hydra_cfg = job_return.overrides, job_return.cfg, job_return.hydra_cfg
        ret.working_dir, ret.task_name = job_return.working_dir, job_return.task_name
        ret.status, ret.return_value = job_return.status, job_return._return_value
    if outcome.status in ("FINISHED", "SKIPPED") or outcome.stopped_early:
        if ret.status != JobStatus.COMPLETED:
            ret.status, ret.return_value = JobStatus.COMPLETED, None
        return ret
    own = ret._return_value if ret.status == JobStatus.FAILED else None
    own = own if isinstance(own, BaseException) else None
    exc = JobFailed(message, own, outcome.user_error)
    exc.__cause__ = own
    ret.status, ret.return_value = JobStatus.FAILED, exc
    return ret
