"""The training loop: one SDXL LoRA, kohya sd-scripts v0.8.7 semantics, no Hydra and no MLflow inside.

Per micro-batch (kohya `train_network.py`):
    x0 = latents.to(weight_dtype) * vae_scale
    context, pooled = text(captions)        # under autocast
    eps, x_t, t = noise(x0)                 # outside autocast: offset -> pyramid -> timesteps -> input perturbation
    pred = unet(x_t.to(weight_dtype), t, text context, pooled + size conditioning)   # under autocast
    loss = mean_b( weights(t) * mean_chw( element_loss(pred, eps) ) ) / grad_accum
    backward; every grad_accum micro-batches (and at an epoch's end): clip, step, schedule, zero
`train.max_steps` counts optimizer updates. Everything the caller wants to see goes through `sink`.

Checkpoints (docs/kohya-reference.md §6):
every `train.save_every` steps a LoRA `<name>-step00000500.safetensors` and a training
state; at the end of epoch e (1-based) when e % `train.save_every_epochs` == 0 and e is not the last epoch, a LoRA
`<name>-00000e.safetensors` and a state; a state at the end and on a clean stop. A state (checkpoint.py) restores
the loop exactly, so a resumed training computes the same numbers as one that never stopped.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lora_sweep.data.buckets import bucket_batches, format_histogram
from lora_sweep.data.dataset import FolderScan
from lora_sweep.errors import UserError
from lora_sweep.training import checkpoint, optim, precision
from lora_sweep.training import loss as loss_lib
from lora_sweep.training import noise as noise_lib
from lora_sweep.training.checkpoint import Position
from lora_sweep.training.failures import inject_fault, parse_fault
from lora_sweep.training.session import Session, batches_per_epoch, build_session, num_epochs

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
class StateTarget:
    """Where this training writes its states, what it resumes from, and what they belong to."""

    folder: Path
    run_id: str
    config_hash: str
    resume_from: Path | None = None


@dataclass
class TrainResult:
    final_loss: float | None  # the mean loss of the last logging window; None when no step was taken
    steps: int
    stopped_early: bool
    files: dict[str, Path] = field(default_factory=dict)
    last_state: Path | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batch_loss(s: Session, batch: list[int], flip_rng: random.Random) -> loss_lib.LossTerms:
    """Forward one micro-batch and return kohya's weighted loss terms."""
    cfg, device = s.cfg, s.device
    examples = [s.prepared.examples[i] for i in batch]
    flips = [bool(e.latents_flipped is not None and flip_rng.random() < 0.5) for e in examples]
    pairs = list(zip(examples, flips, strict=True))
    latents = torch.stack([e.latents_flipped if f else e.latents for e, f in pairs]).to(device)
    time_ids = torch.stack([e.time_ids_flipped if f else e.time_ids for e, f in pairs]).to(device)
    # kohya: cast the cached latents to weight_dtype, then scale; latents and so the noise are in weight_dtype.
    latents = noise_lib.scale_cached_latents(latents, s.vae_scale, s.policy.latent_dtype)

    with precision.autocast(s.policy, device.type):
        context, pooled = s.text_for(examples)
    # kohya draws the noise and builds x_t outside autocast (CUDA autocast would compute x_t in fp32).
    n = noise_lib.kohya_noisy_latents(
        latents, s.alphas_cumprod,
        offset=cfg.noise.offset, offset_random_strength=cfg.noise.offset_random_strength,
        adaptive_scale=cfg.noise.adaptive_scale, multires_iterations=cfg.noise.multires_iterations,
        multires_discount=cfg.noise.multires_discount, ip_gamma=cfg.noise.ip_gamma,
        ip_gamma_random_strength=cfg.noise.ip_gamma_random_strength,
        one_timestep_per_batch=s.one_timestep_per_batch,
        min_timestep=cfg.noise.min_timestep, max_timestep=cfg.noise.max_timestep,
    )
    with precision.autocast(s.policy, device.type):
        pred = s.unet(
            n.noisy_latents.to(s.policy.latent_dtype), n.timesteps, context,  # kohya sdxl call_unet: .to(weight_dtype)
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


def train(cfg, *, output_dir: Path, sink: Sink, should_stop: Callable[[], bool] = lambda: False,
          states: StateTarget | None = None, scan: FolderScan | None = None,
          validation_scan: FolderScan | None = None) -> TrainResult:
    """Train one LoRA as `cfg` says (continuing `states.resume_from` if set) and save it under `output_dir`.
    `scan`, `validation_scan`: the caller's scans of data.dir (or the bundled photos) and data.validation_dir;
    None: the session scans them itself."""
    seed_everything(cfg.train.seed)
    s = build_session(cfg, output_dir=output_dir, sink=sink, scan=scan, validation_scan=validation_scan)
    log.info("buckets (resolution -> images x repeats):\n%s", format_histogram(s.prepared.histogram))
    max_steps, accum = cfg.train.max_steps, cfg.train.grad_accum
    epochs = num_epochs(max_steps, batches_per_epoch(s.batch_buckets, cfg.train.batch_size), accum)
    flip_rng = random.Random(cfg.train.seed)
    s.should_stop = should_stop
    pos, last_state = Position(), None
    if states is not None and states.resume_from is not None:
        pos, last_state = resume(s, states.resume_from, flip_rng), states.resume_from
        # a state at max_steps whose end-of-run evaluation was cut short by a stop request: do it now
        stopped = pos.step >= max_steps and not s.after_step(pos.step, final=True)
    else:
        stopped = not s.after_step(0) or should_stop()  # a stop during step 0's evaluation: nothing to save
    fault = parse_fault(cfg.train.debug_fault)
    window: list[loss_lib.LossTerms] = []
    pending, skipped_in_a_row = 0, 0
    started, start_step, start_images = time.perf_counter(), pos.step, pos.images_seen
    s.sink.progress(pos.step, max_steps, pos.last_loss, "")
    while pos.step < max_steps and not stopped:
        epoch = pos.epoch
        batches = bucket_batches(s.batch_buckets, cfg.train.batch_size, cfg.train.seed, epoch)
        for i in range(pos.batch_index, len(batches)):
            last_of_epoch = i == len(batches) - 1
            terms = micro_batch_loss(s, [s.batch_items[j] for j in batches[i]], flip_rng)
            terms = inject_fault(fault, pos.step + 1, terms, s, when="loss")
            pending, pos.images_seen = pending + 1, pos.images_seen + len(batches[i])
            if torch.isfinite(terms.loss):
                s.scaler.scale(terms.loss / accum).backward()
                window.append(terms)
            else:
                on_non_finite(cfg, f"train/loss is {terms.loss.item()}", pos.step + 1, epoch, last_state)
            if pending < accum and not last_of_epoch:
                continue
            pending = 0
            inject_fault(fault, pos.step + 1, terms, s, when="grad")
            norm = None if s.scaler.is_enabled() or not window else precision.grad_total_norm(s.params)
            finite = bool(window) and grads_finite(s, pos.step + 1, epoch, last_state, norm)
            stepped = finite and precision.scaled_step(s.scaler, s.optimizer, s.params, cfg.train.max_grad_norm, norm)
            if stepped:
                s.lr_scheduler.step()
            else:
                pos.skipped_steps += 1
            skipped_in_a_row = 0 if finite else skipped_in_a_row + 1  # fp16's own overflow skips do not count
            check_skip_bound(cfg, skipped_in_a_row, pos.step + 1, last_state)
            s.optimizer.zero_grad(set_to_none=True)
            pos.step += 1
            pos.epoch, pos.batch_index = (epoch + 1, 0) if last_of_epoch else (epoch, i + 1)
            pos.last_loss = float(torch.stack([t.loss.detach() for t in window]).mean()) if window else float("nan")
            elapsed = time.perf_counter() - started
            s.sink.metrics(step_metrics(s, window, pos, epoch, (pos.images_seen - start_images) / elapsed), pos.step)
            s.sink.progress(pos.step, max_steps, pos.last_loss, f"{(pos.step - start_step) / elapsed:.2f} it/s")
            window = []
            # A stop request ends the loop after this step, with a state, and without the evaluation that is due
            # (sampling and fit/val losses belong to a run that reached max_steps); a request that arrives during
            # that evaluation cuts it short (`Session.after_step` returns False) and stops here too.
            stopped = pos.step < max_steps and should_stop()
            if not stopped:
                stopped = not s.after_step(pos.step, final=pos.step >= max_steps)
            final = pos.step >= max_steps or stopped
            if (save_checkpoints(s, pos.step, epoch, last_of_epoch, epochs) or final) and states is not None:
                last_state = write_state(s, states, pos, flip_rng)
            if final:
                break
    if stopped and pos.step == 0:  # stopped before the first step: no LoRA worth a file
        return TrainResult(final_loss=None, steps=0, stopped_early=True, last_state=last_state)
    files = s.save_lora(final_loss=pos.last_loss, steps=pos.step, epoch=max(1, pos.epoch + (pos.batch_index > 0)))
    return TrainResult(final_loss=pos.last_loss, steps=pos.step, stopped_early=stopped, files=files,
                       last_state=last_state)


def save_checkpoints(s: Session, step: int, epoch: int, last_of_epoch: bool, epochs: int) -> bool:
    """kohya's LoRA files when due: `-step00000500` every train.save_every steps; `-000005` after epoch 5 when
    5 % train.save_every_epochs == 0 and it is not the last epoch. True if one was written (a state goes with it)."""
    t, done = s.cfg.train, epoch + 1
    by_step = bool(t.save_every) and step % t.save_every == 0
    by_epoch = last_of_epoch and bool(t.save_every_epochs) and done % t.save_every_epochs == 0 and done < epochs
    if by_step:
        s.save_checkpoint(f"{t.output_name}-step{step:08d}.safetensors", steps=step, epoch=done)
    if by_epoch:
        s.save_checkpoint(f"{t.output_name}-{done:06d}.safetensors", steps=step, epoch=done)
    return by_step or by_epoch


def resume(s: Session, path: Path, flip_rng: random.Random) -> Position:
    """Load a state into the freshly built session (after every set-up draw from the RNGs) and return where to go on."""
    pos = checkpoint.restore(checkpoint.load_state(path), lora=s.lora, optimizer=s.optimizer,
                             lr_scheduler=s.lr_scheduler, scaler=s.scaler, flip_rng=flip_rng)
    if pos.step > s.cfg.train.max_steps:
        raise UserError(f"train.resume: the state '{path}' is at step {pos.step}, beyond train.max_steps="
                        f"{s.cfg.train.max_steps}.")
    log.info("resumed from %s: step %d, epoch %d, batch %d", path, pos.step, pos.epoch + 1, pos.batch_index)
    return pos


def write_state(s: Session, states: StateTarget, pos: Position, flip_rng: random.Random) -> Path:
    """Metrics up to this step reach MLflow before the state exists, so a resumed run never misses a step."""
    flush = getattr(s.sink, "flush", None)
    if flush is not None:
        flush()
    return checkpoint.save_state(
        states.folder, lora=s.lora, optimizer=s.optimizer, lr_scheduler=s.lr_scheduler, scaler=s.scaler,
        position=pos, rng=checkpoint.capture_rng(flip_rng), config_hash=states.config_hash, run_id=states.run_id,
        keep=s.cfg.train.keep_states)


def on_non_finite(cfg, what: str, step: int, epoch: int, last_state: Path | None) -> None:
    """train.on_nan=stop: fail naming the step and tensor; skip_step: warn and leave this micro-batch out."""
    where = f"{what} at optimizer step {step} (epoch {epoch + 1})"
    if cfg.train.on_nan == "stop":
        kept = f"the last good state is kept: {last_state}" if last_state else "no state had been saved yet"
        raise NonFiniteLoss(f"{where}; {kept}. Lower train.lr, check the data, or set train.on_nan=skip_step.")
    log.warning("%s: skipped (train.on_nan=skip_step)", where)


def check_skip_bound(cfg, skipped_in_a_row: int, step: int, last_state: Path | None) -> None:
    """train.on_nan=skip_step fails the run once `train.max_consecutive_skips` optimizer steps in a row were skipped
    for a non-finite loss or gradient: a diverged training would otherwise skip to the end and finish."""
    limit = cfg.train.max_consecutive_skips
    if skipped_in_a_row < limit:
        return
    kept = f"the last good state is kept: {last_state}" if last_state else "no state had been saved yet"
    raise NonFiniteLoss(
        f"train.on_nan=skip_step skipped {skipped_in_a_row} optimizer steps in a row (steps "
        f"{step - skipped_in_a_row + 1}-{step}; train.max_consecutive_skips={limit}): the loss or the gradients stay "
        f"NaN/Inf, so the training has diverged; {kept}. Lower train.lr or check the data (or raise "
        "train.max_consecutive_skips).")


def grads_finite(s: Session, step: int, epoch: int, last_state: Path | None,
                 total_norm: torch.Tensor | None = None) -> bool:
    """Check the LoRA gradients before the update (fp16's loss scaler handles its own overflows).

    One host sync on the total gradient norm (`total_norm`, `precision.grad_total_norm(s.params)`, computed here if
    not given; the loop passes the one it clips with), which is non-finite exactly when a gradient is or when the
    sum of squares overflows. Only then are the tensors scanned one by one, to name the first non-finite gradient;
    if none is (finite gradients whose norm overflows), the step goes on as before: clipping scales it to zero.
    """
    if s.scaler.is_enabled():
        return True
    if total_norm is None:
        total_norm = precision.grad_total_norm(s.params)
    if total_norm is None or bool(torch.isfinite(total_norm)):
        return True
    bad = next((n for n, p in s.lora.items() if p.grad is not None and not torch.isfinite(p.grad).all()), None)
    if bad is None:
        return True
    on_non_finite(s.cfg, f"the gradient of {bad} is not finite", step, epoch, last_state)
    return False


def step_metrics(s: Session, window, pos: Position, epoch: int, images_per_s: float) -> dict:
    """What one optimizer step logs: loss, lr (and d*lr), the loss weighting in use, epoch, images and speed."""
    metrics = {
        "train/loss": pos.last_loss,
        **optim.lr_metrics(s.optimizer),
        "train/epoch": epoch + 1,  # 1-based, as kohya counts epochs and names `-000001` after the first
        "train/images_seen": pos.images_seen,
        "train/images_per_s": images_per_s,
    }
    if window:
        metrics["train/loss_weight"] = float(torch.cat([t.weight.detach().float() for t in window]).mean())
    peak = precision.peak_gpu_memory_bytes()
    if peak is not None:
        metrics["mem/peak_gpu_bytes"] = peak
    if s.cfg.loss.type != "l2" and window:
        metrics["train/huber_c"] = float(torch.cat([t.huber_c.detach().float() for t in window]).mean())
    if s.policy.needs_grad_scaler or s.cfg.train.on_nan == "skip_step":
        metrics["train/skipped_steps"] = pos.skipped_steps
    if s.policy.needs_grad_scaler:
        metrics["train/loss_scale"] = float(s.scaler.get_scale())
    return metrics
