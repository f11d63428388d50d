"""The training loop: one SDXL LoRA, kohya sd-scripts v0.8.7 semantics, no Hydra and no MLflow inside.

Per micro-batch (kohya `train_network.py`):
    x0 = latents * vae_scale
    eps, x_t, t = noise(x0)                 # offset -> pyramid -> timesteps -> input perturbation
    pred = unet(x_t, t, text context, pooled + size conditioning)
    loss = mean_b( weights(t) * mean_chw( element_loss(pred, eps) ) ) / grad_accum
    backward; every grad_accum micro-batches (and at an epoch's end): clip, step, schedule, zero
`train.max_steps` counts optimizer updates. Everything the caller wants to see goes through `sink`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from lora_sweep import loss as loss_lib, noise as noise_lib, optim, precision
from lora_sweep.buckets import bucket_batches, format_histogram
from lora_sweep.session import Session, build_session

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where a training reports to (run.py implements it with MLflow and the queue's status file)."""

    def params(self, values: dict) -> None: ...
    def metrics(self, values: dict, step: int) -> None: ...
    def artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def progress(self, step: int, max_steps: int, loss: float, speed: str) -> None: ...


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients went NaN/Inf (train.on_nan=stop)."""


@dataclass
class TrainResult:
    final_loss: float
    steps: int
    stopped_early: bool
    files: dict[str, Path] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batch_loss(s: Session, batch: list[int], flip_rng: random.Random) -> loss_lib.LossTerms:
    """Forward one micro-batch and return kohya's weighted loss terms."""
    cfg, device = s.cfg, s.device
    examples = [s.prepared.examples[i] for i in batch]
    flips = [bool(e.latents_flipped is not None and flip_rng.random() < 0.5) for e in examples]
    latents = torch.stack([e.latents_flipped if f else e.latents for e, f in zip(examples, flips)]).to(device)
    time_ids = torch.stack([e.time_ids_flipped if f else e.time_ids for e, f in zip(examples, flips)]).to(device)
    latents = (latents * s.vae_scale).to(s.policy.latent_dtype)  # kohya: latents (and so noise) in weight_dtype

    with precision.autocast(s.policy, device.type):
        context, pooled = s.text_for(examples)
        n = noise_lib.kohya_noisy_latents(
            latents, s.alphas_cumprod,
            offset=cfg.noise.offset, offset_random_strength=cfg.noise.offset_random_strength,
            adaptive_scale=cfg.noise.adaptive_scale, multires_iterations=cfg.noise.multires_iterations,
            multires_discount=cfg.noise.multires_discount, ip_gamma=cfg.noise.ip_gamma,
            ip_gamma_random_strength=cfg.noise.ip_gamma_random_strength,
            one_timestep_per_batch=s.one_timestep_per_batch,
        )
        pred = s.unet(
            n.noisy_latents, n.timesteps, context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)},
        ).sample
    target = n.noise
    if cfg.model.v_prediction:
        target = s.noise_scheduler.get_velocity(latents, n.noise, n.timesteps)
    return loss_lib.kohya_loss(
        pred.float(), target.float(), n.timesteps, s.alphas_cumprod,
        loss_type=cfg.loss.type, huber_schedule=cfg.loss.huber_schedule, huber_c=cfg.loss.huber_c,
        min_snr_gamma=cfg.loss.min_snr_gamma, debiased=cfg.loss.debiased, v_prediction=cfg.model.v_prediction,
    )


def train(cfg, *, output_dir: Path, sink: Sink, should_stop: Callable[[], bool] = lambda: False) -> TrainResult:
    """Train one LoRA as `cfg` says and save it in kohya and diffusers formats under `output_dir`."""
    seed_everything(cfg.train.seed)
    s = build_session(cfg, output_dir=output_dir, sink=sink)
    log.info("buckets (resolution -> images x repeats):\n%s", format_histogram(s.prepared.histogram))

    max_steps, accum = cfg.train.max_steps, cfg.train.grad_accum
    step, epoch, skipped, final_loss, stopped = 0, 0, 0, float("nan"), False
    window: list[loss_lib.LossTerms] = []
    flip_rng = random.Random(cfg.train.seed)
    started, images = time.perf_counter(), 0
    s.sink.progress(0, max_steps, float("nan"), "")
    s.after_step(0)
    while step < max_steps and not stopped:
        batches = bucket_batches(s.batch_buckets, cfg.train.batch_size, cfg.train.seed, epoch)
        micro = 0
        for i, batch in enumerate(batches):
            terms = micro_batch_loss(s, [s.batch_items[j] for j in batch], flip_rng)
            if not torch.isfinite(terms.loss):
                if cfg.train.on_nan == "stop":
                    raise NonFiniteLoss(f"loss is {terms.loss.item()} at optimizer step {step + 1} (epoch {epoch})")
                log.warning("non-finite loss at step %d: micro-batch skipped (train.on_nan=skip_step)", step + 1)
                continue
            s.scaler.scale(terms.loss / accum).backward()
            window.append(terms)
            images += len(batch)
            micro += 1
            if micro % accum != 0 and i != len(batches) - 1:
                continue
            stepped = precision.scaled_step(s.scaler, s.optimizer, s.params, cfg.train.max_grad_norm)
            if stepped:
                s.lr_scheduler.step()
            else:
                skipped += 1
            s.optimizer.zero_grad(set_to_none=True)
            step += 1
            final_loss = float(torch.stack([t.loss.detach() for t in window]).mean())
            elapsed = time.perf_counter() - started
            s.sink.metrics(step_metrics(s, window, final_loss, epoch, skipped, images / elapsed), step)
            s.sink.progress(step, max_steps, final_loss, f"{step / elapsed:.2f} it/s")
            window = []
            stopped = step < max_steps and should_stop()
            s.after_step(step, final=step >= max_steps or stopped)
            if step >= max_steps or stopped:
                break
        epoch += 1
    files = s.save_lora(final_loss=final_loss, steps=step, epoch=epoch)
    return TrainResult(final_loss=final_loss, steps=step, stopped_early=stopped, files=files)


def step_metrics(s: Session, window, loss: float, epoch: int, skipped: int, images_per_s: float) -> dict:
    """What one optimizer step logs: loss, lr (and d*lr), the loss weighting in use, epoch and speed."""
    metrics = {
        "train/loss": loss,
        **optim.lr_metrics(s.optimizer),
        "train/epoch": epoch,
        "train/loss_weight": float(torch.cat([t.weight.detach().float() for t in window]).mean()),
        "train/images_per_s": images_per_s,
    }
    peak = precision.peak_gpu_memory_bytes()
    if peak is not None:
        metrics["mem/peak_gpu_bytes"] = peak
    if s.cfg.loss.type != "l2":
        metrics["train/huber_c"] = float(torch.cat([t.huber_c.detach().float() for t in window]).mean())
    if s.policy.needs_grad_scaler:
        metrics["train/skipped_steps"] = skipped
        metrics["train/loss_scale"] = float(s.scaler.get_scale())
    return metrics

