"""A run stopped by `sweep.stop_early` as its record says: the tag `lora_sweep.stopped_early` on a KILLED run.

The tag holds JSON {"step", "rule", "metric", "value", "compared_with", "peers" (the siblings' values)}, written
by the job (training/stop_early.py's `Decision.record`; non-finite numbers as "nan"). A KILLED run without it was
stopped by a signal. Readers (the sweep's parent, the report) call `stop_record`.
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
        """'at step 400: fit/loss 1.23 > median 1.10' ('<' for a metric where higher is better)."""
        name, _, direction = self.metric.partition(":")
        sign = "<" if (direction or DIRECTIONS.get(name)) == "max" else ">"
        against = f" {sign} {COMPARED_WITH.get(self.rule, self.rule)} {_number(self.compared_with)}" \
            if self.compared_with is not None else f" ({self.rule})"
        where = f"at step {self.step}" if self.step is not None else "at an unrecorded step"
        return f"{where}: {name or 'its metric'} {_number(self.value)}{against}"

    def as_dict(self) -> dict[str, Any]:
        """The record for JSON (a non-finite value as its text: 'nan', 'inf')."""
        return {"step": self.step, "rule": self.rule, "metric": self.metric, "value": _json_number(self.value),
                "compared_with": _json_number(self.compared_with), "peers": self.peers, "why": self.describe()}


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
    return StopRecord(step=_int(found.get("step")), rule=str(found.get("rule") or "unrecorded rule"),
                      metric=str(found.get("metric") or ""), value=_float(found.get("value")),
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


def _json_number(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else str(value)
