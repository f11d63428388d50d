"""Dataset scans -> training examples: bucketed latents and text embeddings, encoded once through the shared
content-addressed cache (docs/data.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import ImageOps

from lora_sweep.data import buckets
from lora_sweep.data import cache as cache_lib
from lora_sweep.data.buckets import bucket_settings
from lora_sweep.data.cache_keys import computed_key, latent_cache_key, posterior_seed, text_cache_key
from lora_sweep.data.captions import fixed_caption
from lora_sweep.data.dataset import FolderScan, ImageItem, gone
from lora_sweep.data.images import load_rgb
from lora_sweep.data.subsets import DatasetSpec
from lora_sweep.errors import Fallback, UserError
from lora_sweep.model.encode import CHUNK, encode_posterior, encode_prompts, token_counts
from lora_sweep.model.loading import TEXT_ENCODER_ATTENTION
from lora_sweep.paths import default_cache_dir
from lora_sweep.progress import progress

log = logging.getLogger(__name__)


class Posterior(NamedTuple):
    """One cached VAE posterior (unscaled, (C, h, w), fp32 on the CPU) and its cache key."""

    mean: torch.Tensor
    std: torch.Tensor
    key: str


class UnreadableImage(Exception):
    """An image whose header was read at scan time but whose pixels cannot be decoded."""


@dataclass
class Example:
    """One image ready for training (tensors on the CPU; latents unscaled, as the VAE returns them). `latents` is the
    posterior's mean until `draw_latents` sets the sample."""

    item: ImageItem
    bucket: tuple[int, int]  # (width, height) in pixels
    latents: torch.Tensor  # (C, h, w)
    latents_flipped: torch.Tensor | None
    time_ids: torch.Tensor  # (6,) original size, crop top-left, target size
    time_ids_flipped: torch.Tensor | None
    context: torch.Tensor | None  # (tokens, hidden): 77, 152 or 227 tokens; None when text is encoded per step
    pooled: torch.Tensor | None
    posteriors: dict[bool, Posterior] = field(default_factory=dict)  # by flipped


@dataclass
class Prepared:
    examples: list[Example]
    histogram: dict[str, int]
    cache_stats: dict[str, int] = field(default_factory=dict)  # cache/hits, cache/misses, per kind
    unreadable: list[str] = field(default_factory=list)  # images whose header passed but pixels failed: skipped
    specs: list[DatasetSpec] = field(default_factory=list)  # the datasets the examples belong to (item.dataset)
    # every readable training image in scan order (subset order, then path), reg images never used (repeats 0) too
    items: list[ImageItem] = field(default_factory=list)
    # the metadata's images: (item, bucket) per training image, then (item, None) per reg image never used
    trained: list[tuple[ImageItem, tuple[int, int] | None]] = field(default_factory=list)


def _assign(item: ImageItem, settings: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    return buckets.assign_with_settings(item.size, settings)


def _pixels(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _time_ids(item: ImageItem, bucket, flipped: bool) -> torch.Tensor:
    top_left = buckets.kohya_crop_top_left(bucket, item.size, flipped=flipped)
    return torch.tensor(buckets.sdxl_time_ids((item.size[1], item.size[0]), top_left, (bucket[1], bucket[0])))


def prepare_examples(parts, scan: FolderScan, data_cfg, *, device, encode_text: bool) -> Prepared:
    """Every image's latents, and captions' embeddings (as written) unless `encode_text` is False (text-encoder LoRA
    or captions processed per step: encoded at every step, as kohya), from the cache or encoded, under data_cfg's
    buckets and flip_aug. The VAE encodes in fp32 (kohya's --no_half_vae) so precision variants share entries. An
    image whose pixels fail to decode, or that the OS refuses to read since the scan, moves from `scan.items` to
    `scan.skipped`, with a warning. Raises UserError when no image is left or one is gone."""
    store = cache_lib.TensorCache(Path(data_cfg.cache_dir or default_cache_dir()))
    examples, unreadable = _prepare_scan(parts, store, scan, data_cfg, bucket_settings(data_cfg), device=device,
                                         text=lambda item: item.caption if encode_text else None,
                                         flip=lambda item: bool(data_cfg.flip_aug))
    draw_latents(examples, data_cfg.latent_sample, device=device, stream=False)
    return _prepared(scan.setting, [scan], examples, store, unreadable)


def prepare_datasets(parts, scans: Sequence[FolderScan], specs: Sequence[DatasetSpec], data_cfg, *, device,
                     cache_text: bool) -> Prepared:
    """`prepare_examples` of every training scan: each image under its dataset's buckets (`bucket_settings(spec)`)
    and its subset's flip_aug; with `cache_text`, a caption that processing leaves fixed
    (`captions.fixed_caption`: prefix, suffix and secondary separator applied) is encoded once through the cache,
    any other is encoded at every step (context None). Reg images balanced to 0 repeats are not encoded. The latent
    samples come from the global RNG of `device` in v0.8.7's caching order (`draw_latents`): call after set_seed."""
    store = cache_lib.TensorCache(Path(data_cfg.cache_dir or default_cache_dir()))
    settings = [bucket_settings(spec) for spec in specs]
    examples: list[Example] = []
    unreadable: list[str] = []
    for scan in scans:
        found, failed = _prepare_scan(
            parts, store, scan, data_cfg, None, device=device, settings_of=lambda item: settings[item.dataset],
            text=lambda item: fixed_caption(item.caption, item.subset) if cache_text else None,
            flip=lambda item: item.subset.flip_aug)
        examples += found
        unreadable += failed
    draw_latents(examples, data_cfg.latent_sample, device=device)
    prepared = _prepared(scans[0].setting if scans else "data.dir", scans, examples, store, unreadable, specs)
    prepared.items = [item for scan in scans for item in scan.items]
    return prepared


def truncated_captions(tokenizer, items: Sequence[ImageItem], max_token_length: int | None) -> Fallback | None:
    """The images whose caption (processed, where fixed) has more text tokens than data.max_token_length (null: 75):
    v0.8.7 trains on their first tokens only, silently; here one warning counts them. None when every caption fits."""
    texts = [fixed_caption(item.caption, item.subset) or item.caption for item in items]
    limit = max_token_length or CHUNK
    counts = token_counts(tokenizer, texts) if texts else []
    paths = tuple(str(item.path) for item, n in zip(items, counts, strict=True) if n > limit)
    if not paths:
        return None
    hint = "Set data.max_token_length=150 or 225 to train on more of them." if limit < 225 else ""
    return Fallback("data.max_token_length", f"images with captions over {limit} tokens: trained on their first "
                    f"{limit}, as kohya v0.8.7 does", paths, hint)


def _prepared(setting: str, scans, examples: list[Example], store, unreadable: list[str], specs=()) -> Prepared:
    if not examples and unreadable:
        raise UserError(f"{setting}: no readable images to train on: all {len(unreadable)} image(s) that would train "
                        f"failed to decode (e.g. '{unreadable[0]}'). Re-save them as PNG or JPEG.")
    if not examples:  # the pre-flight refuses this; a file changed since could still get here
        raise UserError(f"{setting}: no train images to train on: no image with repeats >= 1 outside the reg "
                        "subsets (reg images train only beside train images). Give a subset with images, num_repeats "
                        ">= 1 and is_reg = false.")
    histogram = buckets.bucket_histogram([e.bucket for e in examples for _ in range(e.item.repeats)])
    return Prepared(examples, histogram, cache_stats=store.stats(), unreadable=unreadable, specs=list(specs))


def _prepare_scan(parts, store, scan: FolderScan, data_cfg, settings: dict | None, *, device,
                  text: Callable[[ImageItem], str | None], flip: Callable[[ImageItem], bool],
                  settings_of: Callable[[ImageItem], dict] | None = None) -> tuple[list[Example], list[str]]:
    """The examples of `scan`'s items that train (repeats > 0), and the images that failed (moved to skipped)."""
    vae_id = store.model_identity(parts.source, "vae")
    text_id = ""
    examples: list[Example] = []
    unreadable: list[str] = []
    items = [item for item in scan.items if item.repeats > 0]
    for item in progress(items, f"encoding images into {store.root}", unit="image"):
        caption = text(item)
        if caption is not None and not text_id:
            text_id = store.model_identity(parts.source, "text")
        try:
            examples.append(_example(parts, store, item, settings_of(item) if settings_of else settings, data_cfg,
                                     device, vae_id, text_id, caption, flip(item)))
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
    return examples, unreadable


def _example(parts, store, item: ImageItem, settings: dict, data_cfg, device, vae_id: str, text_id: str,
             caption: str | None, flip_aug: bool) -> Example:
    """One image's example: latents (and, for a `caption`, its text embeddings) from the cache, encoded on a miss."""
    bucket, resized = _assign(item, settings)
    image_sha = store.file_sha256(item.path)
    posteriors = {}
    for flipped in ([False, True] if flip_aug else [False]):
        key = latent_cache_key(vae=vae_id, image_sha256=image_sha, bucket=bucket, resized=resized,
                               crop_left_top=_crop_offsets(bucket, resized), flipped=flipped)
        def encode(flipped=flipped):
            return _encode_posterior(parts, item, bucket, resized, flipped, device)
        entry = store.get_or_compute("latents", computed_key(key, device), encode, {"source": str(item.path)})
        posteriors[flipped] = Posterior(entry["mean"], entry["std"], key)
    context = pooled = None
    if caption is not None:
        length = data_cfg.max_token_length
        key = text_cache_key(text_encoders=text_id, caption=caption, max_token_length=length or 75,
                             attention=TEXT_ENCODER_ATTENTION)
        text = store.get_or_compute("text", computed_key(key, parts.text_encoder.device),
                                    lambda c=caption: _encode_caption(parts, c, length),
                                    {"source": str(item.path), "caption": caption})
        context, pooled = text["context"], text["pooled"]
    return Example(
        item=item, bucket=bucket, latents=posteriors[False].mean,
        latents_flipped=posteriors[True].mean if flip_aug else None, time_ids=_time_ids(item, bucket, False),
        time_ids_flipped=_time_ids(item, bucket, True) if flip_aug else None,
        context=context, pooled=pooled, posteriors=posteriors,
    )


def _crop_offsets(bucket, resized) -> tuple[int, int]:
    """The real centre crop (left, top) from the resized image to the bucket."""
    return (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2


def caching_order(examples: Sequence[Example]) -> list[int]:
    """The indices of `examples` (in scan order: subsets, then path; reg images last) in v0.8.7's
    `BaseDataset.cache_latents` order: dataset by dataset (`DatasetGroup`), each stably sorted by bucket area."""
    return sorted(range(len(examples)), key=lambda i: (examples[i].item.dataset, math.prod(examples[i].bucket)))


def draw_latents(examples: Sequence[Example], mode: str, *, device, stream: bool = True) -> None:
    """Set each example's latents from its cached posterior. mode "mean": the mean, nothing drawn. "sample": mean +
    std * randn as diffusers' `DiagonalGaussianDistribution.sample` computes it, in fp32 on `device`; with `stream`,
    from `device`'s global RNG in `caching_order`, as v0.8.7's `cache_batch_latents` at vae_batch_size 1 (the image,
    then its flip); without, each from a generator seeded by its cache key (images outside the training's stream)."""
    if mode != "sample":
        return
    for i in caching_order(examples) if stream else range(len(examples)):
        example = examples[i]
        drawn = {}
        for flipped, posterior in sorted(example.posteriors.items()):
            generator = None if stream else torch.Generator().manual_seed(posterior_seed(posterior.key))
            mean, std = (t.unsqueeze(0).to(device) for t in (posterior.mean, posterior.std))
            sample = randn_tensor(mean.shape, generator=generator, device=torch.device(device), dtype=mean.dtype)
            drawn[flipped] = (mean + std * sample)[0].cpu()
        example.latents, example.latents_flipped = drawn[False], drawn.get(True)


@torch.no_grad()
def _encode_posterior(parts, item: ImageItem, bucket, resized, flipped: bool, device) -> dict:
    """kohya's order: resize and centre-crop, then flip; the VAE posterior's mean and std (what `sample` uses)."""
    try:
        image = load_rgb(item.path)
    except Exception as error:  # PIL raises many types for truncated or corrupt pixel data
        raise UnreadableImage(f"{type(error).__name__}: {error}") from error
    cropped, _ = buckets.resize_and_center_crop(image, bucket, resized)
    if flipped:
        cropped = ImageOps.mirror(cropped)
    pixels = _pixels(cropped).unsqueeze(0).to(device, torch.float32)
    posterior = encode_posterior(parts.vae, pixels)
    return {"mean": posterior.mean[0].float().cpu(), "std": posterior.std[0].float().cpu()}


def _encode_caption(parts, caption: str, max_token_length: int | None) -> dict:
    context, pooled = encode_prompts(parts, [caption], max_token_length=max_token_length)
    return {"context": context[0].float().cpu(), "pooled": pooled[0].float().cpu()}
