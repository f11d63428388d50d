"""The statistics of a comparison: means with intervals, differences with intervals, and how fast a curve falls.

Pure functions on plain numbers (no MLflow, no torch); the distributions come from scipy. Every interval is a
two-sided Student t interval at `CONFIDENCE` (0.95):
- a mean over n replicates: mean +- t_{n-1} * s / sqrt(n) (`mean_interval`);
- a paired difference over n pairs (the same seed, the same (image, t, eps) point or the same (prompt, seed)
  image in both variants): the mean of b - a with the t interval of the differences (`paired_difference`), which
  removes what the pairs share (a hard image, a high timestep) and so is narrower than the unpaired interval;
- an unpaired difference: Welch's interval (unequal variances, Welch-Satterthwaite degrees of freedom),
  `unpaired_difference`.
With one value (n = 1) there is no spread to estimate: no interval is made up, and the note says so.

A difference is "within noise" when its interval covers zero; the report then shows "within noise", never a
percentage. It is "no difference" when the values are identical: every pair's difference is zero (or, one run
each, the two values are equal), so there is no spread either; that is what two variants that train the same
config show, and "within noise [+0, +0]" would wrongly suggest a noise that is not there.

Floating-point resolution: two values whose difference is at most `RESOLUTION` (1e-9) times their magnitude are
equal; the magnitude is at least the metric's `scale`, the size of the terms it is computed from (1 for an MSE of
unit-variance noise or a statistic of [0, 1] pixels), since a value near 0 made of such terms carries their
rounding (the spread of a flat image's luma is 1e-17, not 0). The metrics are computed in float32 on the device
(one float32 step is 2^-23 ~ 1.2e-7 of the value, so a real difference between two runs is never smaller than
~6e-8 relative), then post-processed in float64 (sums here, the interpolation of `sampling.metrics.fitting_speed`),
whose rounding stays orders of magnitude below 1e-9: a difference of -5.551e-12 steps between two fitting speeds is
rounding, and reads 0.

Bounds: `clip` cuts an interval at a metric's natural bounds (a step count lies within the run, an MSE is not
negative). The true value lies inside those bounds, so the clipped interval covers it whenever the t interval
does: the coverage stays 95 %, and the interval no longer shows values the metric cannot take.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
REPLICATE_HINT = "add replicates with train.seed=1,2,3"
NO_INTERVAL_N1 = f"n = 1: no interval ({REPLICATE_HINT})"
RESOLUTION = 1e-9  # relative: differences below it are floating-point rounding (module docstring)


def resolved(a: float, b: float, scale: float = 0.0) -> float:
    """b - a, or exactly 0.0 when |b - a| <= RESOLUTION * max(|a|, |b|, scale) (rounding, not a difference)."""
    diff = float(b) - float(a)
    return 0.0 if abs(diff) <= RESOLUTION * max(abs(float(a)), abs(float(b)), scale) else diff


@dataclass(frozen=True)
class Estimate:
    """A mean with its interval. `low`/`high` are None when there is no interval (n < 2), and `note` says why."""

    mean: float
    low: float | None
    high: float | None
    n: int
    note: str = ""
    clipped: bool = False  # the interval was cut at the metric's natural bounds (`clip`)
    missing: str = ""  # why some or all runs have no value ("did not decrease ..."), shown beside the mean

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    def as_dict(self) -> dict:
        return {"mean": _json_float(self.mean), "low": _json_float(self.low), "high": _json_float(self.high),
                "n": self.n, "note": self.note, "clipped": self.clipped, "missing": self.missing}


@dataclass(frozen=True)
class Difference:
    """b - a with its interval. `basis` says what was paired ("paired over 3 seeds", ...); `n` counts pairs
    (paired) or all values (unpaired). No interval: `low`/`high` None and `note` says why. No value at all (a side
    has none): `effect` NaN, `n` 0 and `note` says why. `identical`: the values are the same (every pair's
    difference is zero, or the one value of each side is equal). `at_start`/`change`: set by the comparison when
    the two variants already differ before training (see effects.difference)."""

    effect: float
    low: float | None
    high: float | None
    n: int
    basis: str
    note: str = ""
    identical: bool = False
    clipped: bool = False  # the interval was cut at the metric's natural bounds (`clip`)
    at_start: Difference | None = None  # the same difference at step 0, before any training
    change: Difference | None = None  # the difference of the changes from step 0 (the effect of training)
    of: str = ""  # the metric this difference is in, when it is not the row's own (at_start of the fitting speed)

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def within_noise(self) -> bool | None:
        """True when the interval covers zero (identical values too), False when it excludes zero, None without
        an interval."""
        if not self.has_interval:
            return None
        return self.low <= 0.0 <= self.high

    @property
    def verdict(self) -> str:
        """'no difference' (identical values), 'different', 'within noise', 'no interval' or 'no value'."""
        if self.identical:
            return "no difference"
        if not math.isfinite(self.effect):
            return "no value"
        return {True: "within noise", False: "different", None: "no interval"}[self.within_noise]

    def as_dict(self) -> dict:
        found = {"effect": _json_float(self.effect), "low": _json_float(self.low), "high": _json_float(self.high),
                 "n": self.n, "basis": self.basis, "note": self.note, "within_noise": self.within_noise,
                 "verdict": self.verdict, "identical": self.identical, "clipped": self.clipped}
        if self.of:
            found["metric"] = self.of
        if self.at_start is not None:
            found["at_start"] = self.at_start.as_dict()
            found["change"] = None if self.change is None else self.change.as_dict()
        return found


def clip(found, lower: float, upper: float, what: str = "the metric's natural bounds"):
    """An `Estimate` or `Difference` whose interval is cut to [lower, upper] (unchanged when it lies inside; the
    coverage argument is in the module docstring). `clipped` is set and the note says so."""
    if not found.has_interval or (found.low >= lower and found.high <= upper):
        return found
    note = "; ".join(n for n in (found.note, f"interval clipped at {what} [{lower:g}, {upper:g}]") if n)
    return dataclasses.replace(found, low=max(found.low, lower), high=min(found.high, upper), clipped=True,
                               note=note)


def _json_float(value: float | None) -> float | None:
    """JSON has no NaN: None stands for a missing number."""
    return None if value is None or not math.isfinite(value) else float(value)


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=np.float64)
    return array[np.isfinite(array)]


def _t_interval(mean: float, sem: float, df: float, confidence: float) -> tuple[float, float]:
    """scipy's t interval; a zero standard error (identical values) gives the degenerate interval [mean, mean]."""
    from scipy import stats

    if sem == 0.0:
        return mean, mean
    low, high = stats.t.interval(confidence, df, loc=mean, scale=sem)
    return float(low), float(high)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE, *, scale: float = 0.0) -> Estimate:
    """Mean of `values` (non-finite ones dropped) with its t interval over n - 1 degrees of freedom.

    n = 0 gives a NaN mean and n = 1 the value itself, both without an interval (and a note saying why).
    """
    from scipy import stats

    array = _finite(values)
    if array.size == 0:
        return Estimate(float("nan"), None, None, 0, "no value")
    mean = float(array.mean())
    if array.size == 1:
        return Estimate(mean, None, None, 1, NO_INTERVAL_N1)
    if all(resolved(array[0], x, scale) == 0.0 for x in array):
        return Estimate(mean, mean, mean, int(array.size))  # identical values: no spread (not rounding's)
    low, high = _t_interval(mean, float(stats.sem(array)), array.size - 1, confidence)
    return Estimate(mean, low, high, int(array.size))


def paired_difference(a: Sequence[float], b: Sequence[float], *, unit: str = "pairs",
                      confidence: float = CONFIDENCE, scale: float = 0.0) -> Difference:
    """Mean of b[i] - a[i] over the pairs where both are finite, with the t interval of the differences
    (the interval of scipy.stats.ttest_rel). `unit` names what a pair is ("seeds", "(image, t, eps) points").
    Each pair's difference is `resolved` (rounding reads 0); when every one is 0 the result is `identical`.

    Raises ValueError when a and b have different lengths (the pairing would be a guess).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} values against {len(b)}; pairs need equal lengths")
    d = np.array([resolved(x, y, scale) if math.isfinite(x) and math.isfinite(y) else math.nan
                  for x, y in zip(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), strict=True)])
    d = d[np.isfinite(d)]
    basis = f"paired over {d.size} {unit}"
    if d.size == 0:
        return Difference(float("nan"), None, None, 0, basis, "no pair has both values")
    estimate = mean_interval(d, confidence)
    note = "" if estimate.has_interval else "one pair: no interval"
    return Difference(estimate.mean, estimate.low, estimate.high, int(d.size), basis, note,
                      identical=bool(np.all(d == 0.0)))


def unpaired_difference(a: Sequence[float], b: Sequence[float], *, unit: str = "runs",
                        confidence: float = CONFIDENCE, scale: float = 0.0) -> Difference:
    """mean(b) - mean(a) with Welch's t interval (scipy.stats.ttest_ind(b, a, equal_var=False)); no interval
    unless both sides have at least two values."""
    from scipy import stats

    xa, xb = _finite(a), _finite(b)
    basis = f"unpaired, {xa.size} + {xb.size} {unit}"
    if xa.size == 0 or xb.size == 0:
        return Difference(float("nan"), None, None, int(xa.size + xb.size), basis, "a side has no value")
    effect = resolved(float(xa.mean()), float(xb.mean()), scale)
    identical = all(resolved(xa[0], x, scale) == 0.0 for x in (*xa, *xb))
    if xa.size < 2 or xb.size < 2:
        return Difference(effect, None, None, int(xa.size + xb.size), basis, NO_INTERVAL_N1, identical=identical)
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    if va + vb == 0.0 or identical:
        return Difference(effect, effect, effect, int(xa.size + xb.size), basis, identical=identical)
    interval = stats.ttest_ind(xb, xa, equal_var=False).confidence_interval(confidence)
    return Difference(effect, float(interval.low), float(interval.high), int(xa.size + xb.size), basis)


def no_interval(a: float, b: float, basis: str = "1 run each", note: str = NO_INTERVAL_N1, *,
                scale: float = 0.0) -> Difference:
    """b - a (`resolved`) when nothing pairs or replicates them: the difference, and no interval; `identical`
    when the two values are equal."""
    effect = resolved(a, b, scale)
    return Difference(effect, None, None, 2, basis, note, identical=effect == 0.0)
