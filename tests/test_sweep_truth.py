"""After a sweep, MLflow and the console agree on what happened to every job, end to end:
`python sweep.py -m ...` as a user types it, the gpu_queue launcher, the tiny model and a real sqlite store."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, new_store
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lora_sweep.tracking.store import FAILURE, PID, ROLE

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps" / "faults"))
from fault_hook import FOLDER, fault_overrides  # noqa: E402

NEGATIVE = "blurry, lowres/jpeg artifacts, " * 67  # 2,000+ characters, with '/' and spaces


def sweep_command(tmp_path: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return [sys.executable, str(ROOT / "sweep.py"), *args], env


def run_sweep(tmp_path: Path, *args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    command, environment = sweep_command(tmp_path, *args)
    return subprocess.run(command, cwd=tmp_path, env={**environment, **env}, capture_output=True, text=True,
                          timeout=timeout)


def runs_by_role(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lora-sweep")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    sweeps = [r for r in runs if r.data.tags.get(ROLE) == "sweep"]
    return client, sweeps, runs


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    """Three jobs (three seeds), each with the 2,000-character negative prompt: one trains, one fails in its set-up
    before its run exists (a failure no pre-flight can see), one goes NaN at step 1 (tests/apps/faults)."""
    tmp_path = tmp_path_factory.mktemp("failing")
    new_store(tmp_path / "mlflow.db")
    out = run_sweep(tmp_path, "-m", "train.max_steps=2", f"sampling.negative='{NEGATIVE}'", "train.seed=1,2,3",
                    *fault_overrides({1: "setup_error", 2: "nan_loss@1"}), "sweep.skip_finished=false",
                    "train.resume=never", f"hydra.sweep.dir={tmp_path / 'sweep'}", PYTHONPATH=str(FOLDER))
    return tmp_path, out


@pytest.mark.slow
def test_console_says_what_failed_once_without_tracebacks(failing_sweep):
    tmp_path, out = failing_sweep
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-4000:]
    assert "Traceback" not in text and "Error executing job" not in text
    assert "(1) FAILED, 1 job: #1 train.seed=2" in out.stdout
    assert "(2) FAILED, 1 job: #2 train.seed=3" in out.stdout
    assert out.stdout.count("(1) FAILED") == 1 and out.stdout.count("(2) FAILED") == 1 and "(3) FAILED" not in text
    assert "see (1) below" in out.stdout and "see (2) below" in out.stdout  # the table points at the paragraphs
    assert re.search(r"log #1: \S+/1_train\.seed=2/console\.log", out.stdout)
    assert "gpu_queue: 3 jobs: 0 running, 0 queued, 1 finished, 2 failed" in out.stdout
    assert "ended FAILED (3 jobs: 1 finished, 2 failed)" in text


@pytest.mark.slow
def test_a_2000_character_value_neither_breaks_folders_nor_names(failing_sweep):
    tmp_path, out = failing_sweep
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name[0].isdigit())
    assert folders == ["0_train.seed=1", "1_train.seed=2", "2_train.seed=3"]
    client, (parent,), runs = runs_by_role(tmp_path)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["train.seed=1", "train.seed=2", "train.seed=3"]
    done = children["train.seed=1"]
    assert done.info.status == "FINISHED" and done.data.tags["variant"] == "train.seed=1"
    assert done.data.params["sampling.negative"] == NEGATIVE  # the whole value, under MLflow's limit
    assert f"sampling.negative='{NEGATIVE}'" in done.data.tags["lora_sweep.overrides"]
    config = Path(client.download_artifacts(done.info.run_id, "config.yaml", str(tmp_path)))
    resolved = OmegaConf.load(config)  # the whole resolved config
    assert resolved.sampling.negative == NEGATIVE and resolved.train.max_consecutive_skips == 10


@pytest.mark.slow
def test_mlflow_agrees_with_the_console(failing_sweep):
    tmp_path, _ = failing_sweep
    client, (parent,), runs = runs_by_role(tmp_path)
    assert parent.info.status == "FAILED"
    tags = parent.data.tags
    assert [tags[f"lora_sweep.jobs_{k}"] for k in ("total", "finished", "failed", "skipped", "killed")] == \
        ["3", "1", "2", "0", "0"]
    assert "2 of 3 jobs failed" in tags[FAILURE] and "set-up failed on purpose" in tags[FAILURE]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    early = children["train.seed=2"]  # failed before its own run existed: still a child run
    assert early.info.status == "FAILED" and "set-up failed on purpose" in early.data.tags[FAILURE]
    nan = children["train.seed=3"]
    assert nan.info.status == "FAILED" and "train/loss is nan at optimizer step 1" in nan.data.tags[FAILURE]
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}  # one job finished: a report


def test_a_file_store_is_refused_in_one_paragraph_before_any_work(tmp_path):
    uri = f"file://{tmp_path / 'mlruns'}"
    started = []
    for args in (["-m", "noise=none,offset", "train.max_steps=1"], ["train.max_steps=1"]):  # a sweep, a single run
        command, env = sweep_command(tmp_path, *args)
        started.append(subprocess.Popen(command, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT,
                                        env={**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "false"}))
    for process in started:  # both at once: each is mostly start-up
        text = process.communicate(timeout=180)[0]
        assert process.returncode == 2, text[-3000:]
        assert uri in text and "MLFLOW_ALLOW_FILE_STORE=true" in text and "sqlite" in text
        assert "Traceback" not in text and "gpu_queue" not in text  # no job was started
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_a_runs_console_is_clean_and_names_the_store_to_browse(tmp_path, monkeypatch):
    """A single run: no `loss=nan` before the first step, no library noise (transformers' torchvision fallback,
    bitsandbytes' kernels, MLflow making a new store's tables, diffusers' loading bars), the optimizer's advice as one
    clean log line, and a last line whose command opens the UI on the store this run used (not the repository's
    ./mlflow.db); `compare` takes the same option."""
    from cluster_fixtures import free_port

    out = run_sweep(tmp_path, "train.max_steps=1", "optimizer=prodigy", "train.lr=0.1", timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "loss=nan" not in text
    assert "torchvision (not installed)" not in text and "gemm_4bit_forward" not in text
    assert "database tables" not in text and "Loading pipeline components" not in text  # a new store; no terminal
    assert "[py.warnings][WARNING] - UserWarning: learning rate 0.1 is too low for prodigy" in text
    assert "warnings.warn(" not in text and "optim.py:" not in text  # no file name, no source line
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = re.search(r"Browse with `([^`]+)`", text).group(1)
    assert command == f"python -m lora_sweep ui --tracking-uri {uri}"

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the command alone names the store
    ui = subprocess.Popen([sys.executable, *command.split()[1:], "--port", str(free_port())], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = [ui.stdout.readline() for _ in range(4)]
        assert lines[0].strip() == f"MLflow UI for {uri}", lines
        experiment = MlflowClient(uri).get_experiment_by_name("lora-sweep").experiment_id
        assert f"#/experiments/{experiment}/runs" in lines[3], lines  # the runs page: the store has this run
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        ui.wait(timeout=60)
    from lora_sweep.__main__ import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the option alone names the store
    assert main(["compare", "--store", uri, "--out", str(tmp_path / "cmp")]) == 0  # in this process: no start-up


@pytest.mark.slow
def test_gpu_slots_on_a_machine_without_cuda_are_refused_before_any_job_starts(tmp_path):
    """`hydra.launcher.gpus=[0,1]` where torch sees no CUDA device: the pre-flight refuses the sweep (exit 2, one
    paragraph) instead of each job failing as it starts; no job, no run, no sweep folder."""
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the two GPUs")
    out = run_sweep(tmp_path, "-m", "noise=none,offset", "train.max_steps=1", "hydra.launcher.gpus=[0,1]",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-4000:]
    assert "hydra.launcher.gpus=[0, 1]: the sweep's GPU slots" in text and "hydra.launcher.gpus=[]" in text
    assert ("no CUDA device" in text if torch.cuda.device_count() == 0 else "1 CUDA device(s)" in text)
    assert "Traceback" not in text and not (tmp_path / "sweep").exists() and not (tmp_path / "mlflow.db").exists()


def newest_state(states: Path) -> int:
    found = [int(m[1]) for p in states.glob("*/*/state-step*.pt") if (m := re.search(r"step(\d+)", p.name))]
    return max(found, default=0)


@pytest.mark.slow
def test_a_sigkilled_sweep_is_marked_killed_by_the_next_one_which_resumes_its_job(tmp_path):
    new_store(tmp_path / "mlflow.db")
    args = ["-m", "noise=none", "train.max_steps=12", "train.save_every=2", f"train.state_dir={tmp_path / 'states'}"]
    command, env = sweep_command(tmp_path, *args, f"hydra.sweep.dir={tmp_path / 'first'}")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while newest_state(tmp_path / "states") < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # the sweep process only: its jobs die with it (the fork server sees it go)
    first.wait(timeout=30)
    killed_at = newest_state(tmp_path / "states")
    assert 2 <= killed_at < 12, f"the kill came too late or never (state {killed_at})"
    client, (old_parent,), runs = runs_by_role(tmp_path)
    (job,) = [r for r in runs if r.data.tags.get(ROLE) == "job"]
    assert old_parent.info.status == "RUNNING" and job.info.status == "RUNNING"  # nobody could close them
    job_pid = int(job.data.tags[PID])
    deadline = time.monotonic() + 30
    while psutil.pid_exists(job_pid) and time.monotonic() < deadline:
        time.sleep(0.1)

    again = run_sweep(tmp_path, *args, f"hydra.sweep.dir={tmp_path / 'second'}")
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    old = client.get_run(old_parent.info.run_id)
    assert old.info.status == "KILLED"
    assert f"process ({old_parent.data.tags[PID]} on" in old.data.tags[FAILURE]
    assert "marked KILLED by the sweep in" in old.data.tags[FAILURE]
    _, sweeps, _ = runs_by_role(tmp_path)
    new_parent = next(s for s in sweeps if s.info.run_id != old_parent.info.run_id)
    assert new_parent.info.status == "FINISHED" and new_parent.data.tags["lora_sweep.jobs_finished"] == "1"
    resumed = client.get_run(job.info.run_id)  # the same run went on, under the new sweep
    assert resumed.info.status == "FINISHED" and resumed.data.tags["lora_sweep.resumes"] == "1"
    assert resumed.data.tags["mlflow.parentRunId"] == new_parent.info.run_id
    assert FAILURE not in resumed.data.tags
    steps = [m.step for m in client.get_metric_history(job.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 13))
