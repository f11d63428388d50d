"""The common yardstick: `fit/loss` measures every variant on the same (image, t, eps) points and never changes
the training it measures. Real trainings of the tiny model, recorded in a real MLflow store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import compose_config, new_store
from safetensors.torch import load_file

from lora_sweep.job.run import run_job
from lora_sweep.training.evaluate import fit_subset

COMMON = ("train.max_steps=2", "train.batch_size=2", "validation.every=1", "validation.fit_images=3",
          "validation.timesteps=[100,500,900]", "network.dropout=0.1", "network.rank_dropout=0.25",
          "network.module_dropout=0.1", "train.save_every=0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three trainings with one seed: l2 + AdamW, scheduled Huber + Prodigy, and l2 + AdamW without fit/loss."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("evaluate")
    uri = new_store(tmp / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    variants = {
        "l2_adamw": ("loss=l2", "optimizer=adamw"),
        "huber_prodigy": ("loss=huber_snr", "optimizer=prodigy"),
        "l2_adamw_no_fit": ("loss=l2", "optimizer=adamw", "validation.fit_images=0", "validation.every=0"),
    }
    try:
        outcomes = {name: run_job(compose_config(*COMMON, *extra, f"tracking.variant={name}"),
                                  output_dir=tmp / name) for name, extra in variants.items()}
        yield outcomes, MlflowClient(uri), tmp
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_fit_subset_is_seeded_and_independent_of_the_order_given():
    assert fit_subset([5, 1, 3, 9, 7], 3, seed=0) == fit_subset([9, 7, 5, 3, 1], 3, seed=0)
    assert len(fit_subset(list(range(10)), 4, seed=1)) == 4
    assert fit_subset([2, 0, 1], 10, seed=0) == [0, 1, 2] and fit_subset([1, 2], 0, seed=0) == []


def test_every_variant_is_measured_on_the_same_points(runs):
    outcomes, client, _ = runs
    a, b = outcomes["l2_adamw"].run_id, outcomes["huber_prodigy"].run_id
    assert outcomes["l2_adamw"].status == outcomes["huber_prodigy"].status == "FINISHED"
    for key in ("fit/loss", "fit/loss_t100", "fit/loss_t500", "fit/loss_t900"):
        step0_a, step0_b = history(client, a, key)[0], history(client, b, key)[0]
        assert step0_a[0] == 0 and step0_a == step0_b, key  # bit-equal: same weights, same (image, t, eps)
    assert [s for s, _ in history(client, a, "fit/loss")] == [0, 1, 2]  # step 0, every step, the end
    assert history(client, a, "fit/loss")[-1] != history(client, b, "fit/loss")[-1]  # and then they train apart


def test_points_and_fitting_speed_are_logged_at_the_end(runs):
    outcomes, client, tmp = runs
    run_id = outcomes["l2_adamw"].run_id
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} == {"evaluation/fit_points.json"}
    points = json.loads((tmp / "l2_adamw" / "evaluation" / "fit_points.json").read_text())
    assert points["metric"] == "fit/loss" and points["step"] == 2 and points["target"] == "eps"
    assert len(points["points"]) == 3 * 3 and {p["t"] for p in points["points"]} == {100, 500, 900}
    mean = sum(p["value"] for p in points["points"]) / len(points["points"])
    assert mean == pytest.approx(history(client, run_id, "fit/loss")[-1][1], rel=1e-6)
    other = json.loads((tmp / "huber_prodigy" / "evaluation" / "fit_points.json").read_text())
    assert [(p["image"], p["t"]) for p in other["points"]] == [(p["image"], p["t"]) for p in points["points"]]
    auc = history(client, run_id, "fit/loss_auc")
    assert len(auc) == 1 and auc[0][0] == 2 and auc[0][1] > 0


def test_fit_loss_does_not_change_the_training(runs):
    """With and without fit/loss (eval mode, own generator; kohya's three dropouts on): the bit-identical LoRA."""
    outcomes, client, _ = runs
    with_fit, without = outcomes["l2_adamw"], outcomes["l2_adamw_no_fit"]
    assert not client.get_metric_history(without.run_id, "fit/loss")
    a, b = load_file(str(with_fit.files["kohya"])), load_file(str(without.files["kohya"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(client, with_fit.run_id, "train/loss") == history(client, without.run_id, "train/loss")


def test_v_prediction_measures_the_velocity(tmp_path, mlflow_uri):
    outcome = run_job(compose_config("train.max_steps=1", "model.v_prediction=true", "validation.fit_images=1",
                                     "validation.timesteps=[500]"), output_dir=tmp_path / "v")
    assert outcome.status == "FINISHED"
    points = json.loads((Path(tmp_path) / "v" / "evaluation" / "fit_points.json").read_text())
    assert points["target"] == "v" and len(points["points"]) == 1


def test_replicates_are_measured_on_the_same_held_out_images(tmp_path, mlflow_uri):
    """The held-out split follows validation.seed, not train.seed: val/loss points pair across replicates."""
    images = []
    for seed in (1, 2):
        outcome = run_job(compose_config("train.max_steps=1", f"train.seed={seed}", "data.validation_split=0.3",
                                         "validation.fit_images=0", "validation.timesteps=[500]"),
                          output_dir=tmp_path / str(seed))
        assert outcome.status == "FINISHED"
        points = json.loads((tmp_path / str(seed) / "evaluation" / "val_points.json").read_text())["points"]
        images.append([p["image"] for p in points])
    assert images[0] == images[1] and len(images[0]) >= 1
