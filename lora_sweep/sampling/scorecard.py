"""The scorecard's pixel metrics of a sampling step, model-free (docs/comparing.md): SSIM (scikit-image's
`structural_similarity`) of greyscale thumbnails, `SIDE` x `SIDE` pixels, each image squeezed to a square.

- img/copying, img/copying_max: per sample, the largest SSIM to any training image; their mean and max (min is
  better: a rising curve is the LoRA reproducing its data);
- img/diversity: per prompt, the mean 1 - SSIM over pairs of its seeds' samples; mean over prompts (only with two
  seeds or more);
- img/drift: per sample, 1 - SSIM to the step-0 sample of its key (prompt and seed: what the base model drew); mean.

At most `MAX_TRAINING_IMAGES` training images are compared (evenly spaced in the order given).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SIDE = 64  # thumbnail side: SSIM at 64 px judges layout and shapes, not noise, in about a millisecond a pair
MAX_TRAINING_IMAGES = 128  # copying compares each sample with at most this many training images
PIXEL_METRICS = ("img/copying", "img/copying_max", "img/diversity", "img/drift")
EMBEDDING_METRICS = ("img/clip_t", "img/clip_i", "img/dino")  # sampling/embeddings.py, with a weights folder
METRICS = (*PIXEL_METRICS, *EMBEDDING_METRICS)  # every scorecard metric, in the report's order


@dataclass(frozen=True)
class StepSamples:
    """One sampling step's images in the Sampler's order (prompt-major: p00 of each seed, then p01 ...)."""

    step: int
    keys: list[str]  # the MLflow image keys (images.sample_keys)
    images: list[Image.Image]
    prompts: list[str]  # each sample's prompt text
    groups: list[list[int]]  # indices of `images`, one list per prompt: its seeds


# A scorer: (a step's samples, the run's training image paths) -> {metric: value}; {} when it has nothing to say.
Scorer = Callable[[StepSamples, Sequence[Path]], dict[str, float]]


def thumbnail(image: Image.Image) -> np.ndarray:
    """float64 greyscale in [0, 1], SIDE x SIDE (averaged pixels: a box filter)."""
    grey = ImageOps.exif_transpose(image).convert("L").resize((SIDE, SIDE), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float64) / 255.0


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two thumbnails (1: identical)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=1.0))


def pick_training(paths: Sequence[Path]) -> list[Path]:
    """All paths up to MAX_TRAINING_IMAGES, else that many evenly spaced."""
    if len(paths) <= MAX_TRAINING_IMAGES:
        return list(paths)
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, MAX_TRAINING_IMAGES).round()]


def training_thumbnails(paths: Sequence[Path]) -> list[np.ndarray]:
    """The thumbnails copying compares with (`pick_training` of `paths`), each file read once."""
    thumbs = []
    for path in pick_training(paths):
        with Image.open(path) as image:
            image.draft("RGB", (4 * SIDE, 4 * SIDE))  # a JPEG decodes at a reduced scale: big photos read fast
            thumbs.append(thumbnail(image))
    return thumbs


def copying(samples: Sequence[np.ndarray], training: Sequence[np.ndarray]) -> dict[str, float]:
    """img/copying (mean over samples of the max SSIM to a training image) and img/copying_max; {} without both."""
    if not samples or not training:
        return {}
    nearest = [max(ssim(sample, image) for image in training) for sample in samples]
    return {"img/copying": float(np.mean(nearest)), "img/copying_max": float(np.max(nearest))}


def diversity(samples: Sequence[np.ndarray], groups: Sequence[Sequence[int]]) -> dict[str, float]:
    """img/diversity: the mean over prompts with two samples or more of their mean pairwise 1 - SSIM; {} when none."""
    per_prompt = [float(np.mean([1.0 - ssim(samples[i], samples[j]) for i, j in itertools.combinations(group, 2)]))
                  for group in groups if len(group) >= 2]
    return {"img/diversity": float(np.mean(per_prompt))} if per_prompt else {}


def drift(samples: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """img/drift: the mean over keys with a step-0 sample of 1 - SSIM to it; {} when no key has one."""
    distances = [1.0 - ssim(thumb, reference[key]) for key, thumb in samples.items() if key in reference]
    return {"img/drift": float(np.mean(distances))} if distances else {}


def pixel_scores(samples: StepSamples, training: Sequence[np.ndarray],
                 reference: Mapping[str, np.ndarray] | None) -> dict[str, float]:
    """The step's img/copying, img/copying_max, img/diversity and img/drift, each left out when it cannot be computed
    (no training thumbnails, fewer than two seeds, no step-0 samples)."""
    thumbs = [thumbnail(image) for image in samples.images]
    by_key = dict(zip(samples.keys, thumbs, strict=True))
    return copying(thumbs, training) | diversity(thumbs, samples.groups) | drift(by_key, reference or {})
