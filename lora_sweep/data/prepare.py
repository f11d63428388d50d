"""A dataset folder -> training examples: bucketed latents and text embeddings, encoded once through the shared
content-addressed cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps

from lora_sweep.data import buckets
from lora_sweep.data import cache as cache_lib
from lora_sweep.data.buckets import bucket_settings
from lora_sweep.data.cache_keys import latent_cache_key, posterior_seed, text_cache_key
from lora_sweep.data.dataset import FolderScan, ImageItem, gone
from lora_sweep.data.images import load_rgb
from lora_sweep.errors import UserError
from lora_sweep.model.encode import encode_images, encode_prompts
from lora_sweep.paths import default_cache_dir
from lora_sweep.progress import progress

log = logging.getLogger(__name__)


class UnreadableImage(Exception):
    """An image whose header was read at scan time but whose pixels cannot be decoded."""


@dataclass
class Example:
    """One image ready for training (tensors on the CPU; latents unscaled, as the VAE returns them)."""

    item: ImageItem
    bucket: tuple[int, int]  # (width, height) in pixels
    latents: torch.Tensor  # (C, h, w)
    latents_flipped: torch.Tensor | None
    time_ids: torch.Tensor  # (6,) original size, crop top-left, target size
    time_ids_flipped: torch.Tensor | None
    context: torch.Tensor | None  # (77, hidden); None when text is encoded per step
    pooled: torch.Tensor | None


@dataclass
class Prepared:
    examples: list[Example]
    histogram: dict[str, int]
    cache_stats: dict[str, int] = field(default_factory=dict)  # cache/hits, cache/misses, per kind
    unreadable: list[str] = field(default_factory=list)  # images whose header passed but pixels failed: skipped


def _assign(item: ImageItem, settings: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    return buckets.assign_with_settings(item.size, settings)


def _pixels(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _time_ids(item: ImageItem, bucket, flipped: bool) -> torch.Tensor:
    top_left = buckets.kohya_crop_top_left(bucket, item.size, flipped=flipped)
    return torch.tensor(buckets.sdxl_time_ids((item.size[1], item.size[0]), top_left, (bucket[1], bucket[0])))


def prepare_examples(parts, scan: FolderScan, data_cfg, *, device, encode_text: bool) -> Prepared:
    """Every image's latents, and captions' embeddings unless `encode_text` is False (text-encoder LoRA or shuffled
    captions: encoded at every step, as kohya), from the cache or encoded. The VAE encodes in fp32 (kohya's
    --no_half_vae) so precision variants share entries. An image whose pixels fail to decode, or that the OS refuses
    to read since the scan, moves from `scan.items` to `scan.skipped`, with a warning. Raises UserError when no image
    is left or one is gone."""
    store = cache_lib.TensorCache(Path(data_cfg.cache_dir or default_cache_dir()))
    settings = bucket_settings(data_cfg)
    vae_id = store.model_identity(parts.source, "vae")
    text_id = store.model_identity(parts.source, "text") if encode_text else ""
    examples: list[Example] = []
    unreadable: list[str] = []
    items = list(scan.items)
    for item in progress(items, f"encoding images into {store.root}", unit="image"):
        try:
            examples.append(_example(parts, store, item, settings, data_cfg, device, vae_id, text_id, encode_text))
        except UnreadableImage as error:  # the header was fine, the pixels are not: skipped, counted, not cached
            log.warning("skipping unreadable image '%s': %s", item.path, error)
            scan.items.remove(item)
            scan.skipped.append(item.path)
            unreadable.append(str(item.path))
        except FileNotFoundError:
            if item.path.exists():
                raise
            raise gone(scan, item.path) from None
        except OSError as error:
            if error.filename not in (str(item.path), item.path):  # the cache's disk, not the image
                raise
            log.warning("skipping unreadable image '%s': %s", item.path, error.strerror or error)
            scan.items.remove(item)
            scan.skipped.append(item.path)
            unreadable.append(str(item.path))
    if not examples:
        raise UserError(f"{scan.setting}: no readable images to train on: all {len(scan.skipped)} image(s) failed to "
                        f"decode (e.g. '{scan.skipped[0] if scan.skipped else ''}'). Re-save them as PNG or JPEG.")
    histogram = buckets.bucket_histogram([e.bucket for e in examples for _ in range(e.item.repeats)])
    return Prepared(examples, histogram, cache_stats=store.stats(), unreadable=unreadable)


def _example(parts, store, item: ImageItem, settings: dict, data_cfg, device, vae_id: str, text_id: str,
             encode_text: bool) -> Example:
    """One image's example: latents (and text embeddings) from the cache, encoded on a miss."""
    bucket, resized = _assign(item, settings)
    image_sha = store.file_sha256(item.path)
    latents = {}
    for flipped in ([False, True] if data_cfg.flip_aug else [False]):
        key = latent_cache_key(
            vae=vae_id, image_sha256=image_sha, bucket=bucket, resized=resized,
            crop_left_top=_crop_offsets(bucket, resized), flipped=flipped, latent=data_cfg.latent_sample,
        )
        def encode(flipped=flipped, key=key):
            return _encode_latents(parts, item, bucket, resized, flipped, key, data_cfg.latent_sample, device)
        latents[flipped] = store.get_or_compute("latents", key, encode, {"source": str(item.path)})["latents"]
    context = pooled = None
    if encode_text:
        key = text_cache_key(text_encoders=text_id, caption=item.caption)
        text = store.get_or_compute("text", key, lambda c=item.caption: _encode_caption(parts, c),
                                    {"source": str(item.path), "caption": item.caption})
        context, pooled = text["context"], text["pooled"]
    return Example(
        item=item, bucket=bucket, latents=latents[False], latents_flipped=latents.get(True),
        time_ids=_time_ids(item, bucket, False),
        time_ids_flipped=_time_ids(item, bucket, True) if data_cfg.flip_aug else None,
        context=context, pooled=pooled,
    )


def _crop_offsets(bucket, resized) -> tuple[int, int]:
    """The real centre crop (left, top) from the resized image to the bucket."""
    return (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2


@torch.no_grad()
def _encode_latents(parts, item: ImageItem, bucket, resized, flipped: bool, key: str, mode: str, device) -> dict:
    """kohya's order: resize and centre-crop, then flip; one posterior sample seeded by the entry's key."""
    try:
        image = load_rgb(item.path)
    except Exception as error:  # PIL raises many types for truncated or corrupt pixel data
        raise UnreadableImage(f"{type(error).__name__}: {error}") from error
    cropped, _ = buckets.resize_and_center_crop(image, bucket, resized)
    if flipped:
        cropped = ImageOps.mirror(cropped)
    generator = torch.Generator(device="cpu").manual_seed(posterior_seed(key))
    pixels = _pixels(cropped).unsqueeze(0).to(device, torch.float32)
    out = encode_images(parts.vae, pixels, sample=mode == "sample", generator=generator)
    return {"latents": out[0].float().cpu()}


def _encode_caption(parts, caption: str) -> dict:
    context, pooled = encode_prompts(parts, [caption])
    return {"context": context[0].float().cpu(), "pooled": pooled[0].float().cpu()}
