"""Errors a user can act on.

Anything raised as a `UserError` is printed as one paragraph (no traceback) by the entry points: it names the
field or path at fault and what would be accepted instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class UserError(Exception):
    """A problem with the user's input (config, paths, data) that they can fix."""


class ConfigError(UserError):
    """A config value or combination of values is invalid; raised at compose time, before anything heavy loads."""



@dataclass(frozen=True)
class Fallback:
    """Something the data path used instead of what the user gave (a class token for a missing caption, a skipped
    folder or image, a first frame, an option-looking token kept in a prompt), said out loud: never an error, never
    silent. The pre-flight prints each once at start and logs them on the MLflow run (`data/warnings.txt`).

    `setting` is the config key whose input it concerns (e.g. "data.dir"); `what` says what happened to the
    `paths` (each a file or folder; "file, line N" for prompt lines); `hint` what to do about it, if anything."""

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
        """`what` starts with a plural noun ("images ...", "caption files ..."): singular for a count of 1."""
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
