"""The scorecard in a real training of the tiny model: two seeds per prompt logged under seed-named keys with
img/copying, img/diversity and img/drift at every sampled step, and `compare --score` computing the same numbers
afterwards from a run's logged samples, once. (A resumed run's drift: tests/job/test_resume.py.)"""

from __future__ import annotations

import os

import pytest
from conftest import compose_config, new_store
from mlflow.tracking import MlflowClient

from lora_sweep.compare.report import main as compare_main
from lora_sweep.compare.runs import download_image, logged_images
from lora_sweep.compare.score import score_logged_run
from lora_sweep.job.run import run_job

COMMON = ("train.max_steps=2", "train.batch_size=2", "train.save_every=0", "sampling.every=1", "sampling.steps=2",
          "sampling.prompts=[a cat]", "sampling.seeds=[5,9]", "validation.fit_images=0")
SCORES = ("img/copying", "img/copying_max", "img/diversity", "img/drift")


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run to step 2, sampled at steps 0, 1 and 2."""
    tmp = tmp_path_factory.mktemp("scorecard")
    uri = new_store(tmp / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        first = run_job(compose_config(*COMMON, f"train.state_dir={tmp / 'states'}"), output_dir=tmp / "first")
        yield MlflowClient(uri), first, tmp
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_two_seeds_are_logged_under_their_keys_with_every_score_at_every_sampled_step(trained):
    client, first, tmp = trained
    assert first.status == "FINISHED"
    assert set(logged_images(client, first.run_id)) == {(f"sample_p00_s{seed}", step) for seed in (5, 9)
                                                        for step in (0, 1, 2)}
    scores = {key: history(client, first.run_id, key) for key in SCORES}
    assert all(sorted(values) == [0, 1, 2] for values in scores.values()), scores
    assert scores["img/drift"][0] == 0.0  # step 0 is its own reference
    assert all(0 < v <= 1 for v in scores["img/diversity"].values())  # seeds 5 and 9 draw different noise
    assert all(-1 <= v <= 1 for v in scores["img/copying"].values())
    assert {p.name for p in tmp.glob(f"states/*/{first.run_id}/samples-step0/*.png")} == {
        "sample_p00_s5.png", "sample_p00_s9.png"}


def test_compare_score_computes_the_same_numbers_afterwards_and_only_once(trained, capsys):
    client, first, tmp = trained
    # An "old" run: the same samples and dataset record, logged without the scorecard's metrics.
    old = client.create_run(client.get_run(first.run_id).info.experiment_id, run_name="old",
                            tags={"lora_sweep.role": "job"}).info.run_id
    client.set_terminated(old)
    for (key, step), image in logged_images(client, first.run_id).items():
        client.log_image(old, download_image(client, first.run_id, image.path, tmp), key=key, step=step)
    client.log_artifact(old, client.download_artifacts(first.run_id, "data/datasets.json", str(tmp)), "data")
    added = score_logged_run(client, client.get_run(old), scratch=tmp / "scratch")
    assert sorted(added) == [0, 1, 2]
    for key in SCORES:
        assert history(client, old, key) == pytest.approx(history(client, first.run_id, key), abs=1e-12), key
    assert score_logged_run(client, client.get_run(old), scratch=tmp / "scratch") == {}  # idempotent
    out = tmp / "report"
    assert compare_main(["--experiment", "lora-sweep", "--all-sweeps", "--score", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("score: ")]
    assert sorted(lines) == [f"score: {name}: nothing to add (no samples, or every metric already logged)"
                             for name in sorted(["old", client.get_run(first.run_id).info.run_name])]
