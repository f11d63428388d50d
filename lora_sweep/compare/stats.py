"""The statistics of a comparison: means and differences with intervals. Pure functions on plain numbers.

Every interval is a two-sided Student t interval at `CONFIDENCE`: a mean over n replicates (`mean_interval`); a
paired difference over n pairs (same seed, (image, t, eps) point or (prompt, seed) image: narrower, since it
removes what pairs share; `paired_difference`); Welch's unpaired difference (`unpaired_difference`). n = 1 gets
no interval, and a note. Verdicts: "within noise" when the interval covers 0; "no difference" when the values are
identical (two names for one config), never "within noise [+0, +0]".

Resolution: values within `RESOLUTION` (1e-9) of their magnitude, at least the metric's `scale`, are equal.
Why 1e-9: metrics are float32 (real differences >= ~6e-8 relative), post-processing float64 (rounding far below).
`clip` cuts intervals at a metric's natural bounds; the true value is inside them, so coverage stays 95 %.
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
    """A mean with its interval; `low`/`high` None when there is none (n < 2), and `note` says why."""

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
    """b - a with its interval. `basis`: what was paired ("paired over 3 seeds"); `n`: pairs, or all values.

    No interval: `low`/`high` None, `note` says why. No value (a side has none): `effect` NaN, `n` 0.
    `identical`: the values are the same. `at_start`/`change`: set when the variants differ before training.
    """

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
    not_finite: str = ""  # no value because side "a" or "b" ended not finite (diverged) while the other did not

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def within_noise(self) -> bool | None:
        """True when the interval covers zero, False when it excludes it, None without an interval."""
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
        if self.not_finite:
            found["not_finite"] = self.not_finite
        if self.at_start is not None:
            found["at_start"] = self.at_start.as_dict()
            found["change"] = None if self.change is None else self.change.as_dict()
        return found


def clip(found, lower: float, upper: float, what: str = "the metric's natural bounds"):
    """`found` with its interval cut to [lower, upper]; `clipped` is set and the note says so."""
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
    """Mean of `values` (non-finite dropped) with its t interval over n - 1 degrees of freedom.

    n = 0: a NaN mean; n = 1: the value; neither has an interval (the note says why).
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
    """Mean of b[i] - a[i] over pairs with both finite, with the differences' t interval (as ttest_rel).

    `unit` names a pair ("seeds"). Each difference is `resolved`; all 0 gives `identical`.
    Raises ValueError for unequal lengths (the pairing would be a guess).
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
    """mean(b) - mean(a) with Welch's t interval; no interval unless each side has two values."""
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
    """b - a (`resolved`) when nothing pairs or replicates them; `identical` when equal."""
    effect = resolved(a, b, scale)
    return Difference(effect, None, None, 2, basis, note, identical=effect == 0.0)
