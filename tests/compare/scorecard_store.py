"""A sweep of four variants x two seeds logged by hand into a real MLflow store, with planted differences from the
baseline `noise=none`: `noise=offset` has a lower fit/loss (better), `noise=multires` a higher one (worse),
`noise=ip` one within the seeds' noise, and `noise=ip` never logged val/loss (no value). A scorecard metric is
compared too: `noise=offset`'s img/diversity at step 8 is 0.50 against 0.10 elsewhere (better: it is max).

The image metrics are those of solid-colour samples (variant, prompt, step) at steps 0 and 8; the images
themselves are not logged (tests/compare/test_report.py checks the sample grid), which keeps the store quick.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lora_sweep.sampling.metrics import mean_metrics
from lora_sweep.sampling.prompts import PromptSpec

SEEDS = (1, 2)
STEPS = (0, 4, 8)
SAMPLE_STEPS = (0, 8)
PROMPTS = [PromptSpec("a photo of a cat", seed=1234, width=64, height=64)]
# variant -> (noise.offset param, final fit/loss of seed 1 and seed 2); every fit/loss starts at 0.2
FINAL_FIT = {
    "noise=none": ("0.0", (0.100, 0.102)),
    "noise=offset": ("0.1", (0.080, 0.0815)),  # paired differences -0.0200, -0.0205: better (fit/loss is min)
    "noise=multires": ("0.2", (0.130, 0.1315)),  # +0.0300, +0.0295: worse
    "noise=ip": ("0.3", (0.103, 0.099)),  # +0.003, -0.003: within noise
}
NO_VAL_LOSS = "noise=ip"
DIVERSE = "noise=offset"  # img/diversity 0.50 (+ 0.001 x seed) at the last sampling step, the others 0.10
BASELINE = "noise=none"


def colour(variant: int, prompt: int, step: int) -> tuple[int, int, int]:
    return (40 + 60 * variant, 60 + 120 * prompt, 20 + 20 * step)


def fill_scorecard_store(uri: str, artifact_root: Path) -> dict:
    """Log the sweep into `uri`; returns {"client", "parent" (the sweep run id), "runs" {(variant, seed): id}}."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("scorecard", artifact_location=artifact_root.as_uri())
    parent = client.create_run(experiment, run_name="sweep", tags={"lora_sweep.role": "sweep"}).info.run_id
    ids = {}
    for index, (name, (offset, finals)) in enumerate(FINAL_FIT.items()):
        for seed, final in zip(SEEDS, finals, strict=True):
            tags = {"lora_sweep.role": "job", "variant": f"{name} train.seed={seed}", "mlflow.parentRunId": parent}
            run_id = ids[name, seed] = client.create_run(experiment, run_name=name, tags=tags,
                                                         start_time=1_000 * (2 * index + seed)).info.run_id
            params = {"noise.offset": offset, "train.seed": str(seed), "train.max_steps": str(STEPS[-1]),
                      "compare.baseline": BASELINE}
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            metrics = [Metric("fit/loss", 0.2 + (final - 0.2) * s / STEPS[-1], 0, s) for s in STEPS]
            if name != NO_VAL_LOSS:
                metrics += [Metric("val/loss", 0.25 + (final - 0.2) * s / STEPS[-1], 0, s) for s in STEPS]
            metrics += [Metric("train/loss", 0.3 - 0.01 * s + 0.001 * seed, 0, s) for s in STEPS]
            for step in SAMPLE_STEPS:
                images = [Image.new("RGB", (64, 64), colour(index, p, step + seed)) for p in range(len(PROMPTS))]
                metrics += [Metric(k, v, 0, step) for k, v in mean_metrics(images).items()]
                diverse = 0.50 if name == DIVERSE and step == SAMPLE_STEPS[-1] else 0.10
                metrics.append(Metric("img/diversity", diverse + 0.001 * seed, 0, step))
            client.log_batch(run_id, metrics=metrics)
            client.set_terminated(run_id)
    client.set_terminated(parent)
    return {"client": client, "parent": parent, "runs": ids}
