"""kohya's `ss_*` metadata for a saved LoRA, so A1111/ComfyUI extensions and kohya's tools can read the settings.

The names and formats follow sd-scripts v0.8.7's `train_network.py` (`NetworkTrainer.train`, the metadata dict and
its two dataset branches); values are strings (safetensors metadata is str -> str), each `str(value)` as v0.8.7
writes it. Facts v0.8.7 does not record go under `lora_sweep_*` keys. docs/datasets.md lists the dataset keys.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_sweep.config import config_hash
from lora_sweep.data.buckets import bucket_settings, parse_resolution
from lora_sweep.data.dataset import ImageItem
from lora_sweep.data.subsets import DatasetSpec, Subset
from lora_sweep.model.network_settings import kohya_network_kwargs
from lora_sweep.training import optim, schedules
from lora_sweep.training.precision import PRECISION_TO_KOHYA

Entry = tuple[ImageItem, tuple[int, int] | None]  # an image and its bucket (w, h)


@dataclass(frozen=True)
class TrainingFacts:
    """What v0.8.7 records of the training as a whole: its len(dataloader) and num_train_epochs, and a session id
    and start time fixed once per training (v0.8.7: once per process)."""

    batches_per_epoch: int | None = None
    epochs: int | None = None
    # v0.8.7 draws it from Python's random before seeding; a separate source leaves the seeded draws alone
    session_id: int = field(default_factory=lambda: random.SystemRandom().randint(0, 2**32))
    started_at: float = field(default_factory=time.time)


def kohya_metadata(cfg, prepared, optimizer, *, steps: int, epoch: int,
                   facts: TrainingFacts | None = None) -> dict[str, str]:
    """A saved LoRA's metadata: kohya v0.8.7's `ss_*` keys, the config hash and variant, the SAI model spec.

    `steps` optimizer steps; `epoch` as v0.8.7 writes ss_epoch (a step file: the 0-based loop epoch; an epoch file:
    the 1-based epoch; the final file: num_train_epochs, `facts.epochs`); `prepared.specs` and `prepared.trained`
    (each training image with its bucket, reg images never used with repeats 0) give the dataset keys
    (`dataset_metadata`); `facts` the session's (None outside a training: fresh id and time, batch counts "None").
    Values are strings; the key set and the values for what lora-sweep does not have: docs/kohya-reference.md
    "The ss_* keys lora-sweep writes".
    """
    facts = facts if facts is not None else TrainingFacts()
    mixed, fp8 = PRECISION_TO_KOHYA.get(cfg.precision.name, (cfg.precision.name, False))
    scheduler = schedules.kohya_scheduler_name(optimizer, cfg.optimizer.scheduler)
    lr_unused = scheduler != cfg.optimizer.scheduler  # Adafactor's relative_step: v0.8.7 sets the lrs to None
    meta = {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.started_at,
        "ss_num_batches_per_epoch": facts.batches_per_epoch,
        "ss_num_epochs": facts.epochs,
        "ss_network_module": "networks.lora",
        "ss_network_dim": cfg.network.rank,
        "ss_network_alpha": cfg.network.alpha,  # a float, as the export writes --network_alpha: "1.0"
        "ss_network_dropout": cfg.network.dropout or None,  # v0.8.7's unset --network_dropout is None
        "ss_scale_weight_norms": cfg.network.scale_weight_norms,
        "lora_sweep_train_unet_only": not cfg.network.train_text_encoder,
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": False,
        "ss_learning_rate": None if lr_unused else cfg.train.lr,
        "ss_unet_lr": None,  # v0.8.7's unset --unet_lr: lora-sweep has no U-Net lr apart from train.lr
        "ss_text_encoder_lr": None if lr_unused else cfg.train.text_encoder_lr,  # as set, like --text_encoder_lr
        "ss_optimizer": optim.optimizer_description(optimizer),
        "ss_lr_scheduler": scheduler,
        "ss_lr_warmup_steps": cfg.optimizer.warmup_steps,
        "ss_mixed_precision": mixed,
        "ss_full_fp16": bool(cfg.precision.full_fp16),  # v0.8.7 has no ss_full_bf16
        "lora_sweep_full_bf16": bool(cfg.precision.full_bf16),
        "lora_sweep_fp8_base": fp8,  # v0.8.7 writes no fp8 key
        "ss_seed": cfg.train.seed,
        "ss_max_train_steps": cfg.train.max_steps,
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_gradient_accumulation_steps": cfg.train.grad_accum,
        "ss_max_grad_norm": cfg.train.max_grad_norm,
        "ss_gradient_checkpointing": cfg.train.gradient_checkpointing,
        "ss_noise_offset": cfg.noise.offset or None,
        "ss_noise_offset_random_strength": cfg.noise.offset_random_strength,
        "ss_adaptive_noise_scale": cfg.noise.adaptive_scale,
        "ss_multires_noise_iterations": cfg.noise.multires_iterations or None,
        "ss_multires_noise_discount": cfg.noise.multires_discount,
        "ss_ip_noise_gamma": cfg.noise.ip_gamma or None,
        "ss_ip_noise_gamma_random_strength": cfg.noise.ip_gamma_random_strength,
        "ss_min_snr_gamma": cfg.loss.min_snr_gamma,
        "ss_debiased_estimation": cfg.loss.debiased,
        "ss_loss_type": cfg.loss.type,
        "ss_huber_schedule": cfg.loss.huber_schedule,
        "ss_huber_c": cfg.loss.huber_c,
        "lora_sweep_v_parameterization": cfg.model.v_prediction,
        "lora_sweep_v_pred_like_loss": cfg.loss.v_pred_like_loss,  # v0.8.7 records neither v-pred loss switch
        "lora_sweep_scale_v_pred_loss_like_noise_pred": bool(cfg.loss.scale_v_pred_loss_like_noise_pred),
        "lora_sweep_caption_extension": cfg.data.caption_extension,
        "ss_max_token_length": cfg.data.max_token_length,
        "ss_clip_skip": cfg.model.clip_skip,  # recorded only: SDXL's text encoding ignores it in v0.8.7
        "ss_cache_latents": True,  # lora-sweep always caches the latents
        "ss_lowram": False,  # lora-sweep has no --lowram
        "ss_zero_terminal_snr": bool(cfg.loss.zero_terminal_snr),
        "ss_training_comment": None,  # no --training_comment: the run's notes are in MLflow
        "ss_sd_scripts_commit_hash": "(unknown)",  # v0.8.7's value outside an sd-scripts checkout
        "ss_training_finished_at": time.time(),
        "ss_output_name": cfg.train.output_name,
        "lora_sweep_config_hash": config_hash(cfg),
        "lora_sweep_variant": cfg.tracking.variant or "",
    }
    toml_mode = bool(cfg.data.datasets or cfg.data.dataset_config)
    meta |= model_keys(cfg.model.path, cfg.model.name)
    meta |= dataset_metadata(prepared.specs, prepared.trained, toml_mode=toml_mode, cfg=cfg)
    meta |= sai_model_spec(cfg)
    network_kwargs = kohya_network_kwargs(cfg.network)
    if network_kwargs is not None:  # v0.8.7 writes it only when --network_args is given
        meta["ss_network_args"] = json.dumps(network_kwargs)
    return {k: str(v) for k, v in meta.items()}  # as v0.8.7: "None", "True", "1e-05", "(1024, 1024)"


def model_keys(path: str | None, name: str) -> dict[str, str]:
    """`ss_sd_model_name` (the basename of model.path; the tiny model built into the cache is named like a hub id)
    and, for a path, v0.8.7's `ss_sd_model_hash` / `ss_new_sd_model_hash` ("IsADirectory" for a diffusers folder)."""
    if not path:
        return {"ss_sd_model_name": f"lora-sweep-{name}"}
    legacy, full = _model_hashes(str(Path(path).expanduser()))
    return {"ss_sd_model_name": os.path.basename(path), "ss_sd_model_hash": legacy, "ss_new_sd_model_hash": full}


@functools.lru_cache(maxsize=4)
def _model_hashes(path: str) -> tuple[str, str]:
    """v0.8.7's `model_hash` (sha256 of 64 KiB at 1 MiB, 8 hex) and `calculate_sha256` (the whole file), once per
    process: a 7 GB checkpoint takes seconds to hash."""
    if os.path.isdir(path):
        return "IsADirectory", "IsADirectory"
    with open(path, "rb") as file:
        file.seek(0x100000)
        legacy = hashlib.sha256(file.read(0x10000)).hexdigest()[:8]
        file.seek(0)
        full = hashlib.sha256()
        for chunk in iter(lambda: file.read(1 << 20), b""):
            full.update(chunk)
    return legacy, full.hexdigest()


def dataset_metadata(specs: Sequence[DatasetSpec], entries: Sequence[Entry], *, toml_mode: bool,
                     cfg) -> dict[str, str]:
    """v0.8.7's dataset keys: folder mode (data.dir, data.reg_data_dir) or TOML mode (data.datasets,
    data.dataset_config: `ss_datasets`), each with its v0.8.7 keys only, plus the caption and prior-loss keys.

    `entries`: every training image with its bucket (w, h), in any order (grouped by subset and sorted by path here,
    as v0.8.7 reads them); a reg image v0.8.7's balancing never reaches has `repeats` 0 (its bucket is not read).
    `ImageItem.caption` is the raw caption (tag counts split it on "," whatever data.caption_separator is, as
    v0.8.7's `set_tag_frequency`).
    """
    datasets = [_dataset_facts(i, spec, entries) for i, spec in enumerate(specs)]
    meta: dict[str, object] = {
        "ss_num_train_images": sum(d["num_train_images"] for d in datasets),
        "ss_num_reg_images": sum(d["num_reg_images"] for d in datasets),  # folder repeats x images, not balanced
        # v0.8.7 writes the command-line values: subset-level caption dropout is not reflected
        "ss_caption_dropout_rate": cfg.data.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.data.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.data.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,  # refused by lora-sweep: always kohya's unset value
        "ss_prior_loss_weight": cfg.loss.prior_loss_weight,
        "lora_sweep_reg_entries": sum(d["reg_entries"] for d in datasets),
        "lora_sweep_unused_reg_images": sum(d["unused_reg_images"] for d in datasets),
    }
    meta |= _toml_keys(datasets) if toml_mode else _folder_keys(datasets[0], cfg)
    return {k: str(v) for k, v in meta.items()}


def _folder_keys(dataset: dict, cfg) -> dict[str, object]:
    """The keys v0.8.7 writes without --dataset_config: the command line's values and the one dataset's dirs."""
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    for subset, items in dataset["subsets"]:
        (reg_dirs if subset.is_reg else dirs)[_basename(subset)] = {"n_repeats": subset.num_repeats,
                                                                    "img_count": len(items)}
    return {
        "ss_batch_size_per_device": cfg.train.batch_size,
        "ss_total_batch_size": cfg.train.batch_size * cfg.train.grad_accum,
        "ss_resolution": parse_resolution(cfg.data.resolution),  # a tuple: "(1024, 1024)"
        "ss_color_aug": bool(cfg.data.color_aug),
        "ss_flip_aug": bool(cfg.data.flip_aug),
        "ss_random_crop": bool(cfg.data.random_crop),
        "ss_shuffle_caption": bool(cfg.data.shuffle_caption),
        "ss_enable_bucket": dataset["enable_bucket"],
        "ss_bucket_no_upscale": dataset["bucket_no_upscale"],
        "ss_min_bucket_reso": dataset["min_bucket_reso"],
        "ss_max_bucket_reso": dataset["max_bucket_reso"],
        "ss_keep_tokens": cfg.data.keep_tokens,
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(dataset["tag_frequency"]),
        "ss_bucket_info": json.dumps(dataset["bucket_info"]),
    }


def _toml_keys(datasets: list[dict]) -> dict[str, object]:
    """The keys v0.8.7 writes with --dataset_config: `ss_datasets`, and the dirs and tag counts merged over datasets
    (a dir's tags from its first dataset; a train dir seen again named "<dir> (2)"; reg dirs left out)."""
    listed, tag_frequency, dirs = [], {}, {}
    for dataset in datasets:
        subsets = []
        for subset, items in dataset["subsets"]:
            subsets.append(_subset_entry(subset, len(items)))
            if subset.is_reg:
                continue
            name, n = _basename(subset), 2
            while name in dirs:
                name, n = f"{_basename(subset)} ({n})", n + 1
            dirs[name] = {"n_repeats": subset.num_repeats, "img_count": len(items)}
        listed.append({
            "is_dreambooth": True,
            "batch_size_per_device": dataset["batch_size"],
            "num_train_images": dataset["num_train_images"],
            "num_reg_images": dataset["num_reg_images"],
            "resolution": dataset["resolution"],
            "enable_bucket": dataset["enable_bucket"],
            "min_bucket_reso": dataset["min_bucket_reso"],
            "max_bucket_reso": dataset["max_bucket_reso"],
            "tag_frequency": dataset["tag_frequency"],
            "bucket_info": dataset["bucket_info"],
            "subsets": subsets,
        })
        for name, counts in dataset["tag_frequency"].items():
            tag_frequency.setdefault(name, counts)
    return {"ss_datasets": json.dumps(listed), "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_dataset_dirs": json.dumps(dirs)}


def _subset_entry(subset: Subset, img_count: int) -> dict[str, object]:
    """One subset of `ss_datasets`, v0.8.7's keys in its order (color_aug and random_crop: refused, so false)."""
    return {
        "img_count": img_count,
        "num_repeats": subset.num_repeats,
        "color_aug": False,
        "flip_aug": bool(subset.flip_aug),
        "random_crop": False,
        "shuffle_caption": bool(subset.shuffle_caption),
        "keep_tokens": subset.keep_tokens,
        "keep_tokens_separator": subset.keep_tokens_separator,
        "secondary_separator": subset.secondary_separator,
        "enable_wildcard": bool(subset.enable_wildcard),
        "caption_prefix": subset.caption_prefix,
        "caption_suffix": subset.caption_suffix,
        "image_dir": _basename(subset),
        "class_tokens": subset.class_tokens,
        "is_reg": subset.is_reg,
    }


def _dataset_facts(index: int, spec: DatasetSpec, entries: Sequence[Entry]) -> dict:
    """What v0.8.7's DreamBoothDataset knows of one dataset once built: its subsets with their images (sorted path),
    image counts (raw repeats), tag counts per dir, bucket settings in use and `bucket_info`."""
    by_subset: dict[Subset, list[Entry]] = {}
    for item, bucket in entries:
        if item.dataset == index:
            by_subset.setdefault(item.subset, []).append((item, bucket))
    order = [s for s in spec.subsets if s in by_subset] or sorted(by_subset, key=lambda s: s.is_reg)
    subsets = [(s, sorted(by_subset[s], key=lambda e: str(e[0].path))) for s in order]
    settings = bucket_settings(spec)
    bucketed = not settings.get("fixed")
    tag_frequency: dict[str, dict[str, int]] = {}
    for subset, items in subsets:
        counts = tag_frequency.setdefault(_basename(subset), {})  # a dir named twice adds up, as v0.8.7
        tags = (tag.strip().lower() for item, _ in items for tag in item.caption.split(","))
        for tag in filter(None, tags):
            counts[tag] = counts.get(tag, 0) + 1
    # v0.8.7 registers train images first, then the reg images its balancing reaches
    registered = [e for s, items in subsets if not s.is_reg for e in items]
    registered += [e for s, items in subsets if s.is_reg for e in items if e[0].repeats > 0]
    reg = [item for s, items in subsets if s.is_reg for item, _ in items]
    return {
        "subsets": subsets,
        "batch_size": spec.batch_size,
        "resolution": tuple(spec.resolution),
        "enable_bucket": bucketed,
        "bucket_no_upscale": bucketed and bool(spec.bucket_no_upscale),
        "min_bucket_reso": settings.get("min_reso"),
        "max_bucket_reso": settings.get("max_reso"),
        "num_train_images": sum(s.num_repeats * len(items) for s, items in subsets if not s.is_reg),
        "num_reg_images": sum(s.num_repeats * len(items) for s, items in subsets if s.is_reg),
        "reg_entries": sum(item.repeats for item in reg),
        "unused_reg_images": sum(item.repeats == 0 for item in reg),
        "tag_frequency": tag_frequency,
        "bucket_info": bucket_info(registered) if bucketed else None,
    }


def bucket_info(registered: Sequence[Entry]) -> dict[str, object]:
    """v0.8.7's `BaseDataset.bucket_info`: buckets numbered in (w, h) order, each its resolution and its entries
    (images x repeats), and the mean |bucket aspect - image aspect| over the images (without repeats)."""
    counts: dict[tuple[int, int], int] = {}
    for item, bucket in registered:
        counts[tuple(bucket)] = counts.get(tuple(bucket), 0) + item.repeats
    errors = [bucket[0] / bucket[1] - item.size[0] / item.size[1] for item, bucket in registered]
    buckets = {i: {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
    # numpy's mean, as v0.8.7: its pairwise sum can differ from Python's sum in the last digit
    return {"buckets": buckets, "mean_img_ar_error": float(np.mean(np.abs(np.array(errors))))}


def _basename(subset: Subset) -> str:
    return os.path.basename(subset.image_dir)


def sai_model_spec(cfg, *, now: float | None = None) -> dict[str, str]:
    """kohya's `get_sai_model_spec` keys for an SDXL LoRA (`library/sai_model_spec.py` `build_metadata`): the date
    of `now` (default: the current time) in local time, `data.resolution` as "WxH", the prediction type;
    `modelspec.timestep_range` only if a bound is set."""
    width, height = parse_resolution(cfg.data.resolution)
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": cfg.train.output_name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(time.time() if now is None else now)).isoformat(),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if cfg.model.v_prediction else "epsilon",
    }
    low, high = cfg.noise.min_timestep, cfg.noise.max_timestep
    if low is not None or high is not None:
        spec["modelspec.timestep_range"] = f"{0 if low is None else low},{1000 if high is None else high}"
    if cfg.model.clip_skip is not None:
        spec["modelspec.encoder_layer"] = f"{cfg.model.clip_skip}"
    return spec
