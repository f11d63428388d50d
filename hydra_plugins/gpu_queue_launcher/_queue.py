"""The queue: FIFO over jobs, bounded by slots; a job starts the moment a slot frees; interrupts escalate
(`_on_interrupt`). The loop returns only when every started job has exited; if it fails, it kills what still runs.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from hydra_plugins._job_outcome import read_status

from ._console import Console
from ._outcome import JobRecord, finalize
from ._pools import PoolDied
from ._slots import Slot


class Interrupts:
    """Counts SIGINT/SIGTERM while active (main thread only: Python allows handlers nowhere else); `first` is the
    first one's number."""

    def __init__(self) -> None:
        self.count = 0
        self.first: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        self.first = self.first or signum

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


NAME_WAIT_S = 20.0  # how long a "started" line waits for the job's own name


def _announce_named(unnamed: dict[int, JobRecord], console: Console) -> None:
    """Print the "started" line of each job whose status file now names it, or, after NAME_WAIT_S, with the
    launcher's label."""
    for idx, record in list(unnamed.items()):
        status = read_status(record.job.status_path)
        if (status and status.get("label")) or time.time() - (record.started_at or 0) > NAME_WAIT_S:
            record.status = status or record.status
            console.started(record)
            del unnamed[idx]


def run_queue(records: Sequence[JobRecord], slots: Sequence[Slot], pool: Any, console: Console,
              start: Callable[[JobRecord], None], kill_grace_s: float = 5.0, poll_s: float = 0.1) -> int | None:
    """Run every record to a final state; the first signal that interrupted the sweep, or None."""
    pending = deque(records)
    running: dict[int, JobRecord] = {}
    free = sorted(slots, key=lambda s: s.index)
    free_since = {s.index: time.time() for s in slots}
    warned = 0
    unnamed: dict[int, JobRecord] = {}  # started, "started" line not printed yet
    with Interrupts() as interrupts:
        try:
            while pending or running:
                if interrupts.count:
                    warned = _on_interrupt(interrupts.count, warned, pending, running, pool, console, kill_grace_s,
                                           signal.Signals(interrupts.first or signal.SIGINT))
                while pending and free and not interrupts.count:
                    record, slot = pending.popleft(), free.pop(0)
                    record.slot, record.slot_free_at, record.state = slot, free_since[slot.index], "STARTING"
                    try:
                        start(record)
                    except PoolDied:
                        record.state = "QUEUED"
                        pending.appendleft(record)
                        raise
                    except Exception as exc:  # e.g. the job directory cannot be created: this job only
                        record.state, record.reason = "FAILED", f"could not start: {type(exc).__name__}: {exc}"
                        free.insert(0, slot)
                        console.event(record)
                        continue
                    running[record.job.idx] = record
                    record.dispatched_at = time.time()
                for event in pool.events(poll_s):
                    record = running.get(event["idx"])
                    if record is None:
                        continue
                    if event["ev"] == "started":
                        record.pid, record.started_at, record.state = event["pid"], event["t"], "RUNNING"
                        unnamed[record.job.idx] = record
                    elif event["ev"] == "exited":
                        record.returncode, record.ended_at = event["returncode"], event["t"]
                        finalize(record)
                        if unnamed.pop(record.job.idx, None) is not None:
                            console.started(record)
                        del running[record.job.idx]
                        free_since[record.slot.index] = time.time()
                        free = sorted([*free, record.slot], key=lambda s: s.index)
                        console.event(record)
                _announce_named(unnamed, console)
                console.refresh(records)
        except PoolDied as exc:
            for record in [*running.values(), *pending]:
                record.state, record.reason = "FAILED", f"{'not started: ' if record.state == 'QUEUED' else ''}{exc}"
                record.ended_at = time.time()
            running.clear()
            pending.clear()
        finally:
            _kill_all(running, pool)
    return interrupts.first


def _on_interrupt(count: int, warned: int, pending: deque, running: dict[int, JobRecord], pool: Any,
                  console: Console, kill_grace_s: float, first: signal.Signals = signal.SIGINT) -> int:
    """Escalate to `count` interrupts (called every loop turn); returns how many have been announced.

    Queued jobs are CANCELLED. 1: the sweep's `first` signal, SIGINT or SIGTERM (checkpoint and stop; the job names
    it). 2: SIGINT (abort now), then SIGKILL `kill_grace_s` later. 3: SIGKILL at once.
    """
    name = first.name
    while pending:
        record = pending.popleft()
        record.state, record.reason = "CANCELLED", "not started: the sweep was interrupted"
    level, now = min(count, 3), time.monotonic()
    for record in running.values():
        if record.signals_sent < 1 <= level:
            pool.signal(record.job.idx, first)
            record.signals_sent = 1
        if record.signals_sent < 2 <= level:
            pool.signal(record.job.idx, signal.SIGINT)
            record.signals_sent, record.kill_at = 2, now + kill_grace_s
        if record.signals_sent < 3 and (level >= 3 or (record.kill_at is not None and now >= record.kill_at)):
            pool.signal(record.job.idx, signal.SIGKILL)
            record.signals_sent = 3
    if warned < level:
        console.message({
            1: f"gpu_queue: {name} received: no new jobs; asked {len(running)} running job(s) to stop cleanly "
               "(interrupt again to abort them)",
            2: f"gpu_queue: interrupted again: aborting {len(running)} running job(s); any still running in "
               f"{kill_grace_s:g}s gets SIGKILL (interrupt once more to kill now)",
            3: f"gpu_queue: killing {len(running)} running job(s)",
        }[level])
    return level


def _kill_all(running: dict[int, JobRecord], pool: Any, wait_s: float = 10.0) -> None:
    """Last resort (the loop raised): SIGKILL every running job and wait for the exits."""
    if not running:
        return
    try:
        for record in running.values():
            pool.signal(record.job.idx, signal.SIGKILL)
            record.signals_sent = 3
        deadline = time.monotonic() + wait_s
        while running and time.monotonic() < deadline:
            for event in pool.events(0.1):
                record = running.pop(event["idx"], None) if event["ev"] == "exited" else None
                if record is not None:
                    record.returncode, record.ended_at = event["returncode"], event["t"]
                    finalize(record)
    except PoolDied:
        pass  # the server took its jobs down with it
    for record in running.values():
        record.state, record.reason = "KILLED", "killed: the launcher stopped"
