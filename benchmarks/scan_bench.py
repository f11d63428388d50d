"""Dataset scan: header-only (`data.dataset.scan_folder`) against decoding every image, as the scan did before.

Issue 16's target: 200 JPEGs of 2048x2048 (the article's base size) scanned in under 1 s with a warm page cache.
The images are photo-like (scikit-image's astronaut, resized and shifted per image, so each file differs), written
once with captions into a kohya-layout folder under a temporary directory; the page cache is warmed by reading every
file before timing; the figure is the median of `--repeats` scans.

    .venv/bin/python benchmarks/scan_bench.py [--images 200] [--size 2048] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_dataset(folder: Path, images: int, size: int) -> Path:
    import numpy as np
    import skimage.data
    from PIL import Image

    sub = folder / "10_photo"
    sub.mkdir(parents=True)
    base = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(base)
    for i in range(images):
        Image.fromarray(np.roll(pixels, 7 * i, axis=1)).save(sub / f"img{i:04d}.jpg", quality=90)
        (sub / f"img{i:04d}.txt").write_text(f"a photo of an astronaut, shot {i}\n")
    return folder


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from lora_sweep.data.dataset import scan_folder
    from lora_sweep.data.images import load_rgb

    with tempfile.TemporaryDirectory(prefix="lora-sweep-scan-bench-") as tmp:
        root = write_dataset(Path(tmp), args.images, args.size)
        files = sorted(root.rglob("*"))
        mib = sum(f.stat().st_size for f in files if f.is_file()) / 2**20
        for f in files:  # warm the page cache
            if f.is_file():
                f.read_bytes()
        scan = scan_folder(root)
        assert len(scan.items) == args.images and scan.items[0].size == (args.size, args.size)
        header_s = timed(lambda: scan_folder(root), args.repeats)
        decode_s = timed(lambda: [load_rgb(item.path).size for item in scan.items], 1)
    result = {"images": args.images, "size": args.size, "dataset_mib": round(mib, 1),
              "header_scan_s": round(header_s, 4), "header_ms_per_image": round(1000 * header_s / args.images, 2),
              "full_decode_s": round(decode_s, 3), "speedup": round(decode_s / header_s, 1),
              "target_s": 1.0, "meets_target": header_s < 1.0}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
