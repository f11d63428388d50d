"""How the suites measure lora-sweep's step: its real `train()` loop side by side with the bare loop.

`trainer_overhead` runs `lora_sweep.training.train.train` on a config composed from conf/ and times it between its
progress callbacks, `steps` steps a repetition after `warmup` steps. Inside each callback, outside lora-sweep's timed
intervals, it times one repetition of the bare loop (bare_loop.py) on the same frozen weights and inputs, so a change
in machine load hits both sides. lora-sweep's time holds everything a production step does (non-finite checks,
clipping, metrics, hooks) except the tracking: the sink discards everything.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.bare_loop import Batch, shared_bare_loop

ROOT = Path(__file__).resolve().parents[1]
# What the bare loop implements (kohya's l2 loss, no noise options, AdamW), one bucket (images centre-cropped), no
# fit/loss evaluation (it is not part of a step; validation.every=0 would still run it at step 0 and the end).
# train.sdpa: the bare loop, as diffusers' examples, runs diffusers' default SDPA; none set is the classic product
STEP_OVERRIDES = ("noise=none", "loss=l2", "optimizer=adamw", "data.enable_bucket=false", "validation.fit_images=0",
                  "train.sdpa=true")


def compose(*overrides: str):
    """The config `python sweep.py <overrides>` would run (conf/ composed by Hydra, schema registered)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import lora_sweep
    from lora_sweep.config import register_configs

    lora_sweep.setup()
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return hydra_compose("config", overrides=list(overrides))


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class NullSink:
    """A trainer sink that keeps nothing, so a timing sees the training and not the tracking."""

    def params(self, values) -> None: ...
    def metrics(self, values, step) -> None: ...
    def artifact(self, path, artifact_path=None) -> None: ...
    def image(self, image, key, step) -> None: ...
    def warn(self, fallback) -> None: ...
    def flush(self) -> None: ...
    def progress(self, step, max_steps, loss, speed) -> None: ...


@contextmanager
def after_build_session(callback):
    """Within the block, `callback(session, seconds)` runs each time `train()` has built its session."""
    from lora_sweep.training import train as train_module

    build = train_module.build_session

    def built(*args, **kwargs):
        started = time.perf_counter()
        s = build(*args, **kwargs)
        callback(s, time.perf_counter() - started)
        return s

    train_module.build_session = built
    try:
        yield
    finally:
        train_module.build_session = build


def session_batch(s, indices: list[int]) -> Batch:
    """The inputs lora-sweep's step builds for the examples `indices` (no flips), stacked for the bare loop."""
    examples = [s.prepared.examples[i] for i in indices]
    return Batch(
        latents=(torch.stack([e.latents for e in examples]) * s.vae_scale).to(s.device, s.policy.latent_dtype),
        context=torch.stack([e.context for e in examples]).to(s.device),
        pooled=torch.stack([e.pooled for e in examples]).to(s.device),
        time_ids=torch.stack([e.time_ids for e in examples]).to(s.device),
    )


class LoopTimer(NullSink):
    """A sink timing `train()` between its progress callbacks and running the bare loop (`self.bare(k)`, set once the
    session exists) inside them: the bare warm-up, then bare repetition i before lora-sweep's repetition i.
    On CUDA it also keeps each side's peak memory (`torch.cuda.max_memory_allocated` over its own steps)."""

    def __init__(self, warmup: int, steps: int, reps: int) -> None:
        self.warmup, self.steps, self.reps = warmup, steps, reps
        self.bare, self.bare_steps, self.device = None, 0, torch.device("cpu")
        self.ours: list[float] = []
        self.theirs: list[float] = []
        self.peak = {"lora_sweep": 0, "bare": 0}
        self.started = 0.0

    def _start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.started = time.perf_counter()

    def _lap(self, side: str) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak[side] = max(self.peak[side], torch.cuda.max_memory_allocated(self.device))
        return time.perf_counter() - self.started

    def _bare(self, n: int) -> None:
        for _ in range(n):
            self.bare(self.bare_steps)
            self.bare_steps += 1

    def progress(self, step, max_steps, loss, speed) -> None:
        if step < self.warmup or (step - self.warmup) % self.steps:
            return
        seconds = self._lap("lora_sweep")  # at step == warmup: the warm-up's peak only
        if step > self.warmup:
            self.ours.append(seconds / self.steps)
        if self.bare is not None and len(self.theirs) < self.reps:
            if step == self.warmup:
                self._bare(self.warmup)
            self._start()
            self._bare(self.steps)
            self.theirs.append(self._lap("bare") / self.steps)
        self._start()


def summary(ours: list[float], theirs: list[float]) -> dict:
    """Median seconds per step of each side, the median of per-repetition ratios (the figure) with its range, and
    the ratio of each side's fastest repetition (what load on a shared machine disturbs least)."""
    result = {"lora_sweep_step_s": median(ours), "reps": len(ours), "lora_sweep_s": ours}
    if theirs:
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        result |= {"bare_step_s": median(theirs), "ratio": median(ratios), "ratio_min": min(ratios),
                   "ratio_max": max(ratios), "ratio_of_fastest": min(ours) / min(theirs), "bare_s": theirs}
    return result


def trainer_overhead(overrides: list[str], workdir: Path, *, warmup: int, steps: int, reps: int,
                     bare: bool = True) -> dict:
    """`train()` on conf/ + STEP_OVERRIDES + `overrides` for warmup + reps x steps steps, timed against the bare loop
    (unless `bare` is False: then lora-sweep alone). Seconds per step, the ratio, the set-up's seconds and, on CUDA,
    bytes of memory: set-up peak, held after set-up, each side's training peak."""
    from lora_sweep.training.train import train

    cfg = compose(*STEP_OVERRIDES, *overrides, f"train.max_steps={warmup + reps * steps}")
    timer = LoopTimer(warmup, steps, reps)
    record: dict = {"batch_size": int(cfg.train.batch_size), "resolution": cfg.data.resolution, "steps": steps,
                    "precision": cfg.precision.name, "warmup": warmup, "threads": torch.get_num_threads()}

    def ready(s, seconds: float) -> None:
        timer.device = s.device
        record.update(setup_s=seconds, lora_tensors=len(s.params), device=str(s.device))
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
            record.update(setup_peak_bytes=torch.cuda.max_memory_allocated(s.device),
                          after_setup_bytes=torch.cuda.memory_allocated(s.device))
            torch.cuda.reset_peak_memory_stats(s.device)
        if bare:
            loop = shared_bare_loop(s)
            n, b = len(s.prepared.examples), cfg.train.batch_size
            batches = [session_batch(s, list(range(i, i + b))) for i in range(0, n - b + 1, b)]
            timer.bare = lambda k: float(loop.step(batches[k % len(batches)]))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with after_build_session(ready):
        result = train(cfg, output_dir=workdir, sink=timer)
    record.update(summary(timer.ours, timer.theirs), final_loss=result.final_loss)
    if timer.device.type == "cuda":
        record.update(train_peak_bytes=timer.peak["lora_sweep"], bare_peak_bytes=timer.peak["bare"] or None)
    return record
