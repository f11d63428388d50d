"""Cheap, model-free statistics of a sample image, each chosen to put a number on one of the article's remarks.

The article's author compared twelve variants by eye. These statistics do not judge quality; they measure the
few properties the author's remarks are about, so that two variants' samples (same prompt, same seed, same step)
can be compared with numbers as well as eyes:

- luminance_mean: mean luma (BT.709 weights on sRGB values, 0..1); noise offset "changes how bright and dark
  areas are strengthened or weakened".
- luminance_std: spread of luma over the image (global contrast); the same remark.
- edge_energy: variance of the 4-neighbour Laplacian of the luma (the classic sharpness measure); multires noise
  "stronger edges", min-SNR "soft edges, loss of fine detail", debiased "very strong edges", IP noise "adds some
  detail".
- colorfulness: Hasler & Süsstrunk (2003), 0..255 (0 = grey; ~33 "moderately", ~59 "quite"); Prodigy "keeps
  colours stable", fp16 "more varied content".
- cast_yb: mean of (R+G)/2 - B, 0..1, > 0 = yellow; cast_rg: mean of R - G, 0..1, > 0 = red: the yellow cast most
  variants showed (white balance of the training photos), v56 and v61 not.

All functions are pure (PIL or numpy in, floats out) and cost a few milliseconds per image.

`fitting_speed` measures a run's fit/loss curve instead: how fast it falls. Training logs it at the end of a run
and the report recomputes it from the run's whole history, so it lives here, where both may import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# BT.709 luma weights, applied to the gamma-encoded sRGB values as stored in the PNG (i.e. luma Y', not CIE Y):
# what a viewer perceives as brightness, and what the article's "bright and dark areas" remark is about.
LUMA_WEIGHTS = np.array([0.2126, 0.7152, 0.0722], dtype=np.float64)

METRIC_KEYS = ("luminance_mean", "luminance_std", "edge_energy", "colorfulness", "cast_yb", "cast_rg")
"""The keys `image_metrics` returns, in a stable order (reports and logs list them in this order)."""


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Return the image as float64 RGB in [0, 1], shape (H, W, 3).

    PIL images of any mode are converted to RGB (alpha is dropped: samples are opaque). numpy input may be
    uint8 (0..255), float (taken as 0..1), (H, W) grey or (H, W, 3|4).
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    array = np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    array = array.astype(np.float64) / scale
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {array.shape}")
    return array[:, :, :3]


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.709 luma of an (H, W, 3) array in [0, 1]."""
    return rgb @ LUMA_WEIGHTS


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels (no padding, so borders add no edges).

    A blur removes high frequencies and lowers it; added fine texture or crisper edges raise it. Needs at least
    3x3 pixels.
    """
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        raise ValueError(f"edge energy needs an image of at least 3x3 pixels, got {gray.shape[1]}x{gray.shape[0]}")
    center = gray[1:-1, 1:-1]
    laplacian = gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4.0 * center
    return float(laplacian.var())


def hasler_susstrunk_colorfulness(rgb: np.ndarray) -> float:
    """Colourfulness M = sigma_rgyb + 0.3 * mu_rgyb on the 0..255 scale of the paper.

    rg = R - G and yb = (R + G)/2 - B are the opponent channels; sigma/mu are the root-sum-squares of their
    standard deviations/means. The 0..255 scale keeps the paper's interpretive thresholds (15 slightly, 33
    moderately, 45 averagely, 59 quite, 82 highly, 109 extremely colourful).
    """
    rgb255 = rgb * 255.0
    rg = rgb255[:, :, 0] - rgb255[:, :, 1]
    yb = 0.5 * (rgb255[:, :, 0] + rgb255[:, :, 1]) - rgb255[:, :, 2]
    sigma = float(np.hypot(rg.std(), yb.std()))
    mu = float(np.hypot(rg.mean(), yb.mean()))
    return sigma + 0.3 * mu


def image_metrics(image: Image.Image | np.ndarray) -> dict[str, float]:
    """All statistics of one image, keyed as in `METRIC_KEYS` (see the module docstring for what each means)."""
    rgb = to_rgb_array(image)
    gray = luma(rgb)
    red, green, blue = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    return {
        "luminance_mean": float(gray.mean()),
        "luminance_std": float(gray.std()),
        "edge_energy": laplacian_variance(gray),
        "colorfulness": hasler_susstrunk_colorfulness(rgb),
        "cast_yb": float((0.5 * (red + green) - blue).mean()),
        "cast_rg": float((red - green).mean()),
    }


def mean_metrics(images: Iterable[Image.Image | np.ndarray], prefix: str = "img/") -> dict[str, float]:
    """Mean of each statistic over a sampling step's images, keys prefixed for MLflow (`img/luminance_mean`, ...).

    The mean over the fixed prompt set is what the curves follow across steps and variants: the prompts and seeds
    are the same everywhere, so a change in the mean is a change caused by training.
    """
    per_image = [image_metrics(image) for image in images]
    if not per_image:
        raise ValueError("mean_metrics needs at least one image")
    return {f"{prefix}{key}": float(np.mean([m[key] for m in per_image])) for key in METRIC_KEYS}


FEWEST_FOR_HALF = 3  # fit/loss evaluations below which the steps to half are fixed by the grid, not the run


@dataclass(frozen=True)
class FittingSpeed:
    """How fast a loss curve falls. `loss_auc`: the area under the curve divided by the steps it spans (its
    time-average, in loss units). `steps_to_half`: the step at which the curve first reaches half of the run's total
    decrease (start - final), linearly interpolated between evaluations; None (`why_none` says why) when the final
    value is not below the start ("did not decrease"), or when the curve has fewer than three evaluations: with
    only the start and the end, the interpolation puts half of any decrease at exactly the middle step, whatever
    the run did, so the number would describe the evaluation grid (validation.every), not the run."""

    loss_auc: float
    steps_to_half: float | None
    why_none: str = ""


ONLY_START_AND_END = "fit/loss evaluated only at the start and end: set validation.every"
DID_NOT_DECREASE = "did not decrease (the final fit/loss is not below its start)"


def fitting_speed(history: Sequence[tuple[int, float]]) -> FittingSpeed | None:
    """`history` = [(step, value)] (any order; non-finite values dropped). None with fewer than two steps."""
    from scipy.integrate import trapezoid

    points = sorted((int(s), float(v)) for s, v in history if math.isfinite(v))
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return None
    steps = np.array([s for s, _ in points], dtype=np.float64)
    values = np.array([v for _, v in points], dtype=np.float64)
    auc = float(trapezoid(values, steps) / (steps[-1] - steps[0]))
    if len(set(steps.tolist())) < FEWEST_FOR_HALF:
        return FittingSpeed(auc, None, ONLY_START_AND_END)
    drops = values[0] - values  # how far each evaluation is below the start (drops[0] = 0 exactly)
    decrease = float(drops[-1])  # the run's total decrease: start - final
    if decrease <= 0:
        return FittingSpeed(auc, None, DID_NOT_DECREASE)
    half = decrease / 2  # exact in binary
    i = int(np.argmax(drops >= half))  # the first evaluation at or past half the decrease (i >= 1)
    # interpolated on the drops, not the values: no cancellation of two nearly equal losses, so a curve that
    # reaches half between two evaluations of a straight fall gives exactly the mid-step.
    fraction = (half - drops[i - 1]) / (drops[i] - drops[i - 1])
    return FittingSpeed(auc, float(steps[i - 1] + fraction * (steps[i] - steps[i - 1])))
