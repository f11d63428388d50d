"""A resumed training is the same training: SIGKILL after step k, resume in a fresh process, and the LoRA and the
loss history equal those of a run that never stopped (CPU, one thread)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, new_store
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from lora_sweep.errors import UserError
from lora_sweep.job.run import run_job
from lora_sweep.training.checkpoint import read_meta

JOB = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path[:0] = [{root!r}, {tests!r}]
    from pathlib import Path
    from conftest import compose_config
    from lora_sweep.job.run import run_job
    out = run_job(compose_config(*sys.argv[2:]), output_dir=Path(sys.argv[1]))
    print("OUTCOME", out.status, out.run_id)
""").format(root=str(ROOT), tests=str(ROOT / "tests"))
STEPS = 10


def overrides(base: Path, *extra: str) -> list[str]:
    return [f"train.max_steps={STEPS}", "train.batch_size=2", "train.save_every=1", "train.keep_states=3",
            f"train.state_dir={base / 'states'}", f"tracking.uri=sqlite:///{base / 'mlflow.db'}",
            "tracking.flush_every=100", "train.device=cpu", *extra]


def job(base: Path, output: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-c", JOB, str(base / output), *overrides(base, *extra)], cwd=base,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return re.search(r"OUTCOME (\w+) (\w+)", out).groups()


def in_process(base: Path, output: str, monkeypatch, *extra: str):
    """The same job in this process, on one thread like the subprocesses."""
    monkeypatch.chdir(base)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_job(compose_config(*overrides(base, *extra)), output_dir=base / output)
    finally:
        torch.set_num_threads(threads)


def newest_state_step(states: Path) -> int:
    steps = [int(m[1]) for p in states.glob("*/*/state-step*.pt") if (m := re.search(r"step(\d+)\.pt$", p.name))]
    return max(steps, default=0)


def kill_after_state(proc: subprocess.Popen, states: Path, step: int) -> threading.Thread:
    """SIGKILL `proc` as soon as a state of `step` or later exists (polled from a thread)."""
    def watch():
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if newest_state_step(states) >= step:
                proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def client_of(base: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{base / 'mlflow.db'}")


def loss_history(base: Path, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client_of(base).get_metric_history(run_id, "train/loss"))


def test_sigkilled_run_resumes_to_the_same_lora_and_loss_history(tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    new_store(straight / "mlflow.db")
    new_store(broken / "mlflow.db")
    victim = job(broken, "out_first")
    watcher = kill_after_state(victim, broken / "states", 3)
    uninterrupted = in_process(straight, "out", monkeypatch)  # trains while the victim runs
    watcher.join(timeout=300)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, victim.communicate()[0][-3000:]
    killed_at = newest_state_step(broken / "states")
    assert 3 <= killed_at < STEPS, f"the kill came too late (state {killed_at})"
    client = client_of(broken)
    (killed_run,) = client.search_runs(client.get_experiment_by_name("lora-sweep").experiment_id)
    assert killed_run.info.status == "RUNNING"  # SIGKILL: nobody closed it

    status, resumed_id = finish(job(broken, "out_second"))  # a fresh process, a new output folder, resume=auto
    assert status == uninterrupted.status == "FINISHED"
    assert resumed_id == killed_run.info.run_id  # the same MLflow run goes on
    run = client.get_run(resumed_id)
    assert run.info.status == "FINISHED" and run.data.tags["lora_sweep.resumes"] == "1"
    assert "lora_sweep.failure" not in run.data.tags

    a = load_file(str(uninterrupted.files["kohya"]))
    b = load_file(str(broken / "out_second" / "lora.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-exact

    history_a, history_b = loss_history(straight, uninterrupted.run_id), loss_history(broken, resumed_id)
    assert [s for s, _ in history_b] == list(range(1, STEPS + 1))  # every step once: none missing, none twice
    assert history_a == history_b
    # Step checkpoints of both lives reached the same run as artifacts.
    names = {Path(a.path).name for a in client.list_artifacts(resumed_id, "lora/checkpoints")}
    assert {f"lora-step{s:08d}.safetensors" for s in range(1, STEPS + 1)} <= names


@pytest.mark.parametrize("variant", [
    [],
    # captions shuffled with Python's global RNG (so encoded at every step), flips drawn from the flip RNG
    ["data.shuffle_caption=true", "data.flip_aug=true"],
    # samples and validation loss between steps draw from their own generators only; v0.8.7's order with 2 workers
    ["sampling.prompts=[a cat]", "sampling.every=2", "sampling.steps=2", "data.validation_split=0.3",
     "validation.every=1", "sampling.seeds=[5,9]", "data.max_data_loader_n_workers=2"],
], ids=["plain", "shuffle_flip", "samples_validation"])
def test_resume_from_a_given_state_file_continues_exactly_in_a_new_run(tmp_path, monkeypatch, variant):
    """train.resume=PATH: the state of step 2 of a finished run, continued to step 4 in this process, ends with the
    same LoRA (and img/drift) as that run; the history of the new run starts at step 3. A state asked for is resumed
    although its config FINISHED (skip-finished is for reruns), as kohya resumes when asked."""
    new_store(tmp_path / "mlflow.db")
    first = in_process(tmp_path, "first", monkeypatch, "train.max_steps=4", *variant)
    assert first.status == "FINISHED"
    (state,) = tmp_path.glob(f"states/*/{first.run_id}/state-step00000002.pt")
    second = in_process(tmp_path, "second", monkeypatch, "train.max_steps=4", f"train.resume={state}", *variant)
    assert second.status == "FINISHED" and second.run_id != first.run_id  # the finished run stays as it was
    assert [s for s, _ in loss_history(tmp_path, second.run_id)] == [3, 4]
    assert loss_history(tmp_path, second.run_id) == loss_history(tmp_path, first.run_id)[2:]
    a, b = load_file(str(first.files["kohya"])), load_file(str(second.files["kohya"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tags = client_of(tmp_path).get_run(second.run_id).data.tags
    assert tags["lora_sweep.resumed_from"] == str(state) and "lora_sweep.resume_changed" not in tags
    if "sampling.every=2" in variant:  # img/drift compares with step 0's samples, kept with the states: read back
        drift = [{m.step: m.value for m in client_of(tmp_path).get_metric_history(run.run_id, "img/drift")}
                 for run in (first, second)]
        assert sorted(drift[0]) == [0, 2, 4] and drift[0][0] == 0.0 and list(drift[1]) == [4]
        assert drift[1][4] == drift[0][4] > 0


def test_a_state_resumed_with_a_new_lr_and_schedule_trains_at_them_and_says_so(tmp_path, monkeypatch, caplog):
    """Run A (lr 1e-4, cosine over 3 steps) resumed from its state of step 1 with optimizer.lr=5e-5 and
    train.max_steps=4: steps 2-4 log train/lr = 5e-5 x the cosine factor over 4 steps, the run's params say what
    trained, its tag what the state was trained with. Before that, a plain run of the new config starts fresh and
    names A's state as one it could continue."""
    new_store(tmp_path / "mlflow.db")
    from lora_sweep.config import config_hash
    from lora_sweep.job.run import plan_resume
    from lora_sweep.paths import make_paths_absolute
    from lora_sweep.training.schedules import lr_multiplier

    cosine = ("optimizer.scheduler=cosine", "train.keep_states=3")
    first = in_process(tmp_path, "first", monkeypatch, "train.max_steps=3", *cosine)
    (state,) = tmp_path.glob(f"states/*/{first.run_id}/state-step00000001.pt")
    assert [m.value for m in sorted(client_of(tmp_path).get_metric_history(first.run_id, "train/lr"),
                                    key=lambda m: m.step)] == [1e-4 * lr_multiplier("cosine", s, warmup_steps=0,
                                                                                    total_steps=3) for s in (1, 2, 3)]

    new = (*cosine, "optimizer.lr=5e-5", "train.max_steps=4")
    cfg = compose_config(*overrides(tmp_path, *new))
    make_paths_absolute(cfg)
    client = client_of(tmp_path)
    with caplog.at_level("INFO", logger="lora_sweep.job.run"):
        plan = plan_resume(cfg, client, client.get_experiment_by_name("lora-sweep").experiment_id, config_hash(cfg),
                           tmp_path / "states")
    assert plan == (None, None, "")
    (final_state,) = tmp_path.glob(f"states/*/{first.run_id}/state-step00000003.pt")  # the newest of A's states
    assert ("differing only in settings a resume follows exists (optimizer.lr 0.0001 -> 5e-05; train.lr 0.0001 -> "
            f"5e-05; train.max_steps 3 -> 4); to continue it instead: train.resume={final_state}") in caplog.text

    second = in_process(tmp_path, "second", monkeypatch, *new, f"train.resume={state}")
    assert second.status == "FINISHED"
    lrs = {m.step: m.value for m in client.get_metric_history(second.run_id, "train/lr")}
    assert lrs == {s: 5e-5 * lr_multiplier("cosine", s, warmup_steps=0, total_steps=4) for s in (2, 3, 4)}
    assert lrs[2] == 2.5e-05  # A trained its step 2 at 2.5e-05 too: 1e-4 x 0.25 (3 steps), now 5e-5 x 0.5 (4 steps)
    run = client.get_run(second.run_id)
    assert (run.data.params["optimizer.lr"], run.data.params["train.lr"]) == ("5e-05", "5e-05")
    assert run.data.params["train.max_steps"] == "4"
    assert run.data.tags["lora_sweep.resume_changed"] == ("optimizer.lr 0.0001 -> 5e-05; train.lr 0.0001 -> 5e-05; "
                                                          "train.max_steps 3 -> 4")

    # A state records the files it trained on: other files are refused, whatever the settings.
    assert read_meta(state)["dataset"] == run.data.tags["lora_sweep.dataset"]
    resumed = compose_config(*overrides(tmp_path, *new, f"train.resume={state}"))
    with pytest.raises(UserError, match=r"dataset \w{16} -> 0{16} \(images or captions changed: the state's position"):
        plan_resume(resumed, client, run.info.experiment_id, config_hash(resumed), tmp_path / "states", "0" * 16)
    client.set_terminated(first.run_id, "KILLED")  # A as a stopped run, which a rerun of its config continues
    rerun = compose_config(*overrides(tmp_path, "train.max_steps=3", *cosine))
    plan = (rerun, client, run.info.experiment_id, config_hash(rerun), tmp_path / "states")
    assert plan_resume(*plan, read_meta(state)["dataset"]) == (final_state, first.run_id, "")
    with caplog.at_level("INFO", logger="lora_sweep.job.run"):
        assert plan_resume(*plan, "0" * 16) == (None, None, "")  # other files: a fresh start, with a warning
    assert f"not resuming {final_state}: it trained on other files" in caplog.text


def test_ctrl_c_stops_cleanly_with_a_state_and_the_rerun_continues_the_same_run(tmp_path, monkeypatch):
    """The first SIGINT ends the step in progress, writes a state there (not only at save_every) and ends KILLED; the
    next run of the config continues that run to the end, each step logged once, and tags what it set otherwise."""
    new_store(tmp_path / "mlflow.db")
    def interrupt_after_state_3():
        deadline = time.monotonic() + 120
        while newest_state_step(tmp_path / "states") < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread, inside run_job's handler

    threading.Thread(target=interrupt_after_state_3, daemon=True).start()
    stopped = in_process(tmp_path, "first", monkeypatch, "train.save_every=3")
    assert stopped.status == "KILLED" and stopped.reason == "stopped by SIGINT"
    logged = [s for s, _ in loss_history(tmp_path, stopped.run_id)]
    assert logged == list(range(1, logged[-1] + 1)) and 3 < logged[-1] < STEPS
    assert newest_state_step(tmp_path / "states") == logged[-1]  # a state where it stopped

    again = in_process(tmp_path, "second", monkeypatch, "train.save_every=4")  # not hashed: the same config
    assert again.status == "FINISHED" and again.run_id == stopped.run_id
    run = client_of(tmp_path).get_run(again.run_id)
    assert run.data.params["train.save_every"] == "3"  # MLflow keeps a run's first params
    assert run.data.tags["lora_sweep.resume_changed"] == "train.save_every 3 -> 4"
    assert [s for s, _ in loss_history(tmp_path, again.run_id)] == list(range(1, STEPS + 1))
