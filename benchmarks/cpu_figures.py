"""In-process CPU figures of `make bench`: 1 trainer overhead and 4 tracking overhead, on the tiny SDXL at 64 px.

Figure 1 is measured twice, both times against the bare diffusers + peft loop (bare_loop.py) on a second copy of the
same UNet with the same inputs, interleaved repetition by repetition so a change in machine load hits both sides:
- core: lora-sweep's `micro_batch_loss` + scaled backward + `precision.scaled_step` + LR schedule + zero grads, on a
  Session from `build_session` (the work the brief names);
- loop: lora-sweep's real `train()` loop, timed between its progress callbacks, so everything a step does in
  production is in (non-finite checks, metrics assembly, hooks), except the tracking, whose sink discards all.
The bare steps of the loop figure run inside the progress callback, outside lora-sweep's timed intervals.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bare_loop import BareLoop, Batch, copy_lora_weights, wrapped_modules
from benchmarks.common import NullSink, compose, median

FIG1_OVERRIDES = ("precision=fp32", "noise=none", "loss=l2", "optimizer=adamw")


def core_step(s, batch: list[int], flip_rng: random.Random) -> float:
    """lora-sweep's step at grad_accum 1: kohya loss, scaled backward, unscale/clip/step, schedule, zero grads."""
    from lora_sweep.training import precision
    from lora_sweep.training.train import micro_batch_loss

    terms = micro_batch_loss(s, batch, flip_rng)
    s.scaler.scale(terms.loss / s.cfg.train.grad_accum).backward()
    if precision.scaled_step(s.scaler, s.optimizer, s.params, s.cfg.train.max_grad_norm):
        s.lr_scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return float(terms.loss.detach())


def session_batch(s, indices: list[int]) -> Batch:
    """The inputs lora-sweep's step builds for `indices` (no flips), stacked once for the bare loop."""
    examples = [s.prepared.examples[i] for i in indices]
    return Batch(
        latents=(torch.stack([e.latents for e in examples]) * s.vae_scale).to(s.device, s.policy.latent_dtype),
        context=torch.stack([e.context for e in examples]).to(s.device),
        pooled=torch.stack([e.pooled for e in examples]).to(s.device),
        time_ids=torch.stack([e.time_ids for e in examples]).to(s.device),
    )


def build_pair(cfg, output_dir: Path):
    """lora-sweep's Session for `cfg` and a BareLoop on a second copy of the same UNet, with the same LoRA init."""
    from diffusers import UNet2DConditionModel

    from lora_sweep.training.session import build_session

    s = build_session(cfg, output_dir=output_dir, sink=NullSink())
    unet = UNet2DConditionModel.from_pretrained(str(Path(s.parts.source) / "unet")).to(s.device)
    bare = BareLoop(unet, rank=cfg.network.rank, alpha=cfg.network.alpha, lr=float(cfg.train.lr),
                    max_grad_norm=cfg.train.max_grad_norm)
    if wrapped_modules(bare.unet) != wrapped_modules(s.unet):
        raise AssertionError("the bare loop and lora-sweep put LoRA on different modules")
    copy_lora_weights(s.unet, bare.unet)
    return s, bare


def index_batches(s, batch_size: int) -> list[list[int]]:
    """Full batches of example indices from the largest bucket (the photos at 64 px all share one)."""
    by_bucket: dict = {}
    for i, e in enumerate(s.prepared.examples):
        by_bucket.setdefault(e.bucket, []).append(i)
    items = max(by_bucket.values(), key=len)
    return [items[i:i + batch_size] for i in range(0, len(items) - batch_size + 1, batch_size)] or [items]


def _timed(fn, n: int) -> float:
    start = time.perf_counter()
    for k in range(n):
        fn(k)
    return (time.perf_counter() - start) / n


class _LoopTimer(NullSink):
    """A sink for `train()` that times lora-sweep's loop between progress callbacks and runs (and times) the bare
    loop's steps inside them: bare rep i, then lora-sweep rep i, `steps` steps each, after `warmup` steps."""

    def __init__(self, bare_step, warmup: int, steps: int, reps: int) -> None:
        self.bare_step, self.warmup, self.steps, self.reps = bare_step, warmup, steps, reps
        self.ours: list[float] = []
        self.theirs: list[float] = []
        self.resumed = 0.0

    def progress(self, step, max_steps, loss, speed) -> None:
        if step < self.warmup or (step - self.warmup) % self.steps:
            return
        if step > self.warmup:
            self.ours.append((time.perf_counter() - self.resumed) / self.steps)
        if len(self.theirs) < self.reps:
            if step == self.warmup:
                _timed(self.bare_step, self.warmup)
            self.theirs.append(_timed(self.bare_step, self.steps))
        self.resumed = time.perf_counter()


def _summary(ours: list[float], theirs: list[float]) -> dict:
    """Median of per-repetition ratios (the figure), its range, and the ratio of each side's fastest repetition
    (what load on a shared machine disturbs least: noise only ever adds time)."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {"lora_sweep_step_s": median(ours), "bare_step_s": median(theirs), "ratio": median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "ratio_of_fastest": min(ours) / min(theirs),
            "reps": len(ratios)}


def trainer_overhead(batch_size: int, *, steps: int, reps: int, warmup: int, workdir: Path) -> dict:
    """Figure 1 at one batch size: {"core": ..., "loop": ...}, each the median over reps of per-step time ratios."""
    from lora_sweep.training.train import train

    cfg = compose(f"train.batch_size={batch_size}", *FIG1_OVERRIDES)
    s, bare = build_pair(cfg, workdir / f"fig1-core-b{batch_size}")
    batches = index_batches(s, batch_size)
    bare_batches = [session_batch(s, b) for b in batches]
    flip_rng = random.Random(0)

    def ours_step(k: int) -> None:
        core_step(s, batches[k % len(batches)], flip_rng)

    def bare_step(k: int) -> None:
        float(bare.step(bare_batches[k % len(bare_batches)]))

    _timed(ours_step, warmup), _timed(bare_step, warmup)
    ours, theirs = [], []
    for rep in range(reps):  # alternate which side goes first
        if rep % 2 == 0:
            ours.append(_timed(ours_step, steps)), theirs.append(_timed(bare_step, steps))
        else:
            theirs.append(_timed(bare_step, steps)), ours.append(_timed(ours_step, steps))
    result = {"batch_size": batch_size, "resolution": int(cfg.data.resolution), "precision": "fp32",
              "steps": steps, "threads": torch.get_num_threads(), "core": _summary(ours, theirs)}

    loop_cfg = compose(f"train.batch_size={batch_size}", f"train.max_steps={warmup + reps * steps}", *FIG1_OVERRIDES)
    timer = _LoopTimer(bare_step, warmup, steps, reps)
    train(loop_cfg, output_dir=workdir / f"fig1-loop-b{batch_size}", sink=timer)
    result["loop"] = _summary(timer.ours, timer.theirs)
    return result


class _Clock:
    """A sink over a RunLogger that notes wall time and MLflow seconds at the loop's first and last step."""

    def __init__(self, logger) -> None:
        self.logger, self.marks = logger, {}

    def params(self, values) -> None:
        self.logger.log_params(values)

    def metrics(self, values, step) -> None:
        self.logger.log_metrics(values, step)

    def artifact(self, path, artifact_path=None) -> None:
        self.logger.log_artifact(path, artifact_path)

    def image(self, image, key, step) -> None:
        self.logger.log_image(image, key, step)

    def flush(self) -> None:
        self.logger.flush()

    def progress(self, step, max_steps, loss, speed) -> None:
        if step in (0, max_steps):
            self.marks[step] = (time.perf_counter(), self.logger.seconds_in_mlflow)


def tracking_overhead(steps: int, batch_size: int, workdir: Path, flush_every: int | None = None) -> dict:
    """Figure 4: a real `train()` logging to a fresh sqlite MLflow store through lora-sweep's RunLogger; the MLflow
    seconds spent inside the loop (RunLogger.seconds_in_mlflow) over the loop's wall time, plus one-off costs."""
    from lora_sweep.tracking import store as tracking_store
    from lora_sweep.tracking.logger import RunLogger
    from lora_sweep.training.train import train

    overrides = [f"train.max_steps={steps}", f"train.batch_size={batch_size}", "precision=fp32"]
    if flush_every is not None:
        overrides.append(f"tracking.flush_every={flush_every}")
    cfg = compose(*overrides)
    store = Path(tempfile.mkdtemp(prefix="fig4-mlflow-", dir=workdir))
    started = time.perf_counter()
    client = tracking_store.client(f"sqlite:///{store / 'mlflow.db'}")
    exp_id = client.create_experiment("bench-tracking", artifact_location=(store / "artifacts").as_uri())
    logger = RunLogger.start(client, exp_id, name="bench", tags={tracking_store.ROLE: "job"},
                             flush_every=cfg.tracking.flush_every)
    setup_s = time.perf_counter() - started
    sink = _Clock(logger)
    train(cfg, output_dir=workdir / "fig4-out", sink=sink)
    ending = time.perf_counter()
    logger.end("FINISHED")
    setup_s += time.perf_counter() - ending
    (t0, m0), (t1, m1) = sink.marks[0], sink.marks[steps]
    loop_s, loop_mlflow = t1 - t0, m1 - m0
    return {"steps": steps, "batch_size": batch_size, "flush_every": int(cfg.tracking.flush_every),
            "loop_s": loop_s, "step_s": loop_s / steps, "mlflow_in_loop_s": loop_mlflow,
            "mlflow_per_100_steps_s": loop_mlflow * 100 / steps, "share": loop_mlflow / loop_s,
            "mlflow_outside_loop_s": logger.seconds_in_mlflow - loop_mlflow + setup_s,
            "threads": torch.get_num_threads()}
