"""The comparison's statistics on constructed data: what is different, what is noise, what pairing buys, and
that one value never gets a made-up interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lora_sweep.compare.stats import (
    DID_NOT_DECREASE,
    NO_INTERVAL_N1,
    ONLY_START_AND_END,
    fitting_speed,
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


def test_fitting_speed_area_and_half_decrease():
    # 1.0 -> 0.2 linearly over 100 steps, then flat: total decrease 0.8, half reached at 0.6 = step 50
    history = [(0, 1.0), (100, 0.2), (200, 0.2)]
    speed = fitting_speed(history)
    assert speed.steps_to_half == pytest.approx(50.0)
    assert speed.loss_auc == pytest.approx((0.6 * 100 + 0.2 * 100) / 200)
    faster = fitting_speed([(0, 1.0), (50, 0.2), (200, 0.2)])
    assert faster.steps_to_half < speed.steps_to_half and faster.loss_auc < speed.loss_auc
    # a curve that dips and comes back up to its start did not decrease: no value, and why
    back = fitting_speed([(0, 1.0), (10, 0.0), (20, 1.0)])
    assert back.steps_to_half is None and back.why_none == DID_NOT_DECREASE
    assert fitting_speed([(0, 1.0), (5, 1.05), (10, 1.1)]).why_none == DID_NOT_DECREASE  # never decreases
    # 1.156097 -> 1.1560910 -> 1.1561027 ends above its start: no value (not 2.0)
    assert fitting_speed([(0, 1.156097), (4, 1.1560910), (8, 1.1561027)]).steps_to_half is None
    # a dip below the final value: half of the total decrease (start - final = 0.5), not of start - lowest
    assert fitting_speed([(0, 1.0), (10, 0.0), (20, 0.5)]).steps_to_half == pytest.approx(2.5)
    assert fitting_speed([(0, 1.0)]) is None
    assert math.isfinite(fitting_speed([(10, 0.5), (0, 1.0), (5, float("nan"))]).loss_auc)


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


def test_fitting_speed_is_exact_where_the_curve_halves_between_two_evaluations():
    # Two variants whose fit/loss falls by a tiny amount in one evaluation interval both reach half of their
    # decrease at the mid-step; computed from the values (v0 - target) / (v0 - v1) this came out 4 +- 5e-12.
    for start, decrease in ((0.1234567, 3e-5), (0.0987654, 1.1e-6), (0.15, 7.77e-5)):
        assert fitting_speed([(0, start), (8, start - decrease), (16, start - decrease)]).steps_to_half == 4.0
    # total decrease 1.0 - 0.25 = 0.75, half = 0.375, reached between step 4 (drop 0.1) and step 8 (drop 0.8)
    assert fitting_speed([(0, 1.0), (4, 0.9), (8, 0.2), (12, 0.25)]).steps_to_half == pytest.approx(
        4 + (0.375 - 0.1) / (0.8 - 0.1) * 4)


def test_steps_to_half_needs_more_than_the_start_and_the_end():
    # validation.every=0 (the default) evaluates fit/loss at step 0 and the end: the interpolation would put half
    # of any decrease at max_steps/2 for every run ("2 (no spread)", "no difference")
    for history in ([(0, 1.0), (4, 0.5)], [(0, 1.0), (4, 0.999)], [(0, 1.0), (4, 0.1)]):
        speed = fitting_speed(history)
        assert speed.steps_to_half is None and speed.why_none == ONLY_START_AND_END
        assert speed.loss_auc == pytest.approx((1.0 + history[-1][1]) / 2)  # the area is still there
    assert ONLY_START_AND_END == "fit/loss evaluated only at the start and end: set validation.every"
    assert fitting_speed([(0, 1.0), (2, 0.75), (4, 0.5)]).steps_to_half == pytest.approx(2.0)  # three: a value


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
