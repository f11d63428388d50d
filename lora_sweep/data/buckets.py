"""Aspect-ratio buckets, resize/crop and SDXL size conditioning as kohya sd-scripts v0.8.7 does them (`BucketManager`,
`make_bucket_resolutions`), as pure functions of plain ints.

Two modes (`bucket_no_upscale`): (a) False: a predefined bucket set; an image takes the bucket closest in aspect
ratio, scaled to cover it, then centre-cropped. (b) True: an image larger than the base area shrinks to about that
area; the bucket is its size rounded down to `reso_steps`; min/max_bucket_reso are ignored, as in kohya. Sizes are
(width, height) unless a name ends in `_hw`.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

from lora_sweep.errors import ConfigError, Problems, UserError

SD_SCRIPTS_MAX_BUCKET_RESO = 1024  # sd-scripts' --max_bucket_reso default (kohya_ss's GUI uses 2048)


def parse_resolution(value: int | str | Sequence[int]) -> tuple[int, int]:
    """`data.resolution` as (W, H): an int R, "R", "W,H" or [W, H], as kohya's `--resolution`. Raises ConfigError."""
    parts: Sequence
    if isinstance(value, bool):
        parts = ()
    elif isinstance(value, int):
        parts = (value, value)
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, Sequence):  # list, tuple, omegaconf ListConfig
        parts = list(value)
    else:
        parts = ()
    if len(parts) == 1:
        parts = (parts[0], parts[0])
    try:
        width, height = (int(p) for p in parts)
        if any(isinstance(p, (bool, float)) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(
            f"data.resolution: {value!r} is not a resolution. Give an int (1024 means 1024x1024), a string "
            "'W,H' such as '832,1216', or a list [W, H] of positive ints."
        ) from None
    if width <= 0 or height <= 0:
        raise ConfigError(f"data.resolution: {value!r} must be positive (width and height > 0).")
    return width, height


def check_bucket_options(
    *, resolution: int | str | Sequence[int], reso_steps: int, min_reso: int | None = None, max_reso: int | None = None
) -> tuple[int, int]:
    """The parsed resolution (W, H); raises ConfigError naming each `data.*` setting kohya v0.8.7 asserts against
    (reso_steps % 32 for SDXL, min <= min(resolution), max(resolution) <= max, min <= max). None: not checked."""
    found = Problems()  # every bad setting is reported, not the first
    size = found.check(parse_resolution, resolution)
    if isinstance(reso_steps, bool) or not isinstance(reso_steps, int) or reso_steps <= 0 or reso_steps % 32:
        found.add(f"data.bucket_reso_steps: {reso_steps!r} is not allowed for SDXL. Use a positive multiple of 32 "
                  "(32 or 64; sd-scripts' default is 64).")
    if min_reso is not None and min_reso <= 0:
        found.add(f"data.min_bucket_reso: {min_reso} must be a positive number of pixels (kohya: 256).")
    if min_reso is not None and max_reso is not None and min_reso > max_reso:
        found.add(f"data.min_bucket_reso ({min_reso}) is larger than data.max_bucket_reso ({max_reso}); min must be "
                  "<= max.")
    if size is not None:
        width, height = size
        if max_reso is not None and max(width, height) > max_reso:
            found.add(f"data.max_bucket_reso ({max_reso}) is smaller than data.resolution {width}x{height}; it must "
                      f"be >= both sides (kohya asserts this). Raise data.max_bucket_reso to at least "
                      f"{max(width, height)}.")
        if min_reso is not None and 0 < min_reso and min(width, height) < min_reso:
            found.add(f"data.min_bucket_reso ({min_reso}) is larger than the shorter side of data.resolution "
                      f"{width}x{height}; lower it to at most {min(width, height)} (kohya asserts this).")
    found.raise_any()
    return width, height


@functools.lru_cache(maxsize=64)
def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> tuple[tuple[int, int], ...]:
    """Mode (a)'s buckets, sorted: the square floor(sqrt(W*H)/d)*d, and for widths min_size, min_size+d, ... <= max_size
    the height min(max_size, floor((W*H // width)/d)*d) if >= min_size, both orientations. Widths are not rounded to
    d: kohya v0.8.7 steps from min_size as given."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return tuple(sorted(resos))


def assign_bucket(
    width: int,
    height: int,
    *,
    resolution: int | str | Sequence[int],
    reso_steps: int,
    no_upscale: bool,
    min_reso: int = 256,
    max_reso: int | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((bucket_w, bucket_h), (resized_w, resized_h)) of a `width` x `height` image; the resized size covers the bucket.
    `max_reso=None`: sd-scripts' 1024. Raises ConfigError for bad settings, UserError for an image that gets an empty
    bucket in mode (b)."""
    max_reso = SD_SCRIPTS_MAX_BUCKET_RESO if max_reso is None else max_reso
    base = check_bucket_options(resolution=resolution, reso_steps=reso_steps, min_reso=min_reso, max_reso=max_reso)
    if width <= 0 or height <= 0:
        raise UserError(f"image size {width}x{height} is empty; every image needs a positive width and height.")
    aspect = width / height
    if not no_upscale:
        return _assign_predefined(width, height, aspect, make_bucket_resolutions(base, min_reso, max_reso, reso_steps))
    return _assign_no_upscale(width, height, aspect, base[0] * base[1], reso_steps)


def _assign_predefined(width, height, aspect, resos) -> tuple[tuple[int, int], tuple[int, int]]:
    if (width, height) in resos:  # an exact match wins even if another bucket has the same aspect ratio
        bucket = (width, height)
    else:  # minimal |bucket_ar - ar|; min() keeps the first of equals, like numpy's argmin over the sorted list
        bucket = min(resos, key=lambda r: abs(r[0] / r[1] - aspect))
    if aspect > bucket[0] / bucket[1]:  # image wider than the bucket: match heights, crop width
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    return bucket, (int(width * scale + 0.5), int(height * scale + 0.5))


def _assign_no_upscale(width, height, aspect, max_area, steps) -> tuple[tuple[int, int], tuple[int, int]]:
    def round_to_steps(x: float) -> int:  # round half up, then down to a multiple of steps
        x = int(x + 0.5)
        return x - x % steps

    if width * height > max_area:
        resized_w = math.sqrt(max_area * aspect)
        resized_h = max_area / resized_w
        width_rounded = round_to_steps(resized_w)  # candidate A: round the width, derive the height
        height_for_width = round_to_steps(width_rounded / aspect)
        height_rounded = round_to_steps(resized_h)  # candidate B: round the height, derive the width
        width_for_height = round_to_steps(height_rounded * aspect)
        if 0 in (width_rounded, height_for_width, height_rounded, width_for_height):
            raise UserError(_too_small(width, height, steps))
        if abs(width_rounded / height_for_width - aspect) < abs(width_for_height / height_rounded - aspect):
            resized = (width_rounded, int(width_rounded / aspect + 0.5))
        else:
            resized = (int(height_rounded * aspect + 0.5), height_rounded)
    else:
        resized = (width, height)  # no resize at all
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if 0 in bucket:
        raise UserError(_too_small(width, height, steps))
    return bucket, resized


def _too_small(width: int, height: int, steps: int) -> str:
    return (
        f"an image of {width}x{height} gets an empty bucket with data.bucket_no_upscale=true and "
        f"data.bucket_reso_steps={steps}: each side must be at least {steps} px after resizing. Remove or enlarge "
        "the image, or set data.bucket_no_upscale=false (kohya would fail on it as well)."
    )


def default_min_bucket_reso(width: int, height: int, steps: int) -> int:
    """min_bucket_reso when null: a quarter of the shorter side rounded down to a multiple of `steps`, at least one
    step (1024 -> 256, 1000 -> 224 at steps 32; 96 and 64 -> 32). On the step grid because bucket widths step from
    it (kohya's fixed 256 is this at 1024)."""
    return max(steps, min(width, height) // 4 // steps * steps)


def bucket_settings(data_cfg) -> dict:
    """`assign_bucket`'s keywords from a `data` config, with size-relative defaults (`default_min_bucket_reso`;
    max_bucket_reso: twice the longer side); `{"resolution": (W, H), "fixed": True}` with buckets off."""
    width, height = parse_resolution(data_cfg.resolution)
    steps = int(data_cfg.bucket_reso_steps)
    min_reso = data_cfg.min_bucket_reso or default_min_bucket_reso(width, height, steps)
    max_reso = data_cfg.max_bucket_reso or max(width, height) * 2
    if not data_cfg.enable_bucket:  # every image centre-cropped to the resolution
        return {"resolution": (width, height), "fixed": True}
    return {"resolution": (width, height), "reso_steps": steps, "no_upscale": bool(data_cfg.bucket_no_upscale),
            "min_reso": min_reso, "max_reso": max_reso}


def assign_with_settings(size: tuple[int, int], settings: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket, resized) of an image of `size` (W, H) under `bucket_settings(...)`; with buckets off, scaled to cover
    the resolution. Raises UserError for an empty bucket (naming the settings; the caller names the file)."""
    if settings.get("fixed"):
        width, height = size
        bucket_w, bucket_h = settings["resolution"]
        scale = max(bucket_w / width, bucket_h / height)
        return (bucket_w, bucket_h), (int(width * scale + 0.5), int(height * scale + 0.5))
    return assign_bucket(*size, **settings)


def resize_and_center_crop(
    image: Image.Image, bucket: tuple[int, int], resized: tuple[int, int]
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to `resized`, centre-crop to `bucket` (kohya's `trim_and_resize_if_required`); returns the image and the
    crop offset (left, top). The resize is v0.8.7's `cv2.resize(..., interpolation=cv2.INTER_AREA)` on the uint8 RGB
    array, up or down, so the pixels are kohya's exactly; non-RGB is converted first. Flip after cropping, as kohya:
    an odd excess crops asymmetrically."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != tuple(resized):
        pixels = cv2.resize(np.asarray(image, dtype=np.uint8), tuple(resized), interpolation=cv2.INTER_AREA)
        image = Image.fromarray(pixels)
    width, height = image.size
    if width < bucket[0] or height < bucket[1]:
        raise ValueError(f"resized size {width}x{height} does not cover bucket {bucket[0]}x{bucket[1]}")
    left, top = (width - bucket[0]) // 2, (height - bucket[1]) // 2
    return image.crop((left, top, left + bucket[0], top + bucket[1])), (left, top)


def kohya_crop_top_left(
    bucket: tuple[int, int], original_size_wh: tuple[int, int], flipped: bool = False
) -> tuple[int, int]:
    """SDXL's crop_top_left (top, left) as kohya v0.8.7 computes it (`BucketManager.get_crop_ltrb`).

    A quirk kept on purpose: it is the centred offset of the image *fitted inside* the bucket, not the real crop
    (1000x1500 in 832x1216 gives (0, 10)). Flipped: left = bucket_w - (left + fitted_w). Truncated to int.
    """
    bucket_w, bucket_h = bucket
    image_ar = original_size_wh[0] / original_size_wh[1]
    if bucket_w / bucket_h > image_ar:  # bucket is wider: fit the heights
        fitted_w, fitted_h = bucket_h * image_ar, bucket_h
    else:
        fitted_w, fitted_h = bucket_w, bucket_w / image_ar
    left = (bucket_w - fitted_w) // 2  # float floor division, as in kohya
    top = (bucket_h - fitted_h) // 2
    if flipped:
        left = bucket_w - (left + fitted_w)
    return int(top), int(left)


def sdxl_time_ids(
    original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]
) -> list[int]:
    """SDXL's 6 size-conditioning numbers: [original_h, original_w, crop_top, crop_left, target_h, target_w]."""
    return [int(v) for v in (*original_hw, *crop_top_left, *target_hw)]


def bucket_histogram(buckets: Iterable[tuple[int, int]]) -> dict[str, int]:
    """Bucket "WxH" -> entries, sorted by (w, h); one entry per image per repeat, as kohya counts."""
    counts = Counter(tuple(b) for b in buckets)
    return {f"{w}x{h}": counts[(w, h)] for w, h in sorted(counts)}


def format_histogram(histogram: Mapping[str, int], mean_ar_error: float | None = None) -> str:
    """The histogram as kohya prints it at start: one `bucket i: resolution (w, h), count: n` line each."""
    def size(name: str) -> tuple[int, int]:
        w, h = name.split("x")
        return int(w), int(h)

    names = sorted(histogram, key=size)
    lines = [f"number of images (including repeats): {sum(histogram.values())} in {len(names)} buckets"]
    lines += [f"bucket {i}: resolution {size(n)}, count: {histogram[n]}" for i, n in enumerate(names)]
    if mean_ar_error is not None:
        lines.append(f"mean ar error (without repeats): {mean_ar_error}")
    return "\n".join(lines)
