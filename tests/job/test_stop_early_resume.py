"""A run `sweep.stop_early` stopped has every evaluation of its stop step, so its resume (which does not evaluate
its start step again) leaves no gap: the job in this process, the tiny model on CPU, 4 steps at 64 px."""

from __future__ import annotations

import pytest
from conftest import compose_config
from mlflow.tracking import MlflowClient

from lora_sweep.compare.runs import logged_images
from lora_sweep.job.run import run_job

RULE = ("sweep.stop_early.metric=fit/loss", "sweep.stop_early.rule=diverged", "sweep.stop_early.margin=10")


@pytest.mark.slow
def test_a_run_stopped_early_logs_its_stop_steps_samples_and_resumes_without_a_gap(tmp_path, mlflow_uri):
    common = ["train.max_steps=4", "train.batch_size=2", "train.lr=1e4", "train.on_nan=skip_step",
              "validation.every=2", "validation.fit_images=2", "validation.timesteps=[500]", "sampling.every=2",
              "sampling.steps=2", "sampling.prompts=[a cat]", f"train.state_dir={tmp_path / 'states'}",
              "train.device=cpu", "data.resolution=64"]
    client = MlflowClient(mlflow_uri)

    def steps(run_id: str) -> tuple[list[int], list[int], list[int]]:
        fit = [m.step for m in client.get_metric_history(run_id, "fit/loss")]
        img = [m.step for m in client.get_metric_history(run_id, "img/drift")]
        return fit, img, sorted({step for _, step in logged_images(client, run_id)})

    stopped = run_job(compose_config(*common, *RULE), output_dir=tmp_path / "first")
    run = client.get_run(stopped.run_id)
    assert run.info.status == "KILLED" and '"step": 2' in run.data.tags["lora_sweep.stopped_early"]
    assert steps(stopped.run_id) == ([0, 2], [0, 2], [0, 2])  # the stop step's samples too; no end-of-run ones

    resumed = run_job(compose_config(*common), output_dir=tmp_path / "rerun")
    assert resumed.run_id == stopped.run_id and client.get_run(stopped.run_id).info.status == "FINISHED"
    assert steps(stopped.run_id) == ([0, 2, 4], [0, 2, 4], [0, 2, 4])
