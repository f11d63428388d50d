"""A stop request (the first Ctrl-C / SIGTERM) stops promptly: the step in progress ends, a state is saved, the run
ends KILLED, and no end-of-run sampling or evaluation runs (they belong to a run that reached train.max_steps);
sampling that is under way gives up at its next prompt or denoising step. Real `sweep.py` processes and a real
sqlite store; the last test drives the training loop itself to stop inside the final evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose_config, new_store
from mlflow.tracking import MlflowClient

TINY_SAMPLES = ("sampling.prompts=[a cat]", "sampling.width=64", "sampling.height=64", "sampling.steps=2")


def start(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, Path, Path]:
    """`python sweep.py ...` (one run) with its status file (the queue's protocol: the step it is at) and its
    console in files."""
    status, console = tmp_path / "status.json", tmp_path / "console.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GPU_QUEUE_STATUS_FILE": str(status)}
    command = [sys.executable, str(ROOT / "sweep.py"), "train.device=cpu", "train.batch_size=2",
               f"train.state_dir={tmp_path / 'states'}", f"hydra.run.dir={tmp_path / 'out'}", *overrides]
    with open(console, "w") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, status, console


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def step_of(status: Path) -> int:
    try:
        return int(json.loads(status.read_text()).get("step") or 0)
    except (OSError, ValueError):
        return 0


def ended_within(proc: subprocess.Popen, seconds: float) -> float:
    """Seconds from now until `proc` exits (it is killed, and the test fails, after `seconds`)."""
    begun = time.monotonic()
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running {seconds} s after the stop request")
    return time.monotonic() - begun


def only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lora-sweep").experiment_id])
    return client, run


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def image_steps(client: MlflowClient, run_id: str) -> list[int]:
    """The steps of the run's sample images, as the report reads them."""
    from lora_sweep.compare.runs import logged_images

    return sorted(step for _, step in logged_images(client, run_id))


@pytest.mark.slow
def test_ctrl_c_during_expensive_sampling_stops_within_one_denoising_step(tmp_path):
    """One 1024x1024 prompt of 30 Euler steps at step 0 takes minutes on a CPU; a Ctrl-C during
    it ends the run within seconds, KILLED, with nothing sampled and no state (nothing was trained)."""
    new_store(tmp_path / "mlflow.db")
    proc, _, console = start(tmp_path, "train.max_steps=3", "sampling.prompts=[a cat]", "sampling.width=1024",
                             "sampling.height=1024", "sampling.steps=30")
    wait_for(proc, lambda: "sampling at step 0: 1 prompt" in console.read_text(), "step 0's sampling")
    time.sleep(1.0)  # inside the pipeline's denoising loop
    proc.send_signal(signal.SIGINT)
    took = ended_within(proc, 90)
    text = console.read_text()
    assert proc.returncode == 130, text[-3000:]  # stopped, as a stopped sweep exits
    assert "sampling at step 0 stopped after 0 of 1 prompts" in text and "Traceback" not in text
    assert took < 60, f"{took:.0f} s from the stop request to the end"
    client, run = only_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["lora_sweep.failure"] == "stopped by SIGINT"
    assert steps(client, run.info.run_id, "train/loss") == [] and image_steps(client, run.info.run_id) == []
    assert not list((tmp_path / "states").glob("*/*/state-step*.pt"))  # the rerun starts from scratch


@pytest.mark.slow
def test_a_stop_mid_training_saves_a_state_without_the_end_of_run_evaluation_which_the_rerun_does(tmp_path):
    """SIGTERM at step >= 3 of 12: KILLED at the step in progress, a state there, samples and fit/loss only from
    step 0 (no end-of-run evaluation at the stopped step); the rerun continues the run to 12 and evaluates there."""
    new_store(tmp_path / "mlflow.db")
    overrides = ("train.max_steps=12", "sampling.every=0", "validation.every=0", *TINY_SAMPLES)
    proc, status, console = start(tmp_path, *overrides)
    wait_for(proc, lambda: step_of(status) >= 3, "step 3")
    proc.send_signal(signal.SIGTERM)
    ended_within(proc, 90)
    text = console.read_text()
    assert proc.returncode == 143, text[-3000:]  # 128 + SIGTERM, as a shell reports it
    assert "SIGTERM received: ending after the current step" in text and "Ctrl-C" not in text
    assert "stopped by SIGTERM. Browse with" in text
    client, run = only_run(tmp_path)
    run_id = run.info.run_id
    stopped_at = steps(client, run_id, "train/loss")[-1]
    assert run.info.status == "KILLED" and 3 <= stopped_at < 12
    assert steps(client, run_id, "train/loss") == list(range(1, stopped_at + 1))
    assert steps(client, run_id, "fit/loss") == [0] and image_steps(client, run_id) == [0]
    assert list((tmp_path / "states").glob(f"*/{run_id}/state-step{stopped_at:08d}.pt"))

    again, _, console = start(tmp_path, *overrides)
    assert again.wait(timeout=300) == 0, console.read_text()[-3000:]
    client, run = only_run(tmp_path)  # the same run, continued
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert steps(client, run_id, "train/loss") == list(range(1, 13))
    assert steps(client, run_id, "fit/loss") == [0, 12] and image_steps(client, run_id) == [0, 12]


def test_a_stop_during_the_final_evaluation_ends_killed_and_the_resumed_run_only_evaluates(tmp_path, mlflow_uri):
    """A stop that arrives once train.max_steps is reached cuts the end-of-run evaluation short: a state at
    max_steps, KILLED. Resuming from it trains nothing and logs the evaluation, each metric once per step."""
    from lora_sweep.job.status import JobSink, StatusFile
    from lora_sweep.tracking.logger import RunLogger
    from lora_sweep.tracking.store import experiment_id
    from lora_sweep.training.train import StateTarget, train

    cfg = compose_config("train.max_steps=2", "train.batch_size=2", "train.device=cpu", *TINY_SAMPLES)
    client = MlflowClient(mlflow_uri)
    logger = RunLogger.start(client, experiment_id(client, "stop"), name="final", tags={})
    sink = JobSink(logger, StatusFile("final"), "final")
    at_the_end = lambda: sink.status.state.get("step", 0) >= 2  # noqa: E731  (what a Ctrl-C at step 2 does)
    first = train(cfg, output_dir=tmp_path / "out", sink=sink, should_stop=at_the_end,
                  states=StateTarget(tmp_path / "states", logger.run_id, "chash"))
    logger.end("KILLED")
    run_id = logger.run_id
    assert first.interrupted and first.steps == 2 and first.last_state.name == "state-step00000002.pt"
    assert steps(client, run_id, "train/loss") == [1, 2]
    assert steps(client, run_id, "fit/loss") == [0] and image_steps(client, run_id) == [0]

    logger = RunLogger.reopen(client, run_id, tags={})
    sink = JobSink(logger, StatusFile("final"), "final")
    second = train(cfg, output_dir=tmp_path / "out", sink=sink,
                   states=StateTarget(tmp_path / "states", run_id, "chash", resume_from=first.last_state))
    logger.end("FINISHED")
    assert not second.interrupted and second.steps == 2
    assert steps(client, run_id, "train/loss") == [1, 2]  # not logged twice
    assert steps(client, run_id, "fit/loss") == [0, 2] and image_steps(client, run_id) == [0, 2]
    assert "evaluation/fit_points.json" in {a.path for a in client.list_artifacts(run_id, "evaluation")}


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stop_request_names_the_signal_received(signum, exit_code, caplog):
    from lora_sweep.job.status import StopOnSignal

    with StopOnSignal() as stop:
        os.kill(os.getpid(), signum)  # handled in the main thread at the next bytecode
        time.sleep(0.01)
    name = signal.Signals(signum).name
    assert stop.requested and stop.signum == signum and 128 + stop.signum == exit_code
    assert f"{name} received: ending after the current step" in caplog.text
    assert ("Ctrl-C again to abort" in caplog.text) == (signum == signal.SIGINT)
