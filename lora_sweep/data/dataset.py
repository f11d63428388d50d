"""A dataset folder in kohya's DreamBooth layout: `<dir>/<repeats>_<name>/<image>` + `<image><caption_extension>`.

Subfolders without the numeric prefix are ignored with a warning (kohya ignores them silently, which users trip on).
An image that cannot be read is skipped with one warning naming it, and counted, so a run's params show it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from lora_sweep.data.captions import read_caption
from lora_sweep.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SUBSET = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # (width, height) after EXIF orientation


@dataclass
class FolderScan:
    items: list[ImageItem]
    skipped: list[Path] = field(default_factory=list)  # unreadable or truncated images
    ignored_dirs: list[Path] = field(default_factory=list)  # subfolders without the `<repeats>_` prefix


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB: EXIF orientation applied, alpha flattened onto white, fully decoded."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img.load()
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img.convert("RGB")


def scan_folder(root: str | Path, caption_extension: str = ".txt") -> FolderScan:
    """Find every readable image in `root`'s `<repeats>_<name>` subfolders with its caption and repeat count."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"data.dir: '{root}' is not a folder. Point data.dir at a dataset in kohya's layout: a folder holding "
            "subfolders named <repeats>_<name> (e.g. 10_mychar) with images and same-named caption files."
        )
    scan = FolderScan(items=[])
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _SUBSET.match(sub.name)
        if not match:
            log.warning("data.dir: ignoring folder '%s': its name lacks kohya's '<repeats>_' prefix", sub)
            scan.ignored_dirs.append(sub)
            continue
        repeats, class_token = int(match.group(1)), match.group(2)
        for path in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            try:
                size = load_rgb(path).size
            except Exception as exc:  # PIL raises many types for broken files
                log.warning("skipping unreadable image '%s': %s", path, exc)
                scan.skipped.append(path)
                continue
            caption = read_caption(path, caption_extension) or class_token
            scan.items.append(ImageItem(path=path, caption=caption, repeats=repeats, size=size))
    if not scan.items:
        raise UserError(
            f"data.dir: no readable images in '{root}'. Expected subfolders named <repeats>_<name> (e.g. 10_photo) "
            f"holding images ({', '.join(IMAGE_EXTENSIONS)}) and optional '{caption_extension}' captions"
            + (f"; {len(scan.skipped)} image(s) could not be read" if scan.skipped else "")
            + (f"; ignored folders without the prefix: {[p.name for p in scan.ignored_dirs]}" if scan.ignored_dirs else "")
            + "."
        )
    return scan
