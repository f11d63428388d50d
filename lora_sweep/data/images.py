"""Training images: the size from the header alone (`probe_image`, for the scan) and the pixels as the RGB a viewer
shows (`load_rgb`, on a cache miss); both apply the same EXIF orientation, so the sizes agree.

Unlike kohya's `convert("RGB")`, which clips high bit depths: transparency is composited onto white; 16-bit integers
are scaled 0..65535 -> 0..255 (32-bit ones that fit, too); other integers and floats outside 0..1 are stretched from
their min..max with a warning; floats in 0..1 are scaled by 255. Multi-frame files give their first frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

log = logging.getLogger(__name__)

# EXIF orientation -> the transpose that shows the image upright (as PIL.ImageOps.exif_transpose); 5-8 swap W and H
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class ImageInfo:
    """The header's facts: `size` (W, H) after EXIF orientation, PIL `mode`, `frames`, `orientation` (1 if absent)."""

    size: tuple[int, int]
    mode: str
    frames: int
    orientation: int
    format: str


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened, undecoded image; 1 when there is none. Header only: a PNG eXIf chunk
    after the pixels is ignored (PIL would decode the image to find it), in the scan and the decode alike."""
    try:
        exif = Image.Image.getexif(img)  # the base method: never triggers the PNG plugin's full decode
        value = int(exif.get(ExifTags.Base.Orientation, 1))
    except Exception:  # a malformed EXIF block: treat as upright, as viewers do
        return 1
    return value if value in range(1, 9) else 1


def probe_image(path: str | Path) -> ImageInfo:
    """The header's facts about one image, without decoding its pixels. Raises what PIL raises for an unidentifiable
    file."""
    with Image.open(path) as img:
        orientation = exif_orientation(img)
        width, height = img.size
        frames = int(getattr(img, "n_frames", 1) or 1) if getattr(img, "is_animated", False) else 1
        if orientation >= 5:
            width, height = height, width
        return ImageInfo((width, height), img.mode, frames, orientation, img.format or "")


def load_rgb(path: str | Path) -> Image.Image:
    """The image as 8-bit RGB, upright, first frame, alpha on white, high bit depths scaled (module docstring). Raises
    PIL's errors."""
    with Image.open(path) as img:
        method = _TRANSPOSE.get(exif_orientation(img))
        img.seek(0)
        img.load()
        rgb = to_rgb(img, name=str(path))
    return rgb.transpose(method) if method is not None else rgb


def to_rgb(img: Image.Image, *, name: str = "image") -> Image.Image:
    """An image of any PIL mode as the RGB it shows (a new image; `img` is not changed)."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        rgba = img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return Image.fromarray(_high_bit_depth_to_uint8(np.asarray(img), mode, name)).convert("RGB")
    return img.convert("RGB")


def _high_bit_depth_to_uint8(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """A 2-D array of 16/32-bit integers or floats as uint8, scaled by its type's range (never clipped)."""
    from skimage.exposure import rescale_intensity
    from skimage.util import img_as_ubyte

    if mode in _SIXTEEN_BIT:
        return img_as_ubyte(values.astype(np.uint16))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "I" and 0 <= low and high <= 65535:
        return img_as_ubyte(values.astype(np.uint16))
    if mode == "F" and 0 <= low and high <= 1:
        return img_as_ubyte(values.astype(np.float32))
    log.warning("image '%s' (PIL mode %s) holds values %g..%g outside its type's usual range: stretched to 0..255",
                name, mode, low, high)
    return rescale_intensity(values.astype(np.float64), in_range="image", out_range=np.uint8).astype(np.uint8)
