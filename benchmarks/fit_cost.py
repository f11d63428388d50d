"""What `fit/loss` costs against the training step (issue 15), on the tiny SDXL, one torch thread.

    python benchmarks/fit_cost.py [--reps 7] [--config "preset=demo experiment=v53"] ...

For each config: the median time of one training step (lora-sweep's core step: kohya loss, backward, optimizer
step) and of one `fit/loss` evaluation (`Validator.point_losses`: validation.fit_images images x
len(validation.timesteps) timesteps, no gradients), measured alternately on the same Session. The evaluation runs
at step 0, every `validation.every` steps and at the end, so its share of a run's time is about
eval / (validation.every x step): printed for the demo's every=2 and the article's every=200.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import NullSink, compose, median  # noqa: E402

CONFIGS = ("preset=demo experiment=v53", "preset=demo experiment=v61", "train.batch_size=1")


def measure(overrides: str, reps: int, workdir: Path) -> dict:
    import torch

    from benchmarks.cpu_figures import core_step, index_batches
    from lora_sweep.training.session import build_session

    cfg = compose(*overrides.split(), "train.max_steps=1000")
    s = build_session(cfg, output_dir=workdir, sink=NullSink())
    fit = next(h for h in s.hooks if getattr(h, "prefix", None) == "fit")
    batch = index_batches(s, cfg.train.batch_size)[0]
    flip_rng = random.Random(0)
    steps, evals = [], []
    core_step(s, batch, flip_rng), fit.point_losses(s)  # warm-up
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(cfg.train.grad_accum):
            core_step(s, batch, flip_rng)
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        fit.point_losses(s)
        evals.append(time.perf_counter() - start)
    step, evaluation = median(steps), median(evals)
    torch.set_num_threads(1)
    return {"config": overrides, "batch": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "precision": cfg.precision.name, "points": len(fit.examples) * len(fit.timesteps),
            "step_s": step, "eval_s": evaluation, "eval_in_steps": evaluation / step,
            "share_every_2": evaluation / (2 * step + evaluation),
            "share_every_200": evaluation / (200 * step + evaluation)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--config", action="append", help="overrides of one config (repeatable)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lora_sweep_fit_cost_") as work:
        for number, overrides in enumerate(args.config or CONFIGS):
            rows.append(measure(overrides, args.reps, Path(work) / str(number)))
    print("| config | batch x accum | precision | points | step | fit/loss eval | eval / step | share at every=2 |"
          " share at every=200 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['config']}` | {r['batch']} x {r['grad_accum']} | {r['precision']} | {r['points']} | "
              f"{r['step_s'] * 1000:.0f} ms | {r['eval_s'] * 1000:.0f} ms | {r['eval_in_steps']:.2f} | "
              f"{r['share_every_2']:.1%} | {r['share_every_200']:.2%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
