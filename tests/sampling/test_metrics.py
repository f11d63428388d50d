"""Image statistics: hand-computed values on tiny arrays, and the right direction on real photos."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from lora_sweep.sampling.metrics import (
    DID_NOT_DECREASE,
    METRIC_KEYS,
    ONLY_START_AND_END,
    fitting_speed,
    image_metrics,
    laplacian_variance,
    mean_metrics,
)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photo (scikit-image's astronaut, bundled offline), downscaled to keep the tests fast."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((256, 256), Image.Resampling.BICUBIC)


def test_uniform_grey_has_known_values():
    grey = np.full((8, 8, 3), 128, dtype=np.uint8)
    m = image_metrics(grey)
    assert m["luminance_mean"] == pytest.approx(128 / 255)
    assert m["luminance_std"] == pytest.approx(0.0, abs=1e-12)
    assert m["edge_energy"] == pytest.approx(0.0, abs=1e-12)
    assert m["colorfulness"] == pytest.approx(0.0, abs=1e-9)
    assert m["cast_yb"] == pytest.approx(0.0, abs=1e-12)
    assert m["cast_rg"] == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_cast_colorfulness_and_laplacian():
    # Pure yellow (R=G=1, B=0): yb = 1 everywhere, rg = 0; colourfulness = 0.3 * 255 * 1 (no spread).
    yellow = np.zeros((4, 4, 3))
    yellow[:, :, :2] = 1.0
    m = image_metrics(yellow)
    assert m["cast_yb"] == pytest.approx(1.0)
    assert m["cast_rg"] == pytest.approx(0.0)
    assert m["colorfulness"] == pytest.approx(0.3 * 255.0)
    assert m["luminance_mean"] == pytest.approx(0.2126 + 0.7152)
    # A single bright pixel in a 3x3 image: the only interior Laplacian value is -4, variance of one value is 0;
    # in 4x3 the interior has two values (-4 and 1): variance 6.25.
    dot = np.zeros((3, 4))
    dot[1, 1] = 1.0
    assert laplacian_variance(dot) == pytest.approx(6.25)


def test_brighter_image_has_higher_mean_luminance(photo):
    brighter = ImageEnhance.Brightness(photo).enhance(1.3)
    assert image_metrics(brighter)["luminance_mean"] > image_metrics(photo)["luminance_mean"] + 0.05


def test_blurred_image_has_lower_edge_energy(photo):
    blurred = photo.filter(ImageFilter.GaussianBlur(radius=2))
    assert image_metrics(blurred)["edge_energy"] < 0.5 * image_metrics(photo)["edge_energy"]


def test_contrast_raises_luminance_spread(photo):
    flat = ImageEnhance.Contrast(photo).enhance(0.5)
    assert image_metrics(flat)["luminance_std"] < image_metrics(photo)["luminance_std"]


def test_yellow_tint_gives_yellower_cast_and_blue_tint_the_opposite(photo):
    rgb = np.asarray(photo, dtype=np.float64)
    yellow = np.clip(rgb * np.array([1.0, 1.0, 0.8]) + np.array([12.0, 12.0, 0.0]), 0, 255).astype(np.uint8)
    blue = np.clip(rgb * np.array([0.85, 0.9, 1.0]), 0, 255).astype(np.uint8)
    base = image_metrics(photo)["cast_yb"]
    assert image_metrics(yellow)["cast_yb"] > base + 0.03
    assert image_metrics(blue)["cast_yb"] < base - 0.03


def test_desaturated_is_less_colorful(photo):
    grey_ish = ImageEnhance.Color(photo).enhance(0.3)
    assert image_metrics(grey_ish)["colorfulness"] < 0.5 * image_metrics(photo)["colorfulness"]


def test_mean_metrics_prefix_and_average(photo):
    black = Image.new("RGB", (16, 16), (0, 0, 0))
    white = Image.new("RGB", (16, 16), (255, 255, 255))
    means = mean_metrics([black, white])
    assert set(means) == {f"img/{key}" for key in METRIC_KEYS}
    assert means["img/luminance_mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_metrics([])


def test_modes_and_shapes_are_accepted():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 10))
    assert image_metrics(rgba)["cast_rg"] == pytest.approx(1.0)  # alpha is dropped, not blended
    assert image_metrics(np.zeros((8, 8), dtype=np.uint8))["luminance_mean"] == 0.0
    with pytest.raises(ValueError):
        image_metrics(np.zeros((8, 8, 2)))
    with pytest.raises(ValueError):
        image_metrics(np.zeros((2, 2, 3)))


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
