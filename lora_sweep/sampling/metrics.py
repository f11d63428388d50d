"""Cheap, model-free statistics of a sample image, each a number for one of the article's by-eye remarks (they do not
judge quality). Pure functions, a few milliseconds per image:

- luminance_mean, luminance_std: BT.709 luma 0..1 and its spread (noise offset: "bright and dark areas");
- edge_energy: variance of the 4-neighbour Laplacian of the luma (sharpness: multires, min-SNR, debiased, IP noise);
- colorfulness: Hasler & Süsstrunk (2003), 0..255 (Prodigy "keeps colours stable");
- cast_yb: mean (R+G)/2 - B, > 0 yellow; cast_rg: mean R - G, > 0 red (the yellow cast most variants showed).

`fitting_speed` measures a fit/loss curve instead; training and the report both import it from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# BT.709 weights on the gamma-encoded sRGB values (luma Y', not CIE Y): brightness as a viewer perceives it
LUMA_WEIGHTS = np.array([0.2126, 0.7152, 0.0722], dtype=np.float64)

METRIC_KEYS = ("luminance_mean", "luminance_std", "edge_energy", "colorfulness", "cast_yb", "cast_rg")
"""The keys `image_metrics` returns, in a stable order (reports and logs list them in this order)."""


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """The image as float64 RGB in [0, 1], (H, W, 3): any PIL mode (alpha dropped), or numpy uint8 (0..255) or float
    (0..1), (H, W) grey or (H, W, 3|4)."""
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
    """Variance of the 4-neighbour Laplacian over the interior pixels (borders add no edges); blur lowers it, fine
    texture raises it. Needs at least 3x3 pixels."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        raise ValueError(f"edge energy needs an image of at least 3x3 pixels, got {gray.shape[1]}x{gray.shape[0]}")
    center = gray[1:-1, 1:-1]
    laplacian = gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4.0 * center
    return float(laplacian.var())


def hasler_susstrunk_colorfulness(rgb: np.ndarray) -> float:
    """M = sigma_rgyb + 0.3 * mu_rgyb of the opponent channels rg = R - G, yb = (R + G)/2 - B, on the paper's 0..255
    scale (its thresholds: 15 slightly, 33 moderately, 59 quite, 109 extremely colourful)."""
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
    """Mean of each statistic over a sampling step's images, keyed `img/<name>`: the prompts and seeds are fixed, so a
    change in the mean comes from training."""
    per_image = [image_metrics(image) for image in images]
    if not per_image:
        raise ValueError("mean_metrics needs at least one image")
    return {f"{prefix}{key}": float(np.mean([m[key] for m in per_image])) for key in METRIC_KEYS}


FEWEST_FOR_HALF = 3  # fit/loss evaluations below which the steps to half are fixed by the grid, not the run


@dataclass(frozen=True)
class FittingSpeed:
    """How fast a loss curve falls. `loss_auc`: the area under it divided by the steps it spans. `steps_to_half`: the
    interpolated step where it first reaches half of start - final; None (`why_none` says why) when it did not
    decrease, or with fewer than three evaluations (then the evaluation grid fixes the answer)."""

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
    # interpolated on the drops, not the values: no cancellation of two nearly equal losses
    fraction = (half - drops[i - 1]) / (drops[i] - drops[i - 1])
    return FittingSpeed(auc, float(steps[i - 1] + fraction * (steps[i] - steps[i - 1])))
