"""The comparison finds what is there, end to end: LoRAs trained for real on the trained tiny model (model=tiny, a
few steps) into a real MLflow store, read back as the report reads them, judged by the report's own verdict code.
A planted effect (AdamW's learning rate x10) reads "better" on fit/loss, paired over two seeds; the same config
under two other seeds reads "within noise" on every fit metric. About 30 CPU seconds (six runs of 8 steps)."""

from __future__ import annotations

import os

import pytest
from conftest import compose_config, new_store

pytestmark = pytest.mark.slow

SETTINGS = ("model=tiny", "optimizer=adamw", "train.max_steps=8", "train.batch_size=4", "validation.every=8",
            "validation.fit_images=4", "sampling.prompts=[]", "train.save_every=0", "train.device=cpu")
RUNS = {  # run label -> (variant, overrides): lr 1e-4 and x10 at seeds 1, 2; the x10 config again at seeds 3, 4
    "base-1": ("lr 1e-4", ["optimizer.lr=1e-4", "train.seed=1"]),
    "base-2": ("lr 1e-4", ["optimizer.lr=1e-4", "train.seed=2"]),
    "x10-1": ("lr 1e-3", ["optimizer.lr=1e-3", "train.seed=1"]),
    "x10-2": ("lr 1e-3", ["optimizer.lr=1e-3", "train.seed=2"]),
    "x10-3": ("lr 1e-3, other seeds", ["optimizer.lr=1e-3", "train.seed=3"]),
    "x10-4": ("lr 1e-3, other seeds", ["optimizer.lr=1e-3", "train.seed=4"]),
}
FIT = ("fit/loss", "fit/loss_auc", "fit/loss_t100", "fit/loss_t500", "fit/loss_t900")


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """variant name -> VariantGroup of its runs, as the report groups replicates (by hand here: the last two
    variants train the same config, which the report would call one variant)."""
    from lora_sweep.compare.runs import read_run
    from lora_sweep.compare.variants import VariantGroup
    from lora_sweep.job.run import run_job
    from lora_sweep.tracking import store

    tmp = tmp_path_factory.mktemp("finds_effects")
    uri = new_store(tmp / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        ids = {}
        for label, (_, overrides) in RUNS.items():
            outcome = run_job(compose_config(*SETTINGS, *overrides, f"tracking.variant={label}"),
                              output_dir=tmp / label)
            assert outcome.status == "FINISHED", outcome.reason
            ids[label] = outcome.run_id
        client = store.client(uri)
        found: dict[str, VariantGroup] = {}
        for label, (variant, _) in RUNS.items():
            run = read_run(client, client.get_run(ids[label]), tmp / "scratch")
            found.setdefault(variant, VariantGroup(variant, variant, [])).runs.append(run)
        yield found
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def judged(a, b, metric: str) -> tuple[str, dict]:
    from lora_sweep.compare.effects import difference, effect_dict
    from lora_sweep.compare.verdicts import verdict

    entry = effect_dict(difference(a, b, metric))
    return verdict(entry, metric), entry


def test_every_run_fits_the_photos_better_than_the_base_model(groups):
    runs = [run for group in groups.values() for run in group.runs]
    starts = {run.histories["fit/loss"][0][1] for run in runs}
    # one start for every seed: fit/loss's points do not depend on train.seed
    assert len(starts) == 1 and starts.pop() == pytest.approx(0.2173, abs=1e-4)
    assert all(run.histories["fit/loss"][-1][1] < run.histories["fit/loss"][0][1] for run in runs)


def test_a_ten_times_larger_learning_rate_reads_better_on_fit_loss(groups):
    found, entry = judged(groups["lr 1e-4"], groups["lr 1e-3"], "fit/loss")
    assert found == "better" and entry["basis"] == "paired over 2 seeds"
    assert entry["effect"] == pytest.approx(-0.000835, abs=2e-5) and entry["high"] < 0


def test_the_same_config_under_other_seeds_reads_within_noise(groups):
    for metric in FIT:
        found, entry = judged(groups["lr 1e-3"], groups["lr 1e-3, other seeds"], metric)
        assert found == "within noise", (metric, entry)
