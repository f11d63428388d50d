"""Everything one training holds: model parts with LoRA, examples, optimizer, precision policy; built in one place.

`build_session` does the set-up in kohya's order (load model -> prepare data with the frozen encoders -> add LoRA ->
store base weights in the training precision -> optimizer and LR schedule), so `train.py` is only the loop. Each
component is read in the dtype it is stored in (or its checkpoint's), and LoRA and casts happen on the CPU before the
U-Net (and the text encoders the step runs) go to the training device (placement.py has the table).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_sweep.atomic import write_text
from lora_sweep.data.buckets import bucket_histogram, parse_resolution
from lora_sweep.data.dataset import FolderScan, scan_folder
from lora_sweep.data.photos import data_folder
from lora_sweep.data.prepare import Prepared, prepare_examples
from lora_sweep.errors import Fallback, UserError
from lora_sweep.model import loading as model_lib
from lora_sweep.model.encode import encode_prompts
from lora_sweep.model.network import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_lora,
    kohya_state_dict,
    lora_parameters,
    save_diffusers,
    save_kohya,
)
from lora_sweep.paths import cache_root, state_root
from lora_sweep.training import metadata, optim, placement, precision
from lora_sweep.training.evaluate import Sampler, Validator, fit_subset, split_validation
from lora_sweep.training.loss import one_timestep_per_batch

log = logging.getLogger(__name__)


@dataclass
class Session:
    cfg: Any
    device: torch.device
    output_dir: Path
    sink: Any
    parts: model_lib.SDXLParts
    policy: precision.PrecisionPolicy
    prepared: Prepared
    batch_items: list[int]  # example index per dataset entry (repeats expanded)
    batch_buckets: list[tuple[int, int]]  # bucket per dataset entry
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: Any
    alphas_cumprod: torch.Tensor
    vae_scale: float
    one_timestep_per_batch: bool
    lora: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # trained tensors by name (for states)
    hooks: list = field(default_factory=list)  # hook(session, step, final) at step 0 and after each optimizer step
    should_stop: Callable[[], bool] = lambda: False  # a stop request (Ctrl-C / SIGTERM): long hooks check it

    @property
    def unet(self):
        return self.parts.unet

    @property
    def noise_scheduler(self):
        return self.parts.noise_scheduler

    def text_for(self, examples) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached embeddings when the text encoders are frozen; otherwise encode now (with grads if trained)."""
        if examples[0].context is not None:
            context = torch.stack([e.context for e in examples]).to(self.device)
            pooled = torch.stack([e.pooled for e in examples]).to(self.device)
            return context, pooled
        captions = [e.item.caption for e in examples]
        if self.cfg.data.shuffle_caption:
            import random

            from lora_sweep.data.captions import shuffle_caption

            captions = [
                shuffle_caption(c, keep_tokens=self.cfg.data.keep_tokens, separator=self.cfg.data.caption_separator,
                                rng=random)  # kohya shuffles with Python's global random
                for c in captions
            ]
        return encode_prompts(self.parts, captions, train=self.cfg.network.train_text_encoder)

    def after_step(self, step: int, final: bool = False) -> bool:
        """Run the evaluation hooks due at `step` (samples, fit/val losses). False if a stop request cut them short:
        a hook returns False when it gave up (logging nothing), and once a stop is requested no further hook starts."""
        complete = True
        for hook in self.hooks:
            if self.should_stop() or hook(self, step, final) is False:
                complete = False
                break
        return complete

    def kohya_lora(self) -> dict[str, torch.Tensor]:
        modules = {"lora_unet": self.parts.unet}
        if self.cfg.network.train_text_encoder:
            modules |= {"lora_te1": self.parts.text_encoder, "lora_te2": self.parts.text_encoder_2}
        return kohya_state_dict(modules, alpha=self.cfg.network.alpha,
                                layers_per_block=self.parts.unet.config.layers_per_block)

    def save_checkpoint(self, file_name: str, *, steps: int, epoch: int) -> Path:
        """A kohya-format LoRA for users (`<output_name>-step00000500.safetensors`, `-000005` per epoch), logged to
        the run as soon as it is written."""
        meta = metadata.kohya_metadata(self.cfg, self.prepared, self.optimizer, steps=steps, epoch=epoch)
        path = save_kohya(self.output_dir / file_name, self.kohya_lora(), meta)
        self.sink.artifact(path, "lora/checkpoints")
        return path

    def save_lora(self, *, final_loss: float, steps: int, epoch: int) -> dict[str, Path]:
        """Write the final LoRA in kohya format (`<output_name>.safetensors`) and diffusers format."""
        cfg = self.cfg
        meta = metadata.kohya_metadata(cfg, self.prepared, self.optimizer, steps=steps, epoch=epoch)
        kohya_file = save_kohya(self.output_dir / f"{cfg.train.output_name}.safetensors", self.kohya_lora(), meta)
        trained_te = cfg.network.train_text_encoder
        te1, te2 = (self.parts.text_encoder, self.parts.text_encoder_2) if trained_te else (None, None)
        diffusers_file = save_diffusers(self.output_dir / "diffusers", self.parts.unet, te1, te2)
        self.sink.artifact(kohya_file, "lora")
        self.sink.artifact(diffusers_file, "lora/diffusers")
        return {"kohya": kohya_file, "diffusers": diffusers_file}


def check_device(cfg, env: Mapping[str, str] | None = None) -> Fallback | None:
    """train.device=auto where CUDA_VISIBLE_DEVICES names GPUs but torch sees no CUDA device (a CPU-only torch, no
    driver, a wrong index), which would make `pick_device` train on the CPU without a word.

    In a gpu_queue GPU slot (GPU_QUEUE_SLOT set: the launcher planned this job for a GPU, from hydra.launcher.gpus or
    the GPUs nvidia-smi lists) that is refused with a UserError before the model loads: every job of the sweep
    would crawl on the CPU, the slots sharing its cores, for hours instead of failing in seconds. Elsewhere (a
    Slurm allocation, a shell's setting) the run goes on, on the CPU, and says so: the returned Fallback is printed
    and logged on the run (`data.warnings`, `data/warnings.txt`). train.device=cpu (or cuda) is the user's choice:
    None. env: os.environ by default."""
    env = os.environ if env is None else env
    tokens = []
    for token in (t.strip() for t in env.get("CUDA_VISIBLE_DEVICES", "").split(",")):
        if not token or (token.lstrip("-").isdigit() and int(token) < 0):
            break  # CUDA ignores everything from the first invalid index on
        tokens.append(token)
    if cfg.train.device != "auto" or not tokens or torch.cuda.is_available():
        return None
    why = (f"this torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
           else "the CUDA driver finds no usable device among them")
    if env.get("GPU_QUEUE_SLOT") is not None:
        raise UserError(
            "the gpu_queue runs this job in a GPU slot (its CUDA_VISIBLE_DEVICES names a GPU) with train.device=auto, "
            f"but torch sees no CUDA device ({why}). Nothing was trained: training on the CPU instead would be "
            "silent and far slower. Fix the GPU set-up (a CUDA build of torch, the NVIDIA driver, the GPU indices in "
            "hydra.launcher.gpus), or run on CPU slots on purpose: hydra.launcher.gpus=[] (or train.device=cpu).")
    return Fallback("train.device", "GPUs named by CUDA_VISIBLE_DEVICES that torch cannot use", tuple(tokens),
                    f"torch sees no CUDA device ({why}): this run trains on the CPU (train.device=auto). Install a "
                    "CUDA build of torch or fix the driver, or set train.device=cpu to train on the CPU on purpose.")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _warn_unreadable(sink, setting: str, paths: list[str]) -> None:
    """Images the header scan passed whose pixels failed to decode (a truncated file): skipped like the others the
    scan finds, so said the same way, as a fallback in data.warnings and data/warnings.txt (not only in the log).
    A sink without `warn` (a test's) is told nothing."""
    from lora_sweep.errors import Fallback

    if paths and hasattr(sink, "warn"):
        sink.warn(Fallback(setting, "images whose pixels failed to decode (truncated or corrupt after a valid header): "
                           "skipped (counted in data.skipped_images)", tuple(paths), "Re-save them as PNG or JPEG."))


def load_parts(cfg, policy: precision.PrecisionPolicy | None = None, *,
               text_encoders_in_step: bool = False) -> model_lib.SDXLParts:
    """The tiny model is built once into the cache (seed 0: every variant and seed shares one base model) and then
    loaded like real SDXL, through the same loader. With a `policy`, each component is read in the dtype
    `placement.load_dtypes` gives it (the checkpoint's, or the one it will be stored in); without, in fp32."""
    path = cfg.model.path or model_lib.resolve_model_path(cfg.model.name, cfg.model.path, cache_root=cache_root(cfg))
    dtypes = None
    if policy is not None:
        on_disk = model_lib.checkpoint_dtypes(model_lib.check_model_path(path))
        dtypes = placement.load_dtypes(policy, on_disk, text_encoders_in_step=text_encoders_in_step)
    return model_lib.load_sdxl(path, cache_root=cache_root(cfg), dtypes=dtypes)


def build_session(cfg, *, output_dir: Path, sink, scan: FolderScan | None = None,
                  validation_scan: FolderScan | None = None) -> Session:
    device = pick_device(cfg.train.device)
    policy = precision.precision_policy(cfg.precision.name, device.type)
    output_dir.mkdir(parents=True, exist_ok=True)
    encode_text_online = cfg.network.train_text_encoder or cfg.data.shuffle_caption
    started = time.perf_counter()
    parts = load_parts(cfg, policy, text_encoders_in_step=encode_text_online)  # in storage dtypes (placement.py)
    log.info("model loaded in %.1f s from %s", time.perf_counter() - started, parts.source)
    encoders = (parts.text_encoder, parts.text_encoder_2)

    # Data first, with the frozen encoders, so the cache can be filled before LoRA changes anything.
    scan = scan if scan is not None else scan_folder(data_folder(cfg), cfg.data.caption_extension)
    if encode_text_online:
        why = "network.train_text_encoder=true" if cfg.network.train_text_encoder else "data.shuffle_caption=true"
        log.info("text-encoder outputs are not cached in this run (%s): captions are encoded at every step, "
                 "as kohya does", why)
    else:  # they only fill the shared text cache, in fp32 whatever the precision
        for encoder in encoders:
            placement.compute_in_fp32(encoder)
            encoder.to(device)
    parts.vae.to(device)
    started = time.perf_counter()
    prepared = prepare_examples(parts, scan, cfg.data, device=device, encode_text=not encode_text_online)
    _warn_unreadable(sink, "data.dir", prepared.unreadable)
    log.info("data ready in %.1f s (cache: %s)", time.perf_counter() - started,
             ", ".join(f"{k.removeprefix('cache/')} {v}" for k, v in prepared.cache_stats.items()))
    parts.vae.to("cpu")  # latents are cached: the VAE is not needed on the training device
    if not encode_text_online:
        for encoder in encoders:
            encoder.to("cpu")
    # held out with validation.seed, not train.seed: replicates (train.seed=1,2,3) train and are measured on the
    # same images, so their val/loss and fit/loss points pair across seeds
    train_idx, val_idx = split_validation(len(prepared.examples), cfg.data.validation_split, cfg.validation.seed)
    val_examples = [prepared.examples[i] for i in val_idx]
    if cfg.data.validation_dir:
        val_scan = validation_scan if validation_scan is not None else scan_folder(
            Path(cfg.data.validation_dir), cfg.data.caption_extension)
        val_prepared = prepare_examples(parts, val_scan, cfg.data, device=device, encode_text=not encode_text_online)
        _warn_unreadable(sink, "data.validation_dir", val_prepared.unreadable)
        val_examples += val_prepared.examples
    items = [i for i in train_idx for _ in range(prepared.examples[i].item.repeats)]
    sink.params({
        "data.images": len(scan.items), "data.skipped_images": len(scan.skipped),
        "data.entries_with_repeats": len(items), "data.validation_images": len(val_examples),
        "train.total_batch_size": cfg.train.batch_size * cfg.train.grad_accum,
    })
    sink.metrics(prepared.cache_stats, 0)
    prepared.histogram = bucket_histogram([prepared.examples[i].bucket for i in items])  # training entries only
    sink.artifact(write_text(output_dir / "buckets.json", json.dumps(prepared.histogram, indent=1)), "data")

    # LoRA (fp32), then the base weights in their storage dtype, on the CPU; only then onto the training device.
    unet = parts.unet
    unet.train()
    with placement.adapters_in_fp32(unet):
        add_lora(unet, rank=cfg.network.rank, alpha=cfg.network.alpha, targets=UNET_TARGETS,
                 dropout=cfg.network.dropout)
    if cfg.network.train_text_encoder:
        for encoder in encoders:
            with placement.adapters_in_fp32(encoder):
                add_lora(encoder, rank=cfg.network.rank, alpha=cfg.network.alpha, targets=TEXT_ENCODER_TARGETS,
                         dropout=cfg.network.dropout)
            encoder.train()
    precision.apply_base_precision(unet, policy)
    unet.to(device)
    if encode_text_online:  # the step runs the text encoders: stored like the U-Net (kohya's te_weight_dtype)
        for encoder in encoders:
            precision.apply_base_precision(encoder, policy)
            encoder.to(device)
    log.info("weights on %s: unet %s%s", device, placement.describe(unet), "; text encoders " + " and ".join(
        placement.describe(e) for e in encoders) if encode_text_online else "")
    groups = [{"name": "unet", "params": lora_parameters(unet), "lr": cfg.train.lr}]
    lora = named_lora(unet, "unet")
    if cfg.network.train_text_encoder:
        te_params = []
        for name, encoder in (("text_encoder", parts.text_encoder), ("text_encoder_2", parts.text_encoder_2)):
            te_params += lora_parameters(encoder)
            lora |= named_lora(encoder, name)
        te_lr = cfg.train.text_encoder_lr if cfg.train.text_encoder_lr is not None else cfg.train.lr
        groups.insert(0, {"name": "text_encoder", "params": te_params, "lr": te_lr})  # kohya: [TE group, U-Net group]
    if cfg.train.gradient_checkpointing:
        precision.enable_gradient_checkpointing(unet)
    params = [p for g in groups for p in g["params"]]
    batch_buckets = [prepared.examples[i].bucket for i in items]
    check_disk_space(cfg, output_dir, lora_numel=sum(p.numel() for p in params),
                     epochs=num_epochs(cfg.train.max_steps, batches_per_epoch(batch_buckets, cfg.train.batch_size),
                                       cfg.train.grad_accum))
    optimizer = optim.build_optimizer(cfg.optimizer.name, groups, lr=cfg.train.lr, args=dict(cfg.optimizer.args))
    lr_scheduler = optim.build_lr_scheduler(optimizer, cfg.optimizer.scheduler,
                                            warmup_steps=cfg.optimizer.warmup_steps, total_steps=cfg.train.max_steps)
    sink.metrics({"mem/base_weights_bytes": precision.base_weight_bytes(unet)}, 0)
    hooks = [Validator(val_examples, list(cfg.validation.timesteps), cfg.validation.seed)]
    fit_examples = [prepared.examples[i] for i in fit_subset(train_idx, cfg.validation.fit_images, cfg.validation.seed)]
    hooks.append(Validator(fit_examples, list(cfg.validation.timesteps), cfg.validation.seed, prefix="fit"))
    sampler = Sampler.from_config(cfg, min(parse_resolution(cfg.data.resolution)))
    if sampler is not None:
        hooks.append(sampler)
    return Session(
        hooks=hooks, lora=lora, cfg=cfg, device=device, output_dir=output_dir, sink=sink, parts=parts, policy=policy,
        prepared=prepared,
        batch_items=items, batch_buckets=batch_buckets, params=params,
        optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=precision.make_grad_scaler(policy, device.type),
        alphas_cumprod=parts.noise_scheduler.alphas_cumprod.to(device),
        vae_scale=float(parts.vae.config.scaling_factor),
        one_timestep_per_batch=one_timestep_per_batch(cfg.loss.type, cfg.loss.per_sample_timesteps),
    )


def named_lora(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Parameter]:
    return {f"{prefix}.{n}": p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad}


def batches_per_epoch(buckets: list[tuple[int, int]], batch_size: int) -> int:
    """kohya's len(dataloader): every bucket is cut into ceil(n / batch_size) batches."""
    return sum(math.ceil(n / batch_size) for n in Counter(map(tuple, buckets)).values())


def num_epochs(max_steps: int, batches: int, grad_accum: int) -> int:
    """kohya's num_train_epochs = ceil(max_train_steps / ceil(len(dataloader) / grad_accum))."""
    return math.ceil(max_steps / math.ceil(batches / grad_accum))


def check_disk_space(cfg, output_dir: Path, *, lora_numel: int, epochs: int) -> None:
    """Fail before the first step if the states and checkpoints this run will write do not fit on their disks."""
    from lora_sweep.training.failures import check_free_space, expected_bytes

    states, outputs = expected_bytes(
        lora_numel=lora_numel, optimizer=cfg.optimizer.name, keep_states=cfg.train.keep_states,
        save_every=cfg.train.save_every, max_steps=cfg.train.max_steps,
        epoch_checkpoints=(epochs - 1) // cfg.train.save_every_epochs if cfg.train.save_every_epochs else 0)
    root = state_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    check_free_space({root: ("train.state_dir", states), Path(output_dir): ("train.output_dir", outputs)})

