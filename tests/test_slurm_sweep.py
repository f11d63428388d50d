"""The cluster path, for real: `python sweep.py -m ... hydra/launcher=submitit_slurm` through a one-node Slurm
(slurmctld + slurmd + munged, tests/cluster_fixtures.py) into an `mlflow server` over HTTP.

One test, two sweeps, tiny settings (it is docs/sweeps.md's Slurm section, run):
1. `noise=none,offset`: one Slurm job array, two jobs at once, each with its own (fake) GPU. Job 0 gets Slurm's
   time-limit/preemption warning (USR2, what `--signal=USR2@signal_delay_s` sends) in the middle of training: it
   saves a state and stops, submitit requeues it, and it resumes in the same MLflow run to the last step. Both
   runs are children of the sweep's parent run on the server, the latent cache is shared (each image encoded once
   across the array), the report is written and logged on the parent.
2. `noise=multires,none`, one wave at array_parallelism=2: the new config's job gets a NaN loss at step 1
   (tests/apps/faults, a Hydra callback that patches the job's process on the node), the finished config is
   skipped, the new job fails alone, with its reason on its run and in the summary, and the sweep exits non-zero.
Skipped with the reason where Slurm cannot run (see cluster_fixtures.slurm_unavailable). About 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from hydra_plugins._job_outcome import read_status, status_path
from lora_sweep.data.photos import PHOTOS

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps" / "faults"))
from fault_hook import FOLDER, fault_overrides  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 24  # long enough to be signalled mid-training (about 0.2-0.4 s a step here), short enough to be cheap
EXPERIMENT = "slurm-e2e"
SWEEP_TIMEOUT_S = 360


def run_sweep(cluster, server, work: Path, sweep_dir: Path, *overrides: str, during=None):
    """`python sweep.py -m ... hydra/launcher=submitit_slurm` with this cluster and server; `during(proc)` runs
    while it does. Returns (exit code, stdout + stderr)."""
    env = {**cluster.env, "MLFLOW_TRACKING_URI": server.uri, "LORA_SWEEP_CACHE_DIR": str(work / "cache"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(FOLDER)}
    gpus = [] if cluster.gpus else ["hydra.launcher.gpus_per_node=null"]
    command = [sys.executable, str(ROOT / "sweep.py"), "-m", *overrides, f"train.max_steps={STEPS}",
               "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
               # 15 min: a USR2 in the first 5 counts as a preemption, which submitit requeues even with the preset's
               # max_num_timeout=0 (a time-out is a USR2 after 80% of the limit or in its last 10 minutes)
               "hydra.launcher.array_parallelism=2", "hydra.launcher.timeout_min=15", *gpus,
               f"hydra.sweep.dir={sweep_dir}", f"tracking.experiment={EXPERIMENT}"]
    log = work / f"{sweep_dir.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            if during is not None:
                during(proc)
            proc.wait(timeout=SWEEP_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    return proc.returncode, log.read_text(errors="replace")


def status(sweep_dir: Path, idx: int) -> dict:
    return read_status(status_path(sweep_dir, idx))


def warn_job_mid_training(cluster, sweep_dir: Path, idx: int, at_step: int, found: dict):
    """Send Slurm's warning signal (USR2) to array task `idx` once its status file reports `at_step`; check on the
    way that every listener of the cluster (daemons, srun) is on loopback."""

    def during(proc):
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if status(sweep_dir, idx).get("step", 0) >= at_step:
                found["listeners"] = cluster.listening()
                tasks = cluster.run("squeue", "-h", "-r", "-o", "%i").stdout.split()
                found["task"] = next(t for t in tasks if t.endswith(f"_{idx}"))
                found["signalled_at_step"] = status(sweep_dir, idx)["step"]
                sent = cluster.run("scancel", "--signal=USR2", found["task"])
                assert sent.returncode == 0, sent.stderr
                return
            time.sleep(0.1)

    return during


def test_sweep_through_slurm_into_an_mlflow_server(slurm_cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    cluster, server = slurm_cluster, mlflow_server
    client = MlflowClient(server.uri)
    first = tmp_path / "sweep1"
    found: dict = {}
    code, out = run_sweep(cluster, server, tmp_path, first, "noise=none,offset",
                          during=warn_job_mid_training(cluster, first, 0, at_step=3, found=found))
    assert code == 0, out[-6000:]
    assert "Slurm sweep: 2 jobs: 2 FINISHED" in out, out[-6000:]
    assert found.get("task"), f"job 0 never reached step 3: {out[-4000:]}"
    assert found["listeners"] and all(ip == "127.0.0.1" for _, _, ip, _ in found["listeners"]), found["listeners"]

    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("lora_sweep.role") == "sweep")
    children = {r.data.tags["variant"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_dir"] == str(first)
    assert set(children) == {"noise=none", "noise=offset"}  # the keys the sweep varies
    assert all(r.info.status == "FINISHED" for r in children.values())
    if cluster.gpus:  # --gpus-per-node=1: Slurm gave each job one of the node's GPUs
        assert all(r.data.tags["gpu"] in {"0", "1"} for r in children.values())

    # Job 0 was warned mid-training: it saved a state, submitit requeued it, and it resumed in the same run.
    warned = children["noise=none"]
    resumed_from = warned.data.tags.get("lora_sweep.resumed_from", "")
    saved_step = int(re.search(r"state-step(\d+)\.pt$", resumed_from).group(1))
    assert saved_step >= found["signalled_at_step"], (resumed_from, found)
    steps = [m.step for m in client.get_metric_history(warned.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps  # every step once: no gap, no repeat
    job_log = next((first / ".submitit").glob(f"{found['task']}/*_log.out")).read_text()
    assert "Requeued job" in job_log and "resuming config" in job_log

    # One encode per image across the array: the two jobs' latent-cache misses add up to the dataset.
    misses = hits = 0
    for run in children.values():
        misses += sum(m.value for m in client.get_metric_history(run.info.run_id, "cache/latents/misses"))
        hits += sum(m.value for m in client.get_metric_history(run.info.run_id, "cache/latents/hits"))
    assert (misses, hits) == (len(PHOTOS), len(PHOTOS)), (misses, hits)

    report = (first / "report" / "report.html").read_text()
    assert "noise=none" in report and "noise=offset" in report
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # The rerun with a new config that fails (one wave of two tasks): the finished one is skipped, the failure alone.
    second = tmp_path / "sweep2"
    code, out = run_sweep(cluster, server, tmp_path, second, "noise=multires,none",
                          *fault_overrides({0: "nan_loss@1"}))
    assert code == 1, out[-6000:]
    assert "Slurm sweep: 2 jobs: 1 FAILED, 1 SKIPPED" in out, out[-6000:]
    summary = {job["idx"]: job for job in json.loads((second / "slurm_summary.json").read_text())}
    assert [summary[i]["state"] for i in range(2)] == ["FAILED", "SKIPPED"]
    assert "NonFiniteLoss" in summary[0]["reason"] and "step 1" in summary[0]["reason"]
    assert summary[1]["run_id"] == children["noise=none"].info.run_id
    assert re.search(r"#0 noise=multires\S* FAILED: NonFiniteLoss: train/loss is nan at optimizer step 1", out)

    failed = client.get_run(summary[0]["run_id"])
    assert failed.info.status == "FAILED"
    assert "NonFiniteLoss" in failed.data.tags["lora_sweep.failure"]
    parent2 = client.get_run(failed.data.tags["mlflow.parentRunId"])
    assert parent2.data.tags["sweep_dir"] == str(second) and parent2.info.status == "FAILED"
    assert all(client.get_run(r.info.run_id).info.status == "FINISHED" for r in children.values())
    assert not list(tmp_path.glob("mlflow-artifacts*"))  # the server's artifact URI was not taken for a folder
