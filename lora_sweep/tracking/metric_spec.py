"""`METRIC[:max|min]`: a logged metric and which way is better, the one spec of `compare.select` (the best
checkpoint, issue 30) and `sweep.stop_early.metric` (early stopping, issue 31).

A metric without `:max`/`:min` takes its direction from `DIRECTIONS`; one that is not there must say it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Which way is better for the metrics every run logs at its evaluation and sampling steps.
DIRECTIONS = {
    "fit/loss": "min",  # the common yardstick: the loss on fixed training images, timesteps and noise
    "val/loss": "min",
    "train/loss": "min",
    "fit/loss_auc": "min",
    "fit/steps_to_half": "min",  # fits faster
    "img/copying": "min",  # likeness to the nearest training image, beyond subject likeness, is copying
    "img/copying_max": "min",  # the most copied sample of the step
    "img/diversity": "max",  # seeds of one prompt that differ; img/drift has no better way: give :max or :min
    "img/clip_t": "max",  # prompt adherence
    "img/clip_i": "max",  # subject likeness (DreamBooth's CLIP-I)
    "img/dino": "max",  # subject likeness (DreamBooth's DINO)
}
DIRECTION_WORDS = ("max", "min")


@dataclass(frozen=True)
class MetricSpec:
    """A metric name as logged in MLflow (`fit/loss`) and its better direction ("max" or "min")."""

    name: str
    direction: str

    def __str__(self) -> str:
        return f"{self.name}:{self.direction}"

    def better(self, a: float, b: float) -> bool:
        """True when `a` is strictly better than `b`; a non-finite value is never better, and always worse."""
        if not math.isfinite(a):
            return False
        if not math.isfinite(b):
            return True
        return a < b if self.direction == "min" else a > b


def parse_metric_spec(text: str, setting: str) -> MetricSpec:
    """`fit/loss`, `img/diversity:max` -> MetricSpec. Raises ValueError with one paragraph naming `setting` and the
    accepted forms when the direction is unknown or missing for a metric outside `DIRECTIONS`."""
    name, _, direction = str(text).strip().partition(":")
    known = ", ".join(f"{m} ({d})" for m, d in DIRECTIONS.items())
    if not name:
        raise ValueError(f"{setting} = {text!r} names no metric: write METRIC[:max|min], e.g. fit/loss or "
                         f"img/diversity:max. Metrics with a default direction: {known}.")
    if direction and direction not in DIRECTION_WORDS:
        raise ValueError(f"{setting} = {text!r}: the direction after ':' must be max or min, not {direction!r}.")
    if not direction and name not in DIRECTIONS:
        raise ValueError(f"{setting} = {text!r}: {name} has no default direction; write {name}:max or {name}:min. "
                         f"Metrics with a default direction: {known}.")
    return MetricSpec(name, direction or DIRECTIONS[name])
