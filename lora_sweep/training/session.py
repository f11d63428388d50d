"""Everything one training holds (model parts with LoRA, examples, optimizer, precision policy), built in one place.

`build_session` follows kohya's order: `load_parts` -> `prepare_data` (frozen encoders) -> `attach_lora` (base
weights in the training precision) -> `make_optimizer` -> `evaluation_hooks`. Components load in their storage
dtype; LoRA and casts happen on the CPU before the U-Net moves to the device (placement.py has the table).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_sweep.atomic import write_text
from lora_sweep.data.buckets import bucket_histogram
from lora_sweep.data.captions import fixed_caption, process_caption
from lora_sweep.data.dataset import (
    FolderScan,
    datasets_record,
    inspect_datasets,
    raw_reg_entries,
    resolved_dataset_params,
    scan_folder,
)
from lora_sweep.data.order import kohya_epoch_batches, kohya_epoch_random_state
from lora_sweep.data.photos import data_folder
from lora_sweep.data.prepare import (
    Example,
    Prepared,
    draw_latents,
    prepare_datasets,
    prepare_examples,
    truncated_captions,
)
from lora_sweep.data.subsets import (
    DatasetSpec,
    Subset,
    dataset_specs,
    per_step_captions,
)
from lora_sweep.errors import Fallback, UserError
from lora_sweep.model import loading as model_lib
from lora_sweep.model.encode import encode_prompts
from lora_sweep.model.network import (
    add_network,
    kohya_lora_parameters,
    kohya_state_dict,
    save_diffusers,
    save_kohya,
    set_lora_multiplier,
)
from lora_sweep.model.network_settings import kohya_dropouts
from lora_sweep.model.regularization import Dropouts, install_dropouts
from lora_sweep.paths import cache_root, state_root
from lora_sweep.training import metadata, optim, placement, precision, schedules, switches
from lora_sweep.training.checkpoint import SAVE_DTYPES
from lora_sweep.training.evaluate import Sampler, Validator, fit_subset, read_prompts, split_training, training_images
from lora_sweep.training.loss import LossOptions, one_timestep_per_batch
from lora_sweep.training.noise import NoiseOptions

log = logging.getLogger(__name__)


@dataclass
class Session:
    """What the loop needs: config, model with LoRA, examples, optimizer and schedule, precision, hooks, sink."""

    cfg: Any
    device: torch.device
    output_dir: Path
    sink: Any  # a train.Sink
    parts: model_lib.SDXLParts
    policy: precision.PrecisionPolicy
    prepared: Prepared  # its specs: the datasets (batch size, network_multiplier) by item.dataset
    batch_items: list[int]  # example index per dataset entry (repeats expanded)
    batch_buckets: list[tuple[int, int]]  # bucket per dataset entry
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: Any
    alphas_cumprod: torch.Tensor  # the training schedule's (loss.zero_terminal_snr rescales it)
    vae_scale: float
    noise_options: NoiseOptions
    loss_options: LossOptions
    lora: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # trained tensors by name (for states)
    multiplier: float = 1.0  # the network_multiplier the LoRA layers are scaled by now (`set_multiplier`)
    hooks: list = field(default_factory=list)  # hook(session, step, final) at step 0 and after each optimizer step
    should_stop: Callable[[], bool] = lambda: False  # a stop request (Ctrl-C / SIGTERM): long hooks check it
    snr_alphas_cumprod: torch.Tensor | None = None  # what the SNR weights read (None: alphas_cumprod), noise.py
    facts: metadata.TrainingFacts | None = None  # the training's ss_session_id, epochs ... (metadata.py)

    @property
    def unet(self):
        return self.parts.unet

    @property
    def batch_datasets(self) -> list[int]:
        """The dataset of each dataset entry."""
        return [self.prepared.examples[i].item.dataset for i in self.batch_items]

    @property
    def batch_sizes(self) -> list[int]:
        """Each dataset's batch size (train.batch_size without specs)."""
        return [spec.batch_size for spec in self.prepared.specs] or [self.cfg.train.batch_size]

    @property
    def epochs(self) -> int:
        """kohya's num_train_epochs: the epochs train.max_steps updates reach (the last may be partial)."""
        t = self.cfg.train
        batches = batches_per_epoch(self.batch_buckets, self.batch_sizes, self.batch_datasets)
        return num_epochs(t.max_steps, batches, t.grad_accum)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s micro-batches of entry indices, in v0.8.7's order (`order.kohya_epoch_batches`)."""
        return kohya_epoch_batches(self.batch_buckets, self.batch_datasets, self.batch_sizes, self.cfg.train.seed,
                                   epoch, self.cfg.data.max_data_loader_n_workers)

    def epoch_random_state(self, epoch: int) -> tuple | None:
        """Python's `random` state after epoch `epoch`'s first batch in v0.8.7 (`order.kohya_epoch_random_state`)."""
        return kohya_epoch_random_state(self.batch_buckets, self.batch_datasets, self.batch_sizes,
                                        self.cfg.train.seed, epoch, self.cfg.data.max_data_loader_n_workers)

    @property
    def v_prediction(self) -> bool:
        return self.loss_options.v_prediction

    def unet_forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                     pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """The U-Net's prediction (B, C, h, w) under autocast, as kohya's call_unet (docs/kohya-reference.md §4, §7).

        x_t (B, C, h, w) is cast to weight_dtype, `time_ids` (B, 6) to the dtype of `pooled` (B, 1280);
        `context` is (B, 77, 2048), or 152 / 227 tokens with data.max_token_length 150 / 225.
        """
        with precision.autocast(self.policy, self.device.type):
            return self.unet(noisy_latents.to(self.policy.latent_dtype), timesteps, context, added_cond_kwargs={
                "text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}).sample

    def batch_from_cache(self, size: int) -> bool:
        """Whether a batch of `size` cached examples takes its embeddings from the cache. v0.8.7 without
        --cache_text_encoder_outputs encodes each batch in one call; the cache holds one-image encodings, which are
        the same numbers for a batch of one. For more, in fp32 with the encoders on the training device (the CPU),
        the batch is encoded as kohya does: TE2's text_projection of a (B, 1280) batch rounds otherwise than B
        (1, 1280) products, 4e-7 relative on SDXL (docs/kohya-exact.md). Elsewhere the cache stays: in mixed
        precision it is fp32 where kohya encodes in the training dtype anyway, and on a GPU the encoders stay on
        the CPU once it is filled."""
        return size == 1 or self.policy.name != "fp32" or self.parts.text_encoder.device != self.device

    def text_for(self, examples, *, seen: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached embeddings when every caption is fixed and the text encoders frozen (`batch_from_cache`);
        otherwise each caption processed now in batch order (`captions.process_caption` with Python's global
        `random`, as kohya; `seen`: the (epoch, step) v0.8.7's dataset sees, `captions.seen_position`) and the batch
        encoded in one call (with grads if trained), as v0.8.7's get_text_cond encodes it."""
        if all(e.context is not None for e in examples) and self.batch_from_cache(len(examples)):
            context = torch.stack([e.context for e in examples]).to(self.device)
            pooled = torch.stack([e.pooled for e in examples]).to(self.device)
            return context, pooled
        epoch, step = seen
        captions = [process_caption(e.item.caption, e.item.subset, epoch=epoch, step=step,
                                    max_train_steps=self.cfg.train.max_steps, rng=random) for e in examples]
        return encode_prompts(self.parts, captions, train=self.cfg.network.train_text_encoder,
                              max_token_length=self.cfg.data.max_token_length)

    def set_multiplier(self, dataset: int | None) -> None:
        """Scale every LoRA layer by `dataset`'s network_multiplier (kohya's network.set_multiplier before the
        text-encoder forward), or by 1.0 for None (evaluation); only when some dataset's multiplier is not 1.0."""
        specs = self.prepared.specs
        wanted = specs[dataset].network_multiplier if specs and dataset is not None else 1.0
        if wanted != self.multiplier and any(spec.network_multiplier != 1.0 for spec in specs):
            modules = [self.parts.unet, self.parts.text_encoder, self.parts.text_encoder_2]
            set_lora_multiplier(modules, wanted)
            self.multiplier = wanted

    def after_step(self, step: int, final: bool = False) -> bool:
        """Run the evaluation hooks due at `step`; False if a stop request cut them short.

        A hook returns False when it gave up; once a stop is requested no further hook starts.
        """
        self.set_multiplier(None)  # measured and sampled at full strength, as the saved file is used
        complete = True
        for hook in self.hooks:
            if self.should_stop() or hook(self, step, final) is False:
                complete = False
                break
        return complete

    def kohya_lora(self) -> dict[str, torch.Tensor]:
        """The kohya file's tensors, every one (alpha too) in train.save_precision's dtype."""
        modules = {"lora_unet": self.parts.unet}
        if self.cfg.network.train_text_encoder:
            modules |= {"lora_te1": self.parts.text_encoder, "lora_te2": self.parts.text_encoder_2}
        # in the LoRA's own dtype without train.save_precision, as v0.8.7 (fp16/bf16 under precision.full_*)
        dtype = SAVE_DTYPES.get(self.cfg.train.save_precision, self.params[0].dtype)
        return kohya_state_dict(modules, layers_per_block=self.parts.unet.config.layers_per_block, dtype=dtype)

    def save_checkpoint(self, file_name: str, *, steps: int, epoch: int) -> Path:
        """A kohya-format LoRA for users (`-step00000500`, or `-000005` per epoch), logged to the run when written."""
        meta = metadata.kohya_metadata(self.cfg, self.prepared, self.optimizer, steps=steps, epoch=epoch,
                                       facts=self.facts)
        path = save_kohya(self.output_dir / file_name, self.kohya_lora(), meta)
        self.sink.artifact(path, "lora/checkpoints")
        return path

    def save_lora(self, *, final_loss: float, steps: int, epoch: int) -> dict[str, Path]:
        """Write the final LoRA in kohya format (`<output_name>.safetensors`) and diffusers format, both in
        train.save_precision's dtype."""
        cfg = self.cfg
        meta = metadata.kohya_metadata(cfg, self.prepared, self.optimizer, steps=steps, epoch=epoch, facts=self.facts)
        kohya_file = save_kohya(self.output_dir / f"{cfg.train.output_name}.safetensors", self.kohya_lora(), meta)
        trained_te = cfg.network.train_text_encoder
        te1, te2 = (self.parts.text_encoder, self.parts.text_encoder_2) if trained_te else (None, None)
        unet = None if cfg.network.network_train_text_encoder_only else self.parts.unet
        diffusers_file = save_diffusers(self.output_dir / "diffusers", unet, te1, te2,
                                        dtype=SAVE_DTYPES.get(cfg.train.save_precision))
        self.sink.artifact(kohya_file, "lora")
        self.sink.artifact(diffusers_file, "lora/diffusers")
        return {"kohya": kohya_file, "diffusers": diffusers_file}


def check_device(cfg, env: Mapping[str, str] | None = None) -> Fallback | None:
    """A Fallback when train.device=auto, CUDA_VISIBLE_DEVICES names GPUs and torch sees none; else None.

    In a gpu_queue GPU slot (GPU_QUEUE_SLOT set) raise UserError instead: every job would crawl on the CPU for hours.
    train.device=cuda where torch sees no CUDA device raises UserError; train.device=cpu is the user's choice (None).
    env: os.environ by default.
    """
    env = os.environ if env is None else env
    if (problem := cuda_problem(cfg)) is not None:
        raise UserError(problem)
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


def cuda_problem(cfg) -> str | None:
    """The paragraph refusing train.device=cuda where torch on this machine sees no CUDA device; else None."""
    if cfg.train.device != "cuda" or torch.cuda.is_available():
        return None
    why = "a CPU-only build" if torch.version.cuda is None else "its CUDA driver finds no usable device"
    return (f"train.device=cuda, but torch {torch.__version__} on this machine sees no CUDA device ({why}). Use "
            "train.device=auto or cpu to train on the CPU, or fix the GPU set-up (a CUDA build of torch, the NVIDIA "
            "driver).")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_parts(cfg, policy: precision.PrecisionPolicy | None = None,
               specs: list[DatasetSpec] | None = None) -> model_lib.SDXLParts:
    """The model of `cfg`, loaded in the dtypes `placement.load_dtypes` gives under `policy` (fp32 without).

    model=tiny is read from the package, tiny_random built once into the cache (seed 0); both load like real SDXL.
    """
    started = time.perf_counter()
    path = cfg.model.path or model_lib.resolve_model_path(cfg.model.name, cfg.model.path, cache_root=cache_root(cfg))
    log.info("loading the model from %s", path)  # a minute or more for SDXL from a slow disk
    dtypes = None
    if policy is not None:
        on_disk = model_lib.checkpoint_dtypes(model_lib.check_model_path(path))
        dtypes = placement.load_dtypes(policy, on_disk, text_encoders_in_step=encodes_text_in_step(cfg, specs))
    parts = model_lib.load_sdxl(path, cache_root=cache_root(cfg), dtypes=dtypes)
    log.info("model loaded in %.1f s from %s", time.perf_counter() - started, parts.source)
    return parts


def build_session(cfg, *, output_dir: Path, sink, scans: list[FolderScan] | None = None,
                  specs: list[DatasetSpec] | None = None, validation_scan: FolderScan | None = None,
                  prompts: list | None = None) -> Session:
    """Set up one training in kohya's order (the module docstring); the frozen encoders fill the cache before LoRA.

    `specs` / `scans` / `validation_scan` / `prompts`: the caller's datasets, training scans (reg images balanced),
    validation scan and sample PromptSpecs (None: read here). Raises UserError (no image left, no disk space, a bad
    prompt) and ConfigError (a refused dataset, the optimizer refuses its arguments).
    """
    device = pick_device(cfg.train.device)
    policy = precision.precision_policy(cfg.precision.name, device.type)
    output_dir.mkdir(parents=True, exist_ok=True)
    specs = specs if specs is not None else training_specs(cfg)
    parts = load_parts(cfg, policy, specs)  # in storage dtypes (placement.py)
    data = prepare_data(cfg, parts, device, sink, scans, validation_scan, specs)
    log_data(cfg, data, sink, output_dir)
    lora = attach_lora(cfg, parts, policy, device, specs)
    groups = lora_param_groups(cfg, parts)
    params = [p for g in groups for p in g["params"]]
    t = cfg.train
    batch_sizes = [spec.batch_size for spec in specs] or [t.batch_size]
    batches = batches_per_epoch(data.buckets, batch_sizes, data.datasets)
    epochs = num_epochs(t.max_steps, batches, t.grad_accum)
    check_disk_space(cfg, output_dir, lora_numel=sum(p.numel() for p in params), epochs=epochs)
    optimizer, lr_scheduler = make_optimizer(cfg, groups)
    switches.cast_lora(params, switches.full_precision_dtype(cfg, policy), optimizer)  # after it, as v0.8.7
    switches.apply_unet_switches(cfg, parts.unet)
    sink.metrics({"mem/base_weights_bytes": precision.base_weight_bytes(parts.unet)}, 0)
    return Session(
        cfg=cfg, device=device, output_dir=output_dir, sink=sink, parts=parts, policy=policy, prepared=data.prepared,
        batch_items=data.items, batch_buckets=data.buckets, params=params, optimizer=optimizer,
        lr_scheduler=lr_scheduler, scaler=precision.make_grad_scaler(policy, device.type, cfg.precision.full_fp16),
        alphas_cumprod=switches.training_alphas_cumprod(cfg, parts.noise_scheduler).to(device),
        snr_alphas_cumprod=parts.noise_scheduler.alphas_cumprod.to(device),
        vae_scale=float(parts.vae.config.scaling_factor),
        noise_options=noise_options(cfg), loss_options=loss_options(cfg), lora=lora,
        hooks=evaluation_hooks(cfg, data, prompts), facts=metadata.TrainingFacts(batches, epochs),
    )


@dataclass
class Data:
    """A training's examples: `prepared` (its histogram counts training entries), the training `scans`,
    `train_indices` (not held out; reg images included), `items` (example index per dataset entry, repeats
    expanded), `validation` examples, `fit_candidates` (train_indices without reg images).
    """

    prepared: Prepared
    scans: list[FolderScan]
    train_indices: list[int]
    items: list[int]
    validation: list[Example]
    fit_candidates: list[int] = field(default_factory=list)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The bucket of each dataset entry."""
        return [self.prepared.examples[i].bucket for i in self.items]

    @property
    def datasets(self) -> list[int]:
        """The dataset of each dataset entry."""
        return [self.prepared.examples[i].item.dataset for i in self.items]


def training_specs(cfg) -> list[DatasetSpec]:
    """`subsets.dataset_specs` of `cfg` with its training folder (data.dir, or the bundled photos written first);
    raises ConfigError for a refused dataset."""
    d = cfg.data
    return dataset_specs(cfg, None if d.datasets or d.dataset_config else data_folder(cfg))


def text_in_step_reason(cfg, specs: list[DatasetSpec] | None = None) -> str | None:
    """The setting that makes captions encode at every step (text-encoder LoRA, or `subsets.per_step_captions`), or
    None when every caption's embedding can be cached. `specs`: None reads them."""
    if cfg.network.train_text_encoder:
        return "network.train_text_encoder=true"
    return per_step_captions(cfg, specs)


def encodes_text_in_step(cfg, specs: list[DatasetSpec] | None = None) -> bool:
    """Some captions are encoded at every step (`text_in_step_reason`), as kohya does: the text encoders sit on the
    device in the training precision."""
    return text_in_step_reason(cfg, specs) is not None


def read_scans(specs: list[DatasetSpec]) -> list[FolderScan]:
    """The training scans of `specs` (`dataset.inspect_datasets`); UserError with every problem they find."""
    scans = inspect_datasets(specs)
    problems = [p for scan in scans for p in scan.problems]
    if problems:
        raise UserError("\n".join(problems))
    return scans


def prepare_data(cfg, parts: model_lib.SDXLParts, device: torch.device, sink, scans: list[FolderScan] | None,
                 validation_scan: FolderScan | None, specs: list[DatasetSpec]) -> Data:
    """The training scans' examples encoded with the frozen encoders on `device` via the cache (fixed captions'
    embeddings too, unless the text encoders train), the held-out split (never a reg image), and
    data.validation_dir's examples.

    The split uses validation.seed, not train.seed, so replicates are measured on the same images.
    """
    in_step = text_in_step_reason(cfg, specs)
    cache_text = not cfg.network.train_text_encoder
    if in_step:
        log.info("text-encoder outputs are not cached for %s (%s): those captions are encoded at every step, as "
                 "kohya does", "any caption" if not cache_text else "captions that change per step", in_step)
    scans = scans if scans is not None else read_scans(specs)
    # the text encoders fill the cache only where a caption is fixed (as before for shuffled captions: not at all)
    cache_text = cache_text and any(fixed_caption(item.caption, item.subset) is not None
                                    for scan in scans for item in scan.items)
    started = time.perf_counter()
    with frozen_encoders_on(parts, device, text=cache_text):
        prepared = prepare_datasets(parts, scans, specs, cfg.data, device=device, cache_text=cache_text)
        _warn_unreadable(sink, "data.dir", prepared.unreadable)
        too_long = truncated_captions(parts.tokenizer, [e.item for e in prepared.examples], cfg.data.max_token_length)
        if too_long is not None:
            sink.warn(too_long)
        log.info("data ready in %.1f s (cache: %s)", time.perf_counter() - started,
                 ", ".join(f"{k.removeprefix('cache/')} {v}" for k, v in prepared.cache_stats.items()))
    examples = prepared.examples
    train_indices, fit_candidates, held_out = split_training([is_reg(e.item.subset) for e in examples],
                                                             cfg.data.validation_split, cfg.validation.seed)
    validation = [examples[i] for i in held_out]
    if cfg.data.validation_dir:
        if validation_scan is None:
            validation_scan = scan_folder(Path(cfg.data.validation_dir), cfg.data.caption_extension)
        val_prepared = prepare_examples(parts, validation_scan, cfg.data, device=device, encode_text=not in_step)
        _warn_unreadable(sink, "data.validation_dir", val_prepared.unreadable)
        validation += val_prepared.examples
    items = [i for i in train_indices for _ in range(examples[i].item.repeats)]
    prepared.histogram = bucket_histogram([examples[i].bucket for i in items])  # training entries only
    prepared.trained = [(examples[i].item, examples[i].bucket) for i in train_indices]
    prepared.trained += [(item, None) for item in prepared.items if item.repeats == 0]  # reg images never reached
    return Data(prepared, list(scans), train_indices, items, validation, fit_candidates)


def is_reg(subset: Subset | None) -> bool:
    """Whether an item of `subset` is a regularization image."""
    return subset is not None and subset.is_reg


@contextlib.contextmanager
def frozen_encoders_on(parts: model_lib.SDXLParts, device: torch.device, *, text: bool) -> Iterator[None]:
    """The VAE, and with `text` the text encoders (in fp32: the text cache is shared by every precision), on
    `device` while the cache is filled; back on the CPU afterwards.
    """
    encoders = (parts.text_encoder, parts.text_encoder_2) if text else ()
    for encoder in encoders:
        placement.compute_in_fp32(encoder)
        encoder.to(device)
    parts.vae.to(device)
    try:
        yield
    finally:
        parts.vae.to("cpu")
        for encoder in encoders:
            encoder.to("cpu")


def _warn_unreadable(sink, setting: str, paths: list[str]) -> None:
    """Report images whose pixels failed to decode as a Fallback, like the scan's other skips."""
    if paths:
        sink.warn(Fallback(setting, "images whose pixels failed to decode (truncated or corrupt after a valid header): "
                           "skipped (counted in data.skipped_images)", tuple(paths), "Re-save them as PNG or JPEG."))


def log_data(cfg, data: Data, sink, output_dir: Path) -> None:
    """What the data step found, on the run: counts as params (data.train_images and data.reg_images as kohya's
    ss_num_train_images / ss_num_reg_images: images x repeats, reg before balancing; data.reg_entries after it),
    cache hits and misses, the bucket histogram and the resolved datasets (`data/datasets.json`)."""
    items = [item for scan in data.scans for item in scan.items]
    sink.params({
        "data.images": len(items), "data.skipped_images": sum(len(scan.skipped) for scan in data.scans),
        "data.entries_with_repeats": len(data.items), "data.validation_images": len(data.validation),
        "data.train_images": sum(item.repeats for item in items if not is_reg(item.subset)),
        "data.reg_images": raw_reg_entries(items),
        "data.reg_entries": sum(item.repeats for item in items if is_reg(item.subset)),
        "train.total_batch_size": cfg.train.batch_size * cfg.train.grad_accum,
    })
    if cfg.data.datasets or cfg.data.dataset_config:  # the data.* params are only the fallbacks then
        sink.params(resolved_dataset_params(data.prepared.specs))
    sink.metrics(data.prepared.cache_stats, 0)
    histogram = json.dumps(data.prepared.histogram, indent=1)
    sink.artifact(write_text(output_dir / "buckets.json", histogram), "data")
    datasets = json.dumps(datasets_record(data.prepared.specs, items), indent=1)
    sink.artifact(write_text(output_dir / "datasets.json", datasets), "data")


def attach_lora(cfg, parts: model_lib.SDXLParts, policy: precision.PrecisionPolicy,
                device: torch.device, specs: list[DatasetSpec] | None = None) -> dict[str, torch.nn.Parameter]:
    """Add LoRA (fp32, as kohya; started from network.network_weights if set), store base weights in the training
    precision on the CPU, then move to the device.

    The text encoders the step runs move too, stored like the U-Net (kohya's te_weight_dtype). Returns the trained
    tensors by name, for states.
    """
    net, unet = cfg.network, parts.unet
    encoders = (parts.text_encoder, parts.text_encoder_2)
    unet.train()
    add_network(net, unet, encoders, fp32=placement.adapters_in_fp32)
    trained = [*(() if net.network_train_text_encoder_only else (unet,)), *(encoders if net.train_text_encoder else ())]
    install_dropouts(trained, Dropouts(*kohya_dropouts(cfg)))  # nothing when all three are off
    precision.apply_base_precision(unet, policy)
    unet.to(device)
    in_step = encodes_text_in_step(cfg, specs)
    for encoder in encoders if in_step else ():
        precision.apply_base_precision(encoder, policy)
        encoder.to(device)
    log.info("weights on %s: unet %s%s", device, placement.describe(unet), "; text encoders " + " and ".join(
        placement.describe(e) for e in encoders) if in_step else "")
    if cfg.train.gradient_checkpointing:
        precision.enable_gradient_checkpointing(unet)
    lora = named_lora(unet, "unet")
    if net.train_text_encoder:
        lora |= named_lora(parts.text_encoder, "text_encoder") | named_lora(parts.text_encoder_2, "text_encoder_2")
    return lora


def lora_param_groups(cfg, parts: model_lib.SDXLParts) -> list[dict]:
    """The optimizer's groups in kohya's order [text encoders, U-Net], each in v0.8.7's parameter order (the norm
    clip_grad_norm_ clips with sums in it); train.text_encoder_lr null means train.lr."""
    te_only = cfg.network.network_train_text_encoder_only  # the U-Net has no LoRA then
    groups = [] if te_only else [{"name": "unet", "params": kohya_lora_parameters(parts.unet, "lora_unet"),
                                  "lr": cfg.train.lr}]
    if cfg.network.train_text_encoder:
        te_params = [p for prefix, model in (("lora_te1", parts.text_encoder), ("lora_te2", parts.text_encoder_2))
                     for p in kohya_lora_parameters(model, prefix)]
        te_lr = cfg.train.text_encoder_lr if cfg.train.text_encoder_lr is not None else cfg.train.lr
        groups.insert(0, {"name": "text_encoder", "params": te_params, "lr": te_lr})
    return [group for group in groups if group["params"]]  # v0.8.7 adds no group for a part without modules


def make_optimizer(cfg, groups: list[dict]) -> tuple[torch.optim.Optimizer, Any]:
    """The `optimizer` group's optimizer over `groups` and its LR schedule over train.max_steps updates."""
    o = cfg.optimizer
    optimizer = optim.build_optimizer(o.name, groups, lr=cfg.train.lr, args=dict(o.args),
                                      optimizer_args=list(o.optimizer_args))
    optim.kohya_advice(optimizer, scheduler=o.scheduler, max_grad_norm=cfg.train.max_grad_norm)
    lr_scheduler = schedules.build_lr_scheduler(
        optimizer, o.scheduler, warmup_steps=o.warmup_steps, total_steps=cfg.train.max_steps,
        num_cycles=o.lr_scheduler_num_cycles, power=o.lr_scheduler_power, scheduler_args=dict(o.lr_scheduler_args))
    return optimizer, lr_scheduler


def evaluation_hooks(cfg, data: Data, prompts: list | None = None) -> list:
    """Hooks for step 0 and after optimizer steps: val/loss (held out), fit/loss (validation.fit_images training
    examples, chosen with validation.seed), samples of `prompts` if any.
    """
    v = cfg.validation
    fit = [copy.copy(data.prepared.examples[i]) for i in fit_subset(data.fit_candidates, v.fit_images, v.seed)]
    draw_latents(fit, cfg.data.latent_sample, device="cpu", stream=False)  # train.seed's draws would move the points
    hooks = [Validator(data.validation, list(v.timesteps), v.seed),
             Validator(fit, list(v.timesteps), v.seed, prefix="fit")]
    if prompts is None:
        prompts, problems, _ = read_prompts(cfg)
        if problems:
            raise UserError("\n".join(problems))
    return hooks + ([Sampler(prompts, training_images(data))] if prompts else [])


def noise_options(cfg) -> NoiseOptions:
    """The `noise` group (and v0.8.7's one timestep per batch for huber / smooth_l1) as the noise step takes it."""
    n = cfg.noise
    return NoiseOptions(
        offset=n.offset, offset_random_strength=n.offset_random_strength, adaptive_scale=n.adaptive_scale,
        multires_iterations=n.multires_iterations, multires_discount=n.multires_discount, ip_gamma=n.ip_gamma,
        ip_gamma_random_strength=n.ip_gamma_random_strength,
        one_timestep_per_batch=one_timestep_per_batch(cfg.loss.type, cfg.loss.per_sample_timesteps),
        min_timestep=n.min_timestep, max_timestep=n.max_timestep)


def loss_options(cfg) -> LossOptions:
    """The `loss` group and model.v_prediction as the loss takes them."""
    lo = cfg.loss
    return LossOptions(loss_type=lo.type, huber_schedule=lo.huber_schedule, huber_c=lo.huber_c,
                       min_snr_gamma=lo.min_snr_gamma, debiased=lo.debiased, v_prediction=cfg.model.v_prediction,
                       scale_v_pred_loss_like_noise_pred=lo.scale_v_pred_loss_like_noise_pred,
                       v_pred_like_loss=lo.v_pred_like_loss)


def named_lora(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Parameter]:
    return {f"{prefix}.{n}": p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad}


def batches_per_epoch(buckets: list[tuple[int, int]], batch_size: int | list[int],
                      datasets: list[int] | None = None) -> int:
    """kohya's len(dataloader): every bucket of every dataset is cut into ceil(n / its batch_size) batches.
    `batch_size`: one, or one per dataset; `datasets`: each entry's dataset (None: all in dataset 0)."""
    sizes = [batch_size] if isinstance(batch_size, int) else batch_size
    datasets = datasets if datasets is not None else [0] * len(buckets)
    counts = Counter((d, *b) for d, b in zip(datasets, buckets, strict=True))
    return sum(math.ceil(n / sizes[key[0]]) for key, n in counts.items())


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

