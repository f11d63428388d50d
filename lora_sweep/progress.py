"""Progress of a long phase (loading, encoding, sampling, evaluation), named and visible wherever its output goes.

A log line names the phase as it starts. Then on a terminal (stderr a TTY) a tqdm bar; elsewhere (a sweep job's
log, a pipe) a log line every `every_s` seconds and one when it ends, so a job log shows what a bar would hide.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

log = logging.getLogger("lora_sweep.progress")
T = TypeVar("T")
EVERY_S = 30.0


def on_terminal() -> bool:
    """True when progress can be a bar (stderr is a terminal), else it is log lines."""
    return sys.stderr.isatty()


class Progress:
    """`update(n)` as work is done; `close()` (or the `with` block's end) at the phase's end. `name` says what the
    phase does ("encoding images into <cache>"); `total` in `unit`s (None: unknown). `announce=False` (a phase
    that repeats, such as each validation): log lines only once it has run `every_s`."""

    def __init__(self, name: str, total: int | None = None, unit: str = "it", *, every_s: float | None = None,
                 leave: bool = True, announce: bool = True):
        self.name, self.total, self.unit = name, total, unit
        self.every_s = EVERY_S if every_s is None else every_s
        self.detail, self.done, self.started = "", 0, time.monotonic()
        self._last_line, self._logged = self.started, announce
        self.bar = None
        if announce:
            log.info("%s%s", name, f" ({total} {self._units(total)})" if total is not None else "")
        if on_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=name, unit=unit, leave=leave, dynamic_ncols=True)

    def describe(self, detail: str) -> None:
        """What the phase is at now (`prompt 2/3, 1024x1024`), on the bar and in the next log line."""
        self.detail = detail
        if self.bar is not None:
            self.bar.set_description(f"{self.name}: {detail}")  # drawn now: a short phase may end before tqdm redraws

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self._last_line >= self.every_s:
            self._last_line, self._logged = time.monotonic(), True
            log.info("%s: %s%s", self.name, self._count(), f" ({self.detail})" if self.detail else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self._logged:
            log.info("%s: %s in %.1f s", self.name, self._count(), time.monotonic() - self.started)

    def _count(self) -> str:
        if self.total is None:
            return f"{self.done} {self._units(self.done)}"
        return f"{self.done}/{self.total} {self._units(self.total)}"

    def _units(self, n: int) -> str:
        return self.unit if n == 1 else f"{self.unit}s"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(items: Iterable[T], name: str, *, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`items`, one at a time, under a `Progress` named `name`."""
    with Progress(name, total if total is not None else len(items) if hasattr(items, "__len__") else None,
                  unit) as shown:
        for item in items:
            yield item
            shown.update()
