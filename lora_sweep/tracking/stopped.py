"""A run stopped by `sweep.stop_early` as its record says: the tag `lora_sweep.stopped_early` on a KILLED run.

The tag holds JSON {"step", "rule", "metric", "value", "finite", "compared_with", "peers" (the siblings' values)},
written by the job (training/stop_early.py's `Decision.record`; JSON has no NaN: a non-finite number is null, and
"finite" is false when the run's value was not finite). A KILLED run without it was stopped by a signal. Readers
(the sweep's parent, the report) call `stop_record`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lora_sweep.tracking.metric_spec import DIRECTIONS

STOPPED_EARLY = "lora_sweep.stopped_early"
# What a rule compares the run's value with, as the sentence names it.
COMPARED_WITH = {"median": "median", "diverged": "limit"}


@dataclass(frozen=True)
class StopRecord:
    """Why the rule stopped a run: at `step`, `metric` was `value`, worse than `compared_with` (the median of
    `peers` sibling runs (their count), or the step-0 value plus the margin)."""

    step: int | None
    rule: str
    metric: str
    value: float | None
    compared_with: float | None
    peers: int | None

    def describe(self) -> str:
        """'at step 400: fit/loss 1.1454 > median 1.1453' ('<' for a metric where higher is better; the two numbers
        with the digits that tell them apart), or 'at step 2: fit/loss is not finite (limit 1.145)'."""
        name, _, direction = self.metric.partition(":")
        name = name or "its metric"
        sign = "<" if (direction or DIRECTIONS.get(name)) == "max" else ">"
        where = f"at step {self.step}" if self.step is not None else "at an unrecorded step"
        known = self.compared_with is not None and math.isfinite(self.compared_with)
        what = COMPARED_WITH.get(self.rule, self.rule)
        if self.value is not None and not math.isfinite(self.value):
            return f"{where}: {name} is not finite ({f'{what} {_number(self.compared_with)}' if known else self.rule})"
        value, against = distinct_numbers(self.value, self.compared_with)
        return f"{where}: {name} {value}" + (f" {sign} {what} {against}" if known else f" ({self.rule})")

    def as_dict(self) -> dict[str, Any]:
        """The record for JSON: a non-finite number is null (JSON has none), "finite" false when the value was not."""
        return {"step": self.step, "rule": self.rule, "metric": self.metric, "value": json_number(self.value),
                "finite": self.value is None or math.isfinite(self.value),
                "compared_with": json_number(self.compared_with), "peers": self.peers, "why": self.describe()}


def stop_record(tags: Mapping[str, str]) -> StopRecord | None:
    """The stop recorded in a run's tags; None for a run the rule did not stop (an unreadable tag still counts as
    stopped early, with what could be read)."""
    text = tags.get(STOPPED_EARLY)
    if text is None:
        return None
    try:
        found = json.loads(text)
    except ValueError:
        found = {}
    found = found if isinstance(found, dict) else {}
    value = math.nan if found.get("finite") is False else _float(found.get("value"))
    return StopRecord(step=_int(found.get("step")), rule=str(found.get("rule") or "unrecorded rule"),
                      metric=str(found.get("metric") or ""), value=value,
                      compared_with=_float(found.get("compared_with")), peers=_count(found.get("peers")))


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _count(value: Any) -> int | None:
    """The number of peers: the length of the peers' values (a count, in a record that holds one)."""
    return len(value) if isinstance(value, list) else _int(value)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _number(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g}"


def distinct_numbers(a: float | None, b: float | None) -> tuple[str, str]:
    """`a` and `b` with the fewest significant digits (at least 4) that show them apart ('1.14543', '1.1453');
    equal numbers read equal."""
    if a is None or b is None or a == b:
        return _number(a), _number(b)
    for digits in range(4, 18):
        texts = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if texts[0] != texts[1]:
            return texts
    return repr(a), repr(b)


def json_number(value: float | None) -> float | None:
    """`value` for JSON, which has no NaN or infinity: None for those."""
    return value if value is None or math.isfinite(value) else None
