"""What the user sees: a live line per slot on a terminal (event lines otherwise), then a summary table and one
paragraph per distinct failure reason: a user's error whole, a bug with its first job's log tail.

Render functions are pure (records in, text out); `Console` decides when to draw and redraws its block in place
(cursor up, erase line), with lines cut to the terminal width so a wrap cannot throw the redraw off.
"""

from __future__ import annotations

import math
import shutil
import textwrap
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from hydra_plugins._job_outcome import headline, log_tail, read_status

from ._outcome import DONE_STATES, JobRecord
from ._slots import Slot

MAX_LOGS_LISTED = 5  # per failure paragraph; gpu_queue_summary.json lists every job's log


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes}m{sec:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def fmt_loss(value: Any) -> str:
    try:
        loss = float(value)
    except (TypeError, ValueError):
        return "-"
    return "nan" if math.isnan(loss) else f"{loss:.4g}"


def slot_line(slot: Slot, record: JobRecord | None, now: float) -> str:
    """`gpu0  v53  step 120/1000  loss 0.0931  3.2 it/s  1m02s` for a busy slot, `gpu1  idle` for a free one."""
    if record is None:
        return f"{slot.name:>6}  idle"
    status = record.status
    parts = [f"{slot.name:>6}", f"#{record.job.idx} {record.label}"]
    if status.get("state") == "skipped":
        parts.append("skipping")
    if status.get("step") is not None:
        parts.append(f"step {status['step']}/{status.get('max_steps', '?')}")
    if status.get("loss") is not None:
        parts.append(f"loss {fmt_loss(status['loss'])}")
    if status.get("speed"):
        parts.append(str(status["speed"]))
    if status.get("note"):
        parts.append(str(status["note"]))
    parts.append(fmt_seconds(now - record.started_at) if record.started_at else "starting")
    return "  ".join(parts)


def counts_line(records: Sequence[JobRecord]) -> str:
    states = ("FINISHED", "STOPPED EARLY", "FAILED", "SKIPPED", "KILLED", "CANCELLED")  # cancelled: never started
    counts = {state: sum(r.shown_state == state for r in records) for state in states}
    running = sum(r.state in ("STARTING", "RUNNING") for r in records)
    queued = sum(r.state == "QUEUED" for r in records)
    done = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    return f"gpu_queue: {len(records)} jobs: {running} running, {queued} queued" + (f", {done}" if done else "")


def shorten(text: str, width: int) -> str:
    """`text` cut at a word boundary to at most `width` characters, "..." marking the cut."""
    return text if len(text) <= width else textwrap.shorten(text, width, placeholder=" ...")


def start_line(record: JobRecord) -> str:
    return f"[{record.slot.name if record.slot else '-'}] started #{record.job.idx} {record.label}"


def event_line(record: JobRecord) -> str:
    """`[gpu0] started #1 v57`, then `[gpu0] SKIPPED #1 v57  0.4s` and the reason on its own line (a failure's cut at
    a word: the summary has it all). The job is named by its status file's label, else the launcher's."""
    where = record.slot.name if record.slot else "-"
    if record.state not in DONE_STATES:
        return start_line(record)
    text = f"[{where}] {record.shown_state} #{record.job.idx} {record.label}  {fmt_seconds(record.duration)}"
    loss = record.final_loss if record.final_loss is not None else record.status.get("loss")
    if loss is not None and record.state == "FINISHED":
        text += f"  loss {fmt_loss(loss)}"
    head = record.stopped_early or headline(record.reason)
    if record.state == "FAILED":
        head = shorten(head, 300)
    return text + (f"\n    {head}" if head else "")


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def failure_groups(records: Sequence[JobRecord]) -> list[tuple[str, list[JobRecord]]]:
    """FAILED jobs grouped by reason, in job order: a user's error by its whole text, a bug by its first line."""
    groups: dict[str, list[JobRecord]] = {}
    for r in records:
        if r.state == "FAILED":
            key = r.reason.strip() if r.user_error else headline(r.reason)
            groups.setdefault(key or "no reason recorded", []).append(r)
    return list(groups.items())


def failure_paragraph(number: int, reason: str, members: Sequence[JobRecord], tail_lines: int) -> list[str]:
    """`(1) FAILED, 2 jobs: #0 a, #2 b`, the reason, each job's log; for a bug, the first job's log tail."""
    jobs = ", ".join(f"#{r.job.idx} {r.label}" for r in members)
    lines = [f"({number}) FAILED, {len(members)} job{'s' if len(members) > 1 else ''}: {jobs}"]
    lines += [f"    {line}" for line in reason.splitlines()]
    for r in members[:MAX_LOGS_LISTED]:
        lines.append(f"    log #{r.job.idx}: {r.job.log_path}")
    if len(members) > MAX_LOGS_LISTED:
        lines.append(f"    ... and {len(members) - MAX_LOGS_LISTED} more logs (gpu_queue_summary.json lists them)")
    if not members[0].user_error:
        tail = log_tail(members[0].job.log_path, tail_lines)
        if tail:
            lines.append(f"    last lines of #{members[0].job.idx}'s log:")
            lines += [f"    | {line}" for line in tail.splitlines()]
    return lines


def summary(records: Sequence[JobRecord], tail_lines: int) -> str:
    """The end-of-sweep table, one paragraph per distinct failure reason, then every skipped job with its reason."""
    groups = failure_groups(records)
    number = {id(r): i for i, (_, members) in enumerate(groups, 1) for r in members}
    skipped = [r for r in records if r.state == "SKIPPED" and headline(r.reason)]
    skipped_ids, skips_at = {id(r) for r in skipped}, len(groups) + 1
    rows = [["#", "variant", "status", "slot", "duration", "final loss", "MLflow run", "note"]]
    for r in records:
        note = (f"see ({number[id(r)]}) below" if id(r) in number else f"see ({skips_at}) below" if id(r) in skipped_ids
                else shorten(r.stopped_early or headline(r.reason), 70))
        rows.append([str(r.job.idx), r.label[:48], r.shown_state, r.slot.name if r.slot else "-",
                     fmt_seconds(r.duration), fmt_loss(r.final_loss), str(r.run_id or r.status.get("run_id") or "-"),
                     note])
    lines = ["", counts_line(records), *("  " + line for line in _table(rows))]
    for i, (reason, members) in enumerate(groups, 1):
        lines += ["", *failure_paragraph(i, reason, members, tail_lines)]
    if skipped:
        lines += ["", f"({skips_at}) SKIPPED, {len(skipped)} job{'s' if len(skipped) > 1 else ''}:"]
        lines += [f"    #{r.job.idx} {r.label}: {headline(r.reason)}" for r in skipped]
    return "\n".join(lines) + "\n"


class Console:
    """Live slot lines (`live`), or a line per start and end (`plain`) plus, every `progress_every_s` (0: never),
    a progress line per running job, so a log file shows progress too."""

    def __init__(self, stream: TextIO, mode: str, slots: Sequence[Slot], refresh_s: float,
                 progress_every_s: float = 60.0):
        self.stream, self.slots, self.refresh_s = stream, list(slots), refresh_s
        is_tty = hasattr(stream, "isatty") and stream.isatty()
        self.live = mode == "live" or (mode == "auto" and is_tty)
        self.progress_every_s = progress_every_s
        self._drawn = 0
        self._last = 0.0
        self._last_progress = time.time()

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _draw(self, lines: list[str]) -> None:
        """Overwrite the block drawn last time with `lines` (cursor up, then erase-and-write each line)."""
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        extra = self._drawn - len(lines)
        tail = "\x1b[2K\n" * extra + f"\x1b[{extra}F" if extra > 0 else ""
        self._write(up + "".join(f"\x1b[2K{line}\n" for line in lines) + tail)
        self._drawn = len(lines)

    def _erase(self) -> None:
        if self._drawn:
            self._draw([])

    def event(self, record: JobRecord) -> None:
        self.message(event_line(record))

    def started(self, record: JobRecord) -> None:
        self.message(start_line(record))

    def message(self, text: str) -> None:
        self._erase()
        self._write(text + "\n")
        self._last = 0.0  # redraw the live block right away

    def refresh(self, records: Iterable[JobRecord], force: bool = False) -> None:
        now = time.time()
        if not self.live:
            if self.progress_every_s > 0 and now - self._last_progress >= self.progress_every_s:
                self._last_progress = now
                self._progress_lines(records, now)
            return
        if not force and now - self._last < self.refresh_s:
            return
        self._last = now
        records = list(records)
        by_slot = self._running(records)
        width = max(20, shutil.get_terminal_size((120, 24)).columns - 1)
        lines = [counts_line(records)] + [slot_line(s, by_slot.get(s.index), now) for s in self.slots]
        self._draw([line[:width] for line in lines])

    def _running(self, records: Iterable[JobRecord]) -> dict[int, JobRecord]:
        """The job running in each busy slot, its status freshly read."""
        by_slot = {r.slot.index: r for r in records if r.slot and r.state in ("STARTING", "RUNNING")}
        for r in by_slot.values():
            r.status = read_status(r.job.status_path) or r.status
        return by_slot

    def _progress_lines(self, records: Iterable[JobRecord], now: float) -> None:
        """Plain mode: `[cpu0] #0 v53  step 120/1000  loss 0.0931  3.2 it/s  1m02s`, one line per running job."""
        by_slot = self._running(records)
        for slot in self.slots:
            if slot.index in by_slot:
                self._write("[" + slot_line(slot, by_slot[slot.index], now).lstrip().replace("  ", "] ", 1) + "\n")

    def close(self) -> None:
        self._erase()
