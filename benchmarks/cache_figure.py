"""Figure 2 of `make bench`: how much encode work the shared latent / text-embedding cache saves a sweep.

The twelve variants of `make demo` (the article's v53..v64 at demo scale) each prepare their data with
`lora_sweep.data.prepare.prepare_examples`, once all through one shared cache and once each through an empty cache
of its own (what a trainer without a shared cache does). Forward hooks on the VAE encoder and both text encoders count
the images and captions actually encoded; the wall time of all preparations is taken too.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, compose

ENCODERS = ("vae", "text_encoder", "text_encoder_2")
# SDXL's VAE encoder per 1024x1024 image (landscape.md section D, torch.utils.flop_counter).
SDXL_VAE_ENCODE_TFLOP_1024 = 4.88


class EncodeCounter:
    """Forward hooks counting the items each encoder of an SDXLParts processes (a batch of n counts n)."""

    def __init__(self, parts) -> None:
        self.items = {name: 0 for name in ENCODERS}
        modules = (parts.vae.encoder, parts.text_encoder, parts.text_encoder_2)
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in zip(ENCODERS, modules, strict=True)]

    def _hook(self, name: str):
        def count(module, args, output) -> None:
            self.items[name] += int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else 1
        return count

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def article_variants() -> list[list[str]]:
    """The overrides of `make demo`'s twelve variants."""
    names = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("v*.yaml"))
    return [["preset=demo", f"experiment={name}"] for name in names]


def cache_reuse(variants: list[list[str]], workdir: Path) -> dict:
    """Encoded items per encoder and seconds, for "shared" (one cache) and "separate" (an empty cache per variant)."""
    from lora_sweep.data.dataset import scan_folder
    from lora_sweep.data.photos import data_folder
    from lora_sweep.data.prepare import prepare_examples
    from lora_sweep.training.session import load_parts

    configs = [compose(*o) for o in variants]
    parts = load_parts(configs[0])
    counter = EncodeCounter(parts)
    result: dict = {"variants": len(configs)}
    try:
        for mode in ("shared", "separate"):
            before, started, images = dict(counter.items), time.perf_counter(), 0
            for i, cfg in enumerate(configs):
                scan = scan_folder(data_folder(cfg), cfg.data.caption_extension)
                job_cfg = copy.deepcopy(cfg)  # the whole config: data.resolution interpolates model.resolution
                job_cfg.data.cache_dir = str(workdir / ("fig2-shared" if mode == "shared" else f"fig2-own-{i}"))
                encode_text = not (cfg.network.train_text_encoder or cfg.data.shuffle_caption)
                prepare_examples(parts, scan, job_cfg.data, device=torch.device("cpu"), encode_text=encode_text)
                images = max(images, len(scan.items) * (2 if cfg.data.flip_aug else 1))
            result[mode] = {name: counter.items[name] - before[name] for name in ENCODERS}
            result[mode]["seconds"] = time.perf_counter() - started
        result["dataset_images"] = images
    finally:
        counter.remove()
    saved = result["separate"]["vae"] - result["shared"]["vae"]
    result["sdxl_vae_tflop_saved_1024"] = saved * SDXL_VAE_ENCODE_TFLOP_1024
    return result
