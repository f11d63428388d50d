"""The comparison's statistics on constructed data: what is different, what is noise, what pairing buys, and
that one value never gets a made-up interval."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lora_sweep.compare.stats import (
    NO_INTERVAL_N1,
    mean_interval,
    no_interval,
    paired_difference,
    unpaired_difference,
)


def test_mean_interval_is_the_t_interval():
    values = [1.0, 2.0, 3.0, 4.0]
    estimate = mean_interval(values)
    half = scipy_stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2  # sqrt(4) = 2
    assert estimate.mean == pytest.approx(2.5) and estimate.n == 4
    assert (estimate.low, estimate.high) == pytest.approx((2.5 - half, 2.5 + half))


def test_one_value_gives_no_interval_and_says_so():
    estimate = mean_interval([0.42])
    assert estimate.mean == 0.42 and estimate.n == 1
    assert estimate.low is None and estimate.high is None and not estimate.has_interval
    assert "n = 1" in estimate.note and "train.seed=1,2,3" in estimate.note
    difference = unpaired_difference([1.0], [2.0, 2.1])
    assert difference.effect == pytest.approx(1.05) and difference.within_noise is None
    assert difference.verdict == "no interval" and difference.note == NO_INTERVAL_N1
    single = no_interval(1.0, 1.5)
    assert single.effect == 0.5 and not single.has_interval and single.verdict == "no interval"
    assert paired_difference([1.0], [2.0]).verdict == "no interval"
    assert mean_interval([float("nan")]).n == 0  # non-finite values are dropped, not averaged


def test_a_difference_larger_than_the_spread_is_different():
    rng = np.random.default_rng(0)
    a = 1.0 + 0.01 * rng.standard_normal(5)
    b = 1.2 + 0.01 * rng.standard_normal(5)
    for difference in (unpaired_difference(a, b), paired_difference(a, b, unit="seeds")):
        assert difference.within_noise is False and difference.verdict == "different"
        assert 0 < difference.low < 0.2 < difference.high
    assert paired_difference(a, b, unit="seeds").basis == "paired over 5 seeds"


def test_identical_variants_are_within_noise():
    a = [1.0, 1.1, 0.9, 1.05]
    for difference in (unpaired_difference(a, list(a)), paired_difference(a, list(a))):
        assert difference.effect == pytest.approx(0.0)
        assert difference.within_noise is True
    # unpaired, the spread of each side is noise; paired, every pair is equal: no difference, no spread
    assert unpaired_difference(a, list(a)).verdict == "within noise"
    assert paired_difference(a, list(a)).verdict == "no difference"
    # a small shift against a large spread is noise too
    rng = np.random.default_rng(1)
    noisy_a, noisy_b = rng.normal(1.0, 0.5, 4), rng.normal(1.02, 0.5, 4)
    assert unpaired_difference(noisy_a, noisy_b).within_noise is True


def test_pairing_gives_a_narrower_interval_than_unpaired_on_the_same_numbers():
    # Each point's level (an image, a timestep) varies a lot; the variant shifts every point by about 0.05.
    level = np.array([0.1, 0.5, 0.9, 0.3, 0.7, 0.2])
    a = level
    b = level + 0.05 + np.array([0.002, -0.001, 0.001, -0.002, 0.0, 0.001])
    paired, unpaired = paired_difference(a, b), unpaired_difference(a, b)
    assert paired.effect == pytest.approx(unpaired.effect)
    assert (paired.high - paired.low) < 0.1 * (unpaired.high - unpaired.low)
    assert paired.within_noise is False and unpaired.within_noise is True
    # Welch's interval is scipy's
    expected = scipy_stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert (unpaired.low, unpaired.high) == pytest.approx((expected.low, expected.high))
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])


def test_identical_values_read_no_difference_and_rounding_is_no_difference():
    from lora_sweep.compare.stats import RESOLUTION, resolved

    # steps to half of v55 -> v56: -5.551e-12 is float64 rounding, not an effect
    assert resolved(4.0, 4.0 - 5.551e-12) == 0.0 and RESOLUTION == 1e-9
    bare = no_interval(4.0, 4.0 - 5.551e-12)
    assert bare.effect == 0.0 and bare.identical and bare.verdict == "no difference"
    paired = paired_difference([0.11, 0.52, 0.93], [0.11, 0.52 + 1e-15, 0.93])
    assert paired.identical and (paired.effect, paired.low, paired.high) == (0.0, 0.0, 0.0)
    assert paired.verdict == "no difference" and paired.as_dict()["identical"] is True
    # one float32 step (~1.2e-7 relative) between two runs' values is a real difference, and stays one
    real = no_interval(0.5, 0.5 * (1 + 2 ** -23))
    assert real.effect > 0 and not real.identical and real.verdict == "no interval"
    assert not unpaired_difference([1.0, 1.5], [1.0, 1.5 + 1e-6]).identical
    assert unpaired_difference([1.0, 1.0], [1.0, 1.0]).verdict == "no difference"
    assert paired_difference([1.0, float("nan")], [float("nan"), 2.0]).verdict == "no value"
    # a value near 0 made of O(1) terms (a flat image's luma spread) carries their rounding: the metric's scale
    assert no_interval(1.388e-17, 5.551e-17).verdict == "no interval"
    assert no_interval(1.388e-17, 5.551e-17, scale=1.0).verdict == "no difference"
    assert paired_difference([1e-17, 2e-17], [5e-17, -3e-17], scale=1.0).verdict == "no difference"


def test_clip_keeps_an_interval_within_the_metrics_bounds():
    from lora_sweep.compare.stats import clip

    estimate = mean_interval([0.5, 4.0])  # two replicates' steps to half: the t interval reaches below 0
    assert estimate.low < 0 and estimate.high > 8
    clipped = clip(estimate, 0.0, 8.0)
    assert (clipped.low, clipped.high, clipped.mean) == (0.0, 8.0, 2.25) and clipped.clipped
    assert "clipped at the metric's natural bounds [0, 8]" in clipped.note and clipped.as_dict()["clipped"]
    inside = mean_interval([3.0, 3.5, 4.0])
    assert clip(inside, 0.0, 8.0) is inside and not inside.clipped
    assert clip(mean_interval([1.0]), 0.0, 8.0).low is None  # no interval: nothing to clip
