"""The training loop: one SDXL LoRA, kohya sd-scripts v0.8.7 semantics, no Hydra and no MLflow inside.

Per micro-batch (`micro_batch_loss`; docs/kohya-reference.md §1-§3):
    x0 = latents.to(weight_dtype) * vae_scale
    context, pooled = text(captions)        # under autocast
    eps, x_t, t = noise(x0)                 # outside autocast: offset -> pyramid -> timesteps -> input perturbation
    pred = unet(x_t.to(weight_dtype), t, text context, pooled + size conditioning)   # under autocast
    loss = mean_b( weights(t) * mean_chw( element_loss(pred, eps or v) ) )
then (`train`, §4, §6) backward of loss / grad_accum; every grad_accum micro-batches and at an epoch's end:
unscale (fp16), clip, step, LR schedule, zero; log; hooks; checkpoints. `train.max_steps` counts optimizer updates.
Collaborators: `NonFiniteGuard` (train.on_nan), `checkpoint.Checkpoints`; `stop_here` is the stop rule.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from lora_sweep.data.buckets import format_histogram
from lora_sweep.data.captions import seen_position
from lora_sweep.data.dataset import FolderScan
from lora_sweep.data.subsets import DatasetSpec
from lora_sweep.errors import Fallback
from lora_sweep.model.regularization import max_norm_regularizer
from lora_sweep.training import length, optim, precision
from lora_sweep.training import loss as loss_lib
from lora_sweep.training import noise as noise_lib
from lora_sweep.training.checkpoint import Checkpoints, Position
from lora_sweep.training.evaluate import keep_step0_samples
from lora_sweep.training.session import Session, build_session, is_reg, read_scans, training_specs
from lora_sweep.training.stop_early import Decision, EarlyStop

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where a training reports to: job.status.JobSink (the MLflow run, the progress bar, the queue's status file)."""

    def params(self, values: dict[str, Any]) -> None: ...
    def metrics(self, values: dict[str, float], step: int) -> None: ...
    # the file is copied (or uploaded) when this returns: the caller may overwrite it
    def artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def image(self, image: Image, key: str, step: int) -> None: ...
    # loss: the mean loss of the last step (NaN before the first); speed: e.g. "1.52 it/s"
    def progress(self, step: int, max_steps: int, loss: float, speed: str) -> None: ...
    # a fallback found while training (an image that fails to decode), as the pre-flight's warnings
    def warn(self, fallback: Fallback) -> None: ...
    # every metric logged so far is handed to the store (before a state is written); a store that is down never waits
    def flush(self) -> None: ...


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients went NaN/Inf (train.on_nan=stop)."""


@dataclass
class StateTarget:
    """Where this training writes its states, what it resumes from, and what they belong to."""

    folder: Path
    run_id: str
    config_hash: str
    resume_from: Path | None = None
    dataset: str | None = None  # the content digest of the files trained on, recorded in each state


@dataclass
class TrainResult:
    """How a training ended: `files` the final LoRA ("kohya", "diffusers"; none when stopped before step 1)."""

    final_loss: float | None  # the mean loss of the last logging window; None when no step was taken
    steps: int
    interrupted: bool  # a stop request (a signal) ended it before max_steps
    stopped_early: Decision | None = None  # sweep.stop_early's rule ended it before max_steps
    files: dict[str, Path] = field(default_factory=dict)
    last_state: Path | None = None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (CPU and CUDA), as accelerate's set_seed does for kohya."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batch_loss(s: Session, batch: list[int], flip_rng: random.Random, step: int, *,
                     seen: tuple[int, int] = (0, 0)) -> loss_lib.LossTerms:
    """Forward one micro-batch (example indices `batch`, all of one dataset) and return kohya's weighted loss terms.

    `step` (the 1-based optimizer step) is unused here; wrappers of this function read it. `seen`: the (epoch, step)
    v0.8.7's dataset sees for this batch (`captions.seen_position`), for caption processing. Per image in batch
    order: the flip draw (`flip_rng`), then its caption's draws (Python's global `random`).
    """
    device = s.device
    examples = [s.prepared.examples[i] for i in batch]
    s.set_multiplier(examples[0].item.dataset)  # before the text encoders run, as kohya
    flips = [bool(e.latents_flipped is not None and flip_rng.random() < 0.5) for e in examples]
    pairs = list(zip(examples, flips, strict=True))
    latents = torch.stack([e.latents_flipped if f else e.latents for e, f in pairs]).to(device)
    time_ids = torch.stack([e.time_ids_flipped if f else e.time_ids for e, f in pairs]).to(device)
    # kohya: cast the cached latents to weight_dtype, then scale; latents and so the noise are in weight_dtype.
    latents = noise_lib.scale_cached_latents(latents, s.vae_scale, s.policy.latent_dtype)

    with precision.autocast(s.policy, device.type):
        context, pooled = s.text_for(examples, seen=seen)
    # kohya draws the noise and builds x_t outside autocast (CUDA autocast would compute x_t in fp32).
    n = noise_lib.kohya_noisy_latents(latents, s.alphas_cumprod, s.noise_options)
    pred = s.unet_forward(n.noisy_latents, n.timesteps, context, pooled, time_ids)
    target = noise_lib.prediction_target(latents, n.noise, n.timesteps, s.alphas_cumprod, s.v_prediction)
    weights = loss_lib.prior_loss_weights([is_reg(e.item.subset) for e in examples], s.cfg.loss.prior_loss_weight)
    return loss_lib.kohya_loss(pred.float(), target.float(), n.timesteps, s.alphas_cumprod, s.loss_options,
                               sample_weights=weights, snr_alphas_cumprod=s.snr_alphas_cumprod)


def train(cfg, *, output_dir: Path, sink: Sink, should_stop: Callable[[], bool] = lambda: False,
          states: StateTarget | None = None, scans: list[FolderScan] | None = None,
          specs: list[DatasetSpec] | None = None, validation_scan: FolderScan | None = None,
          prompts: list | None = None, stop_early: EarlyStop | None = None) -> TrainResult:
    """Train one LoRA as `cfg` says (continuing `states.resume_from` if set) and save it under `output_dir`.

    `specs` / `scans` / `validation_scan` / `prompts`: the caller's datasets, training scans (reg images balanced),
    validation scan and sample PromptSpecs (None: read here); images that fail to decode move to `skipped`.
    `stop_early`: sweep.stop_early's hook, judging after the evaluation; its decision stops the run as a request. Raises
    NonFiniteLoss (train.on_nan), UserError (a state beyond max_steps, no disk space, a bad prompt) and what the
    step raises.
    """
    t = cfg.train
    seed_everything(t.seed)
    if t.max_train_epochs is not None:  # the job resolved it already; a direct caller's config is resolved here
        specs = specs if specs is not None else training_specs(cfg)
        scans = scans if scans is not None else read_scans(specs)
        length.resolve_max_steps(cfg, specs, scans)
    s = build_session(cfg, output_dir=output_dir, sink=sink, scans=scans, specs=specs,
                      validation_scan=validation_scan, prompts=prompts)
    s.should_stop, flip_rng = should_stop, random.Random(t.seed)
    if stop_early is not None:
        stop_early.attach(s)
    log.info("buckets (resolution -> images x repeats):\n%s", format_histogram(s.prepared.histogram))
    saver = Checkpoints(s, states, flip_rng)
    keep_step0_samples(s, states)  # img/drift's reference lives with the states, so a resume reads it back
    pos = saver.resume()  # Position() unless a state is resumed
    guard = NonFiniteGuard(t.on_nan, t.max_consecutive_skips, kept=lambda: saver.last_state)
    # step 0's evaluation; a state at max_steps owes the end-of-run one (a stop request had cut it short)
    stopped = stop_here(s, pos.step) if pos.step in (0, t.max_steps) else False
    speed = Speed(pos.step, pos.images_seen)
    s.sink.progress(pos.step, t.max_steps, pos.last_loss, "")
    window: list[loss_lib.LossTerms] = []  # the finite micro-batch losses of the update under way
    trained_te = (s.parts.text_encoder, s.parts.text_encoder_2) if cfg.network.train_text_encoder else ()
    max_norm = max_norm_regularizer(cfg.network.scale_weight_norms, s.unet, trained_te)  # None when off
    while pos.step < t.max_steps and not stopped:
        epoch, first = pos.epoch, pos.batch_index
        batches = s.epoch_batches(epoch)
        if first == 0:  # a state saved mid-epoch restored the streams after these
            noise_lib.dataloader_epoch_draw()
            state = s.epoch_random_state(epoch)  # v0.8.7's reshuffle, reseeding Python's stream
            if state is not None:
                random.setstate(state)
        for i in range(first, len(batches)):
            seen = seen_position(epoch, i, len(batches), t.grad_accum)
            terms = micro_batch_loss(s, [s.batch_items[j] for j in batches[i]], flip_rng, pos.step + 1, seen=seen)
            pos.images_seen += len(batches[i])
            if guard.loss_is_finite(terms.loss, pos.step + 1, epoch):
                s.scaler.scale(terms.loss / t.grad_accum).backward()
                window.append(terms)
            last_of_epoch = i == len(batches) - 1
            if (i + 1 - first) % t.grad_accum and not last_of_epoch:
                if max_norm:
                    max_norm()  # v0.8.7 applies max-norm after every micro-batch, outside its accumulate block
                continue  # kohya updates every grad_accum micro-batches and at an epoch's end
            norm = precision.unscaled_grad_norm(s.scaler, s.optimizer, s.params) if window else None
            finite = bool(window) and guard.gradients_are_finite(s, norm, pos.step + 1, epoch)
            stepped = False
            if finite:
                precision.clip_grads(s.params, t.max_grad_norm, norm)
                scale = s.scaler.get_scale()
                s.scaler.step(s.optimizer)  # optimizer.step(), unless fp16's scaler finds inf/NaN gradients
                s.scaler.update()
                stepped = s.scaler.get_scale() >= scale  # the scale shrinks only when the step was skipped
            if stepped:
                s.lr_scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            norms = max_norm() if max_norm else None
            guard.count(finite, pos.step + 1)
            pos.step, pos.skipped_steps = pos.step + 1, pos.skipped_steps + (not stepped)
            pos.epoch, pos.batch_index = (epoch + 1, 0) if last_of_epoch else (epoch, i + 1)
            pos.last_loss = float(torch.stack([w.loss.detach() for w in window]).mean()) if window else float("nan")
            log_step(s, window, pos, epoch, speed)
            if norms is not None:
                s.sink.metrics(norms.metrics(), pos.step)
            window = []
            stopped = stop_here(s, pos.step)
            final = stopped or pos.step >= t.max_steps
            saver.after_step(pos, epoch, last_of_epoch, final)
            if final:
                break
    decision = stop_early.decision if stop_early is not None else None
    if stopped and pos.step == 0:  # stopped before the first step: no LoRA worth a file
        return TrainResult(final_loss=None, steps=0, interrupted=True, last_state=saver.last_state)
    # ss_epoch of the final file: v0.8.7's num_train_epochs; a run stopped early: the epochs it reached
    reached = s.epochs if pos.step >= t.max_steps else max(1, pos.epoch + (pos.batch_index > 0))
    files = s.save_lora(final_loss=pos.last_loss, steps=pos.step, epoch=reached)
    return TrainResult(pos.last_loss, pos.step, stopped and decision is None, decision, files, saver.last_state)


def stop_here(s: Session, step: int) -> bool:
    """The stop rule, at step 0 and after every optimizer step: True when a stop request ends the loop here.

    A request already made skips the evaluation due at `step`; one made during it cuts it short. At max_steps the
    evaluation always runs (a request can only cut it short).
    """
    final = step >= s.cfg.train.max_steps
    if not final and s.should_stop():
        return True
    return not s.after_step(step, final=final) or (not final and s.should_stop())


@dataclass
class Speed:
    """Where this process's loop started (a resumed run's speed counts only its own steps and images)."""

    step: int
    images: int
    started: float = field(default_factory=time.perf_counter)


def log_step(s: Session, window: list[loss_lib.LossTerms], pos: Position, epoch: int, speed: Speed) -> None:
    """An optimizer step's metrics (`step_metrics`) to the run, and its progress to the bar and the status file."""
    elapsed = time.perf_counter() - speed.started
    s.sink.metrics(step_metrics(s, window, pos, epoch, (pos.images_seen - speed.images) / elapsed), pos.step)
    s.sink.progress(pos.step, s.cfg.train.max_steps, pos.last_loss, f"{(pos.step - speed.step) / elapsed:.2f} it/s")


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


class NonFiniteGuard:
    """train.on_nan for a NaN/Inf loss or gradient.

    stop: raise NonFiniteLoss naming the step, the tensor and the last state (`kept()`). skip_step: warn and skip,
    but fail after `max_consecutive_skips` skipped updates in a row (a diverged run would otherwise "finish").
    fp16's loss scaler handles its own overflows: those skips do not count.
    """

    def __init__(self, on_nan: str, max_consecutive_skips: int, kept: Callable[[], Path | None]):
        self.on_nan, self.limit, self.kept = on_nan, max_consecutive_skips, kept
        self.in_a_row = 0

    def loss_is_finite(self, loss: torch.Tensor, step: int, epoch: int) -> bool:
        """True if the micro-batch loss of optimizer step `step` (epoch 0-based) may be backpropagated."""
        if torch.isfinite(loss):
            return True
        self._non_finite(f"train/loss is {loss.item()}", step, epoch)
        return False

    def gradients_are_finite(self, s: Session, total_norm: torch.Tensor | None, step: int, epoch: int) -> bool:
        """True if the update may go on; under fp16 the scaler checks (True).

        One host sync on the total norm; only when it is non-finite are tensors scanned to name one. If none is (the
        sum of squares overflowed), the update goes on: clipping scales it to zero.
        """
        if s.scaler.is_enabled() or total_norm is None or bool(torch.isfinite(total_norm)):
            return True
        bad = next((n for n, p in s.lora.items() if p.grad is not None and not torch.isfinite(p.grad).all()), None)
        if bad is None:
            return True
        self._non_finite(f"the gradient of {bad} is not finite", step, epoch)
        return False

    def count(self, finite: bool, step: int) -> None:
        """After the update of `step`: raise NonFiniteLoss once `max_consecutive_skips` in a row were not finite."""
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row < self.limit:
            return
        raise NonFiniteLoss(
            f"train.on_nan=skip_step skipped {self.in_a_row} optimizer steps in a row (steps "
            f"{step - self.in_a_row + 1}-{step}; train.max_consecutive_skips={self.limit}): the loss or the gradients "
            f"stay NaN/Inf, so the training has diverged; {self._kept()}. Lower train.lr or check the data (or raise "
            "train.max_consecutive_skips).")

    def _non_finite(self, what: str, step: int, epoch: int) -> None:
        where = f"{what} at optimizer step {step} (epoch {epoch + 1})"
        if self.on_nan == "stop":
            raise NonFiniteLoss(f"{where}; {self._kept()}. Lower train.lr, check the data, or set "
                                "train.on_nan=skip_step.")
        log.warning("%s: skipped (train.on_nan=skip_step)", where)

    def _kept(self) -> str:
        last_state = self.kept()
        return f"the last good state is kept: {last_state}" if last_state else "no state had been saved yet"
