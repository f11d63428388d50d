"""sweep.stop_early end to end: `python sweep.py -m` on two CPU slots, three variants, one diverging by construction
(AdamW at lr 1e4: fit/loss is not finite from step 1), one clearly slower (100 steps and no evaluation between, the
others 2). The diverging run stops at its first evaluation, the next queued job takes its slot while the slow one
still trains, the others finish, and a rerun without the rule resumes the stopped run from its state. The variants
are experiment files of their own that set tracking.experiment, as experiments/README.md's matrix does: the parent
run goes to that experiment too (MLflow nests runs only within one). Real processes, queue, sqlite store; 64 px, two
fit/loss images at one timestep, no sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, new_store
from mlflow.tracking import MlflowClient

MAX_STEPS = 2
EVERY_STEP = {"validation": {"every": 1}}
VARIANTS = {
    "diverges": {"train": {"lr": 1.0e4, "on_nan": "skip_step", "max_steps": MAX_STEPS}, **EVERY_STEP},
    # slow by its steps alone (a job's set-up takes seconds); fit/loss only at 0 and the end
    "slow": {"train": {"max_steps": 100}, "validation": {"every": 100}},
    # a group choice of its own, made in the file's defaults list
    "third": {"defaults": [{"override /noise": "offset"}], "train": {"seed": 3, "max_steps": MAX_STEPS}, **EVERY_STEP},
}
EXPERIMENT = "mine"  # every file's tracking.experiment, not the base config's lora-sweep


def sweep(tmp_path: Path, sweep_dir: str, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "sweep.py"), "-m", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
               f"experiment={','.join(VARIANTS)}", "train.device=cpu", "hydra.launcher.gpus=[]",
               "hydra.launcher.cpu_slots=2", "data.resolution=64", "validation.fit_images=2",
               "validation.timesteps=[500]",
               f"train.state_dir={tmp_path / 'states'}", f"hydra.sweep.dir={tmp_path / sweep_dir}", *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_diverging_variant_stops_gives_its_slot_to_the_next_job_and_resumes_without_the_rule(tmp_path):
    new_store(tmp_path / "mlflow.db")
    for name, settings in VARIANTS.items():  # experiment files of their own, as a user's would be
        folder = tmp_path / "conf" / "experiment"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.yaml").write_text("# @package _global_\n" + json.dumps(
            settings | {"tracking": {"variant": name, "experiment": EXPERIMENT}}))
    out = sweep(tmp_path, "sweep", "sweep.stop_early.metric=fit/loss", "sweep.stop_early.rule=diverged",
                "sweep.stop_early.margin=10")
    console = out.stdout + out.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment_by_name("lora-sweep") is None, console[-4000:]  # nothing went to the base's
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.data.tags["variant"]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("lora_sweep.role") == "job"}
    assert sorted(runs) == sorted(VARIANTS), console[-4000:]
    assert (runs["third"].data.params["noise.offset"], runs["slow"].data.params["noise.offset"]) == ("0.0357", "0.0")

    stopped = runs["diverges"]
    assert stopped.info.status == "KILLED", console[-4000:]
    record = json.loads(stopped.data.tags["lora_sweep.stopped_early"])
    assert record == {"step": 1, "rule": "diverged", "metric": "fit/loss", "value": record["value"],
                      "finite": record["finite"],
                      "compared_with": record["compared_with"], "peers": []}
    first = client.get_metric_history(stopped.info.run_id, "fit/loss")
    assert [m.step for m in first] == [0, 1]  # no end-of-run evaluation
    assert record["compared_with"] == pytest.approx([m.value for m in first if m.step == 0][0] + 10)
    assert max(m.step for m in client.get_metric_history(stopped.info.run_id, "train/loss")) == 1 < MAX_STEPS
    assert "stopped early by sweep.stop_early at step 1" in stopped.data.tags["lora_sweep.failure"]
    state = tmp_path / "states" / stopped.data.tags["config_hash"] / stopped.info.run_id / "state-step00000001.pt"
    assert state.exists()
    assert any(a.path == "lora" for a in client.list_artifacts(stopped.info.run_id))  # the LoRA of step 1
    for name in ("slow", "third"):
        assert runs[name].info.status == "FINISHED", name
        assert "lora_sweep.stopped_early" not in runs[name].data.tags
    # the rule's stop fails nothing: the sweep exits 0, its parent ends FINISHED and counts it apart
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("lora_sweep.role") == "sweep"]
    assert out.returncode == 0 and parent.info.status == "FINISHED", console[-4000:]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs.values())
    tags = parent.data.tags
    assert (tags["lora_sweep.jobs_finished"], tags["lora_sweep.jobs_stopped_early"]) == ("2", "1")
    assert "1 stopped early" in out.stdout and "STOPPED EARLY" in out.stdout
    assert "ended FINISHED (3 jobs: 2 finished, 1 stopped early (" in console and "at step 1: fit/loss" in console
    report = json.loads((tmp_path / "sweep" / "report" / "summary.json").read_text())
    assert [(s["variant"], s["step"]) for s in report["stopped_early"]] == [("diverges", 1)]  # censored there
    # the third job starts in the slot the stopped one freed, while the slow one still trains
    times = {name: (run.info.start_time, run.info.end_time) for name, run in runs.items()}
    assert stopped.info.end_time <= runs["third"].info.start_time < runs["slow"].info.end_time, times

    again = sweep(tmp_path, "rerun")  # the rule off: the stopped run resumes, the finished ones are skipped
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    resumed = client.get_run(stopped.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["lora_sweep.resumed_from"] == str(state)
    assert "lora_sweep.stopped_early" not in resumed.data.tags
    assert max(m.step for m in client.get_metric_history(stopped.info.run_id, "train/loss")) == MAX_STEPS
    assert (again.stdout + again.stderr).count("SKIPPED") >= 2
