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


class ConfigErrors(ConfigError):
    """Several independent problems found by one check (a group's options), one message each: the pre-flight lists
    them all, so a user fixes them in one go instead of meeting them one run at a time."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def problem_messages(error: ConfigError) -> list[str]:
    """The messages of a `ConfigError`: each of a `ConfigErrors`, else its one message."""
    return list(getattr(error, "problems", None) or [str(error)])


class Problems:
    """Collects the `ConfigError`s of independent checks, so a check of many fields reports every bad field, not
    the first: `value = found.check(fn, *args)` is fn's result, or None after recording its problem;
    `found.raise_any()` raises them together as one `ConfigErrors`."""

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
    """Memory ran out while drawing a sample, not while training: the sampler raises it from the allocator's error
    (its `__cause__`) so that the failure names the prompt (`where`: the setting, file and line), its size and steps,
    and the settings that size it, instead of the training knobs."""

    def __init__(self, index: int, count: int, where: str, width: int, height: int, steps: int):
        self.index, self.count, self.where = index, count, where
        self.width, self.height, self.steps = width, height, steps
        super().__init__(f"out of memory while sampling prompt {index + 1} of {count} ({where}: {width}x{height}, "
                         f"{steps} steps)")


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


def hydra_error_text(error: BaseException) -> str:
    """A Hydra composition error (a bad override, an unknown group option, a value of the wrong type) as one
    paragraph: Hydra's message and its OmegaConf cause, as Hydra prints them for a single run, without the config
    search path and OmegaConf's `full_key:`/`reference_type=` lines; a group's available options on one line with
    the closest one (`noise=ofset` -> "Did you mean noise=offset?"); for a key the schema lacks, the closest real
    settings instead of Hydra's advice to add it with '+' (which would train without it)."""
    import difflib
    import re

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = error.__cause__
    missing = re.match(r"Could not override '([^']+)'", str(error))
    if missing and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        from lora_sweep.config import _is_free_form, unknown_key_message

        if missing[1].startswith("hydra.") and getattr(cause, "parent_node", None) is not None:
            return unknown_key_message(missing[1], known=_node_keys(cause))  # the active launcher's, and so on
        if not _is_free_form(missing[1]):
            return unknown_key_message(missing[1])
    text = str(error) + ("\n" + str(cause) if isinstance(cause, OmegaConfBaseException) else "")
    override = getattr(error, "override", None)  # OverrideParseException: a syntax error in one override
    if isinstance(override, str) and override not in text:
        text = f"Error parsing override '{override}':\n{text}"
    lines, options, available = [], None, {}
    for line in text.splitlines():
        if line.startswith("Config search path"):
            break
        if re.match(r"\s+(full_key|reference_type|object_type|key|value_type|parent_node)\b", line) or not line.strip():
            continue
        heading = re.match(r"Available options in '([^']+)':$", line)
        if heading:
            options = (heading[1], available.setdefault(heading[1], []))
            lines.append(line)
        elif options is not None and line.startswith(("\t", " ")):
            options[1].append(line.strip())
            lines[-1] = f"Available options in '{options[0]}': {', '.join(options[1])}"
        else:
            options = None
            lines.append(line.strip())
    paragraph = " ".join(line if line.endswith((".", ":", "?")) else line + "." for line in lines)
    unknown = re.search(r"Key '[^']+' not in '\w+'\s+full_key: (\S+)", text)  # a config file's misspelt key
    if unknown:
        from lora_sweep.config import _is_free_form, unknown_key_message

        paragraph += "" if _is_free_form(unknown[1]) else " " + unknown_key_message(unknown[1])
    wanted = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if wanted and available.get(wanted[1]):
        near = difflib.get_close_matches(wanted[2], available[wanted[1]], n=2, cutoff=0.5)
        paragraph += f" Did you mean {' or '.join(f'{wanted[1]}={o}' for o in near)}?" if near else ""
    return paragraph


def _node_keys(cause) -> list[str]:
    """The dotted keys of the node an OmegaConf key error looked the missing key up in (`hydra.launcher`: the active
    launcher's settings), without the `_target_`-like private ones."""
    from omegaconf import OmegaConf

    from lora_sweep.config import flatten

    parent = str(getattr(cause, "full_key", "") or "").rpartition(".")[0]
    tree = OmegaConf.to_container(cause.parent_node, resolve=False)
    keys = flatten(tree) if isinstance(tree, dict) else {}
    return [f"{parent}.{k}" if parent else k for k in keys if not k.startswith("_")]


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's torch.OutOfMemoryError, or the CPU allocator's failure (a RuntimeError with errno 12's text)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
