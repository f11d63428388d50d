"""The scorecard's pixel metrics (sampling/scorecard.py) on planted images: a copy of a training image, identical
and different seeds, a step-0 sample against itself."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_sweep.sampling import scorecard


def noise_image(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def samples(images: list[Image.Image], groups: list[list[int]], step: int = 5) -> scorecard.StepSamples:
    keys = [f"sample_p00_s{i}" for i in range(len(images))]
    return scorecard.StepSamples(step, keys, images, ["a cat"] * len(images), groups)


def test_a_sample_equal_to_a_training_image_has_copying_one():
    training = [noise_image(1), noise_image(2)]
    thumbs = [scorecard.thumbnail(image) for image in training]
    scores = scorecard.pixel_scores(samples([noise_image(2), noise_image(3)], [[0], [1]]), thumbs, None)
    assert scores["img/copying_max"] == pytest.approx(1.0)
    assert scores["img/copying"] < 1.0 and "img/diversity" not in scores and "img/drift" not in scores


def test_diversity_is_zero_for_identical_samples_and_positive_for_different_ones():
    same = scorecard.pixel_scores(samples([noise_image(4), noise_image(4)], [[0, 1]]), [], None)
    assert same == {"img/diversity": pytest.approx(0.0, abs=1e-12)}  # no training images: no copying
    different = scorecard.pixel_scores(samples([noise_image(4), noise_image(5), noise_image(6)], [[0, 1, 2]]), [],
                                       None)
    assert different["img/diversity"] > 0.5  # independent noise: SSIM near 0


def test_drift_is_zero_against_itself_and_compares_by_key():
    images = [noise_image(7), noise_image(8)]
    step0 = samples(images, [[0], [1]], step=0)
    reference = {key: scorecard.thumbnail(image) for key, image in zip(step0.keys, images, strict=True)}
    assert scorecard.pixel_scores(step0, [], reference) == {"img/drift": 0.0}
    swapped = samples(images[::-1], [[0], [1]])
    assert scorecard.pixel_scores(swapped, [], reference)["img/drift"] > 0.5


def test_at_most_max_training_images_are_compared_evenly_spaced(monkeypatch):
    monkeypatch.setattr(scorecard, "MAX_TRAINING_IMAGES", 3)
    assert scorecard.pick_training(list(range(10))) == [0, 4, 9]  # linspace(0, 9, 3) rounded: 0, 4.5 -> 4, 9
    assert scorecard.pick_training([1, 2]) == [1, 2]


def test_copying_rises_as_the_samples_move_toward_the_one_training_image():
    """The issue's planted case on the scorecard itself: samples of two seeds drawn ever closer to the one training
    image (a blend from noise to it), as a LoRA trained on one image for many steps draws; synthetic, so the trend is
    the metric's and not a tiny random model's."""
    target = np.asarray(noise_image(7, size=8).resize((64, 64), Image.Resampling.NEAREST), dtype=np.float64)
    training = [scorecard.thumbnail(Image.fromarray(target.astype(np.uint8)))]
    starts = [np.asarray(noise_image(seed), dtype=np.float64) for seed in (11, 12)]
    reference = {f"sample_p00_s{i}": scorecard.thumbnail(Image.fromarray(s.astype(np.uint8)))
                 for i, s in enumerate(starts)}
    scores = []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):  # the training steps, as the fraction of the way to the image
        drawn = [Image.fromarray(((1 - t) * s + t * target).round().astype(np.uint8)) for s in starts]
        scores.append(scorecard.pixel_scores(samples(drawn, [[0, 1]]), training, reference))
    copying = [s["img/copying"] for s in scores]
    assert copying == sorted(copying) and copying[0] < 0.2 and copying[-1] == pytest.approx(1.0), copying
    diversity = [s["img/diversity"] for s in scores]  # the seeds converge on the same picture
    assert diversity == sorted(diversity, reverse=True) and diversity[-1] == pytest.approx(0.0), diversity
    drift = [s["img/drift"] for s in scores]  # away from what the base model drew at step 0
    assert drift == sorted(drift) and drift[0] == pytest.approx(0.0), drift
