"""The bundled dataset: scikit-image's sample photos (in its wheel: no download), written once as a kohya-layout folder.
Their mixed sizes and aspect ratios exercise bucketing.
"""

from __future__ import annotations

from pathlib import Path

from lora_sweep.model.loading import build_folder_once
from lora_sweep.paths import cache_root

# name in skimage.data -> caption (what a tagger or a person would write)
PHOTOS: dict[str, str] = {
    "astronaut": "a photo of an astronaut in a white spacesuit, american flag, portrait",
    "coffee": "a photo of a cup of coffee on a saucer, top view, wooden table",
    "chelsea": "a photo of a tabby cat looking to the side, whiskers, close-up",
    "rocket": "a photo of a rocket on a launch pad, blue sky, landscape",
    "hubble_deep_field": "a photo of the night sky full of galaxies, deep field, space",
    "immunohistochemistry": "a microscope photo of stained tissue cells, purple and brown",
    "retina": "a photo of a human retina, red and orange, round, medical image",
    "camera": "a black and white photo of a cameraman with a tripod camera, grass field",
}
FOLDER = "5_photo"  # 5 repeats, class token "photo"
VERSION = "photos-v1"


def photos_path(cache_root: Path) -> Path:
    """Where `photos_dir` writes the photos dataset under `cache_root`, written or not."""
    return Path(cache_root) / "datasets" / VERSION


def photos_dir(cache_root: Path) -> Path:
    """Return the photos dataset folder under `cache_root`, writing it once (atomically, safe if jobs race)."""
    target = photos_path(cache_root)
    if (target / FOLDER).is_dir():
        return target
    import numpy as np
    import skimage.data
    from PIL import Image

    def write(staging: Path) -> None:
        sub = staging / FOLDER
        sub.mkdir()
        for name, caption in PHOTOS.items():
            pixels = np.asarray(getattr(skimage.data, name)())
            Image.fromarray(pixels).convert("RGB").save(sub / f"{name}.png")
            (sub / f"{name}.txt").write_text(caption + "\n")

    return build_folder_once(target, write)


def data_folder(cfg) -> Path:
    """The training images: `data.dir`, or the bundled photos (written on first use) for data=photos without one."""
    if cfg.data.name == "photos" and not cfg.data.dir:
        return photos_dir(cache_root(cfg))
    return Path(cfg.data.dir)
