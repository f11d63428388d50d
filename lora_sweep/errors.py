"""Exception types, `Problems`, `Fallback`, `is_out_of_memory` and `disk_full_error`, shared by every layer.

The entry points print a `UserError` as one paragraph, without a traceback: it names the field or path at fault
and what is accepted.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import ClassVar


class UserError(Exception):
    """A problem with the user's input (config, paths, data) that they can fix."""


class ConfigError(UserError):
    """A config value or combination of values is invalid."""


class ConfigErrors(ConfigError):
    """Several independent problems found by one check, one message each in `problems`."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def problem_messages(error: ConfigError) -> list[str]:
    """The messages of a `ConfigError`: each of a `ConfigErrors`, else its one message."""
    return list(getattr(error, "problems", None) or [str(error)])


class Problems:
    """Collects the `ConfigError`s of independent checks: `found.check(fn, *args)` returns fn's result, or None after
    recording its problem; `found.raise_any()` raises them together."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as error:
            self.messages += problem_messages(error)
            return None

    def add(self, message: str) -> None:
        self.messages.append(message)

    def raise_any(self) -> None:
        if len(self.messages) == 1:
            raise ConfigError(self.messages[0])
        if self.messages:
            raise ConfigErrors(self.messages)

class SamplingOutOfMemory(RuntimeError):
    """Memory ran out while sampling, not training (`__cause__`: the allocator's error); names the prompt (`where`:
    setting, file and line), its size and steps."""

    def __init__(self, index: int, count: int, where: str, width: int, height: int, steps: int):
        self.index, self.count, self.where = index, count, where
        self.width, self.height, self.steps = width, height, steps
        super().__init__(f"out of memory while sampling prompt {index + 1} of {count} ({where}: {width}x{height}, "
                         f"{steps} steps)")


@dataclass(frozen=True)
class Fallback:
    """Something used instead of what the user gave (a class token for a missing caption, a skipped image, a first
    frame): never an error, never silent; printed once and logged on the run (`data/warnings.txt`).

    `setting`: the config key (e.g. "data.dir"); `what` happened to the `paths` (a plural noun first; "file, line N"
    for prompt lines); `hint`: what to do, if anything."""

    setting: str
    what: str
    paths: tuple[str, ...] = ()
    hint: str = ""

    SHOWN: ClassVar[int] = 3  # paths named in the one-line form; warnings.txt lists them all

    @property
    def count(self) -> int:
        return len(self.paths)

    def line(self) -> str:
        """One line: the setting, the count, what happened, the first few paths, the hint."""
        shown = ", ".join(f"'{p}'" for p in self.paths[: self.SHOWN])
        more = f" and {self.count - self.SHOWN} more" if self.count > self.SHOWN else ""
        where = f": {shown}{more}" if self.paths else ""
        return f"{self.setting}: {self.count} {self._noun()}{where}." + (f" {self.hint}" if self.hint else "")

    def _noun(self) -> str:
        """`what`, its leading plural noun made singular for a count of 1."""
        words = self.what.split(" ")
        if self.count == 1:
            for i, word in enumerate(words[:2]):
                if word.endswith("s"):
                    words[i] = word[:-1]
                    break
        return " ".join(words)

    def full(self) -> str:
        """The line, then every path on its own line (for warnings.txt)."""
        return "\n".join([self.line(), *(f"    {p}" for p in self.paths)])


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's torch.OutOfMemoryError, or the CPU allocator's failure (a RuntimeError with errno 12's text)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(exc: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT `OSError` in `exc` or its causes, or None. A safetensors error that says so (its Rust I/O
    error is not an OSError) counts, as an OSError without a file name."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        for code in DISK_FULL_ERRNOS:
            if f"(os error {code})" in str(exc):
                return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None

