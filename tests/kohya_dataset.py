"""The kohya dataset config fixture (tests/data/kohya_dataset.toml) with its images and captions, written into a folder.

`write_kohya_dataset(root)` copies the TOML into `root` and writes its subsets' images there (image_dir paths are
relative: run with `root` as the working folder). Train: 10 x 2 + 5 x 2 = 30 images with repeats; reg: 3 (1 repeat).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import write_image

TOML = Path(__file__).parent / "data" / "kohya_dataset.toml"
CAPTIONS = {
    "train/char": ["sks girl, red hair ||| smiling, outdoors;;;sunny, park", "sks girl ||| sitting, {red|blue} dress"],
    "train/style": ["watercolor, landscape, river", "watercolor, portrait;;;soft light"],
    "reg/girl": ["girl, standing", "girl, sitting", None],  # the third trains on its class token
}


def write_kohya_dataset(root: Path) -> Path:
    """The TOML's path in `root`, with every subset's images (64x64 PNGs, a colour each) and captions beside it."""
    root.mkdir(parents=True, exist_ok=True)
    toml = Path(shutil.copy(TOML, root / TOML.name))
    for folder, captions in CAPTIONS.items():
        for k, caption in enumerate(captions):
            write_image(root / folder / f"img{k}.png", caption=caption, color=(40 * k, 120, 200 - 40 * k))
    return toml
