"""One job's truth in MLflow, in this process on the tiny model: a set-up failure inside a sweep is a FAILED child
run, skip-finished looks at the dataset, and a config being trained elsewhere is waited for or skipped."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose_config
from mlflow.tracking import MlflowClient
from PIL import Image

from hydra_plugins._job_outcome import read_status, status_path
from lora_sweep.config import config_hash
from lora_sweep.errors import UserError
from lora_sweep.job.names import write_swept_keys
from lora_sweep.job.run import run_job
from lora_sweep.paths import make_paths_absolute
from lora_sweep.tracking.store import FAILURE, PARENT_FILE, PID, ROLE, experiment_id


def tiny(tmp_path: Path, *overrides: str):
    return compose_config("train.max_steps=1", "train.device=cpu", f"train.state_dir={tmp_path / 'states'}",
                          *overrides)


def make_dataset(folder: Path, seed: int, caption: str = "a photo of a thing") -> Path:
    """Two 64 px images with captions in kohya's layout."""
    rng = np.random.default_rng(seed)
    subset = folder / "2_thing"
    subset.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(subset / f"img{i}.png")
        (subset / f"img{i}.txt").write_text(caption)
    return folder


def fail_set_up(*args, **kwargs):
    raise UserError("this job's set-up failed on purpose")


def test_a_set_up_failure_in_a_sweep_is_a_failed_child_run_with_its_reason(tmp_path, mlflow_uri, monkeypatch):
    """A failure after the checks and before the run exists (here the resume plan raises): a FAILED child run of
    the sweep carries it, and the job's status file names that run; without a parent, the status file says it."""
    client = MlflowClient(mlflow_uri)
    exp = experiment_id(client, "lora-sweep")
    parent = client.create_run(exp, run_name="sweep", tags={ROLE: "sweep"}).info.run_id
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / PARENT_FILE).write_text(parent)
    write_swept_keys(sweep_dir, ["train.seed"])
    overrides = ["train.seed=7", "train.max_steps=1"]
    monkeypatch.setattr("lora_sweep.job.run.plan_resume", fail_set_up)
    with pytest.raises(UserError, match="failed on purpose"):
        run_job(tiny(tmp_path, *overrides), output_dir=sweep_dir / "3_x", sweep_dir=sweep_dir, overrides=overrides,
                job_num=3)
    (run,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert run.info.status == "FAILED" and run.info.run_name == "train.seed=7"
    assert "set-up failed on purpose" in run.data.tags[FAILURE]
    assert run.data.tags["lora_sweep.overrides"] == " ".join(overrides)
    assert run.data.tags[PID] and run.data.params["train.max_steps"] == "1"
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    status = read_status(status_path(sweep_dir, 3))  # no launcher gave it a path: it keeps its own there
    assert status["label"] == "train.seed=7" and status["run_id"] == run.info.run_id and "reason" not in status

    (sweep_dir / PARENT_FILE).unlink()  # no parent run to hang a FAILED run on: the status file is the record
    with pytest.raises(UserError):
        run_job(tiny(tmp_path, *overrides), output_dir=sweep_dir / "4_x", sweep_dir=sweep_dir, overrides=overrides,
                job_num=4)
    status = read_status(status_path(sweep_dir, 4))
    assert status["state"] == "failed" and "failed on purpose" in status["reason"] and status["user_error"]


def test_skip_finished_keys_on_the_dataset_not_only_the_config(tmp_path, mlflow_uri, monkeypatch, caplog):
    caplog.set_level("INFO", logger="lora_sweep")
    first_home, other_home = tmp_path / "a", tmp_path / "b"
    make_dataset(first_home / "data", seed=1)
    make_dataset(other_home / "data", seed=2)  # another dataset at the same relative path
    args = ("data=folder", "data.dir=data")  # relative: resolved against the folder the job starts in

    monkeypatch.chdir(first_home)
    first = run_job(tiny(tmp_path, *args), output_dir=tmp_path / "out1")
    assert first.status == "FINISHED"
    run = MlflowClient(mlflow_uri).get_run(first.run_id)
    assert "config.yaml" in {a.path for a in MlflowClient(mlflow_uri).list_artifacts(first.run_id)}
    assert {a.path for a in MlflowClient(mlflow_uri).list_artifacts(first.run_id, "kohya")} == {
        "kohya/command.sh", "kohya/config.toml", "kohya/dataset.toml"}
    assert f'image_dir = "{first_home}/data/' in (tmp_path / "out1" / "kohya" / "dataset.toml").read_text()
    again = run_job(tiny(tmp_path, *args), output_dir=tmp_path / "out2")
    assert again.status == "SKIPPED" and again.run_id == first.run_id
    assert run.data.tags["lora_sweep.dataset"] in again.reason and "2_thing" not in again.reason
    hashed = tiny(tmp_path, *args)
    make_paths_absolute(hashed)  # as run_job does: the hash holds the path the user meant
    assert f"config {config_hash(hashed)}" in again.reason and "4 files in" in again.reason

    monkeypatch.chdir(other_home)
    elsewhere = run_job(tiny(tmp_path, *args), output_dir=tmp_path / "out3")
    assert elsewhere.status == "FINISHED" and elsewhere.run_id != first.run_id

    monkeypatch.chdir(first_home)
    (first_home / "data" / "2_thing" / "img1.txt").write_text("a photo of a thing, fixed caption")
    edited = run_job(tiny(tmp_path, *args), output_dir=tmp_path / "out4")
    assert edited.status == "FINISHED" and edited.run_id not in (first.run_id, elsewhere.run_id)
    assert "its dataset was" in caplog.text and "training again" in caplog.text


HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from lora_sweep.training.checkpoint import ConfigLock
    lock = ConfigLock(Path(sys.argv[1]))
    assert lock.try_acquire()
    lock.note(run_id="run-held-elsewhere")
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
""").format(root=str(ROOT))


def hold_lock(folder: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_config_trained_elsewhere_is_skipped_or_waited_for(tmp_path, mlflow_uri, caplog):
    caplog.set_level("INFO", logger="lora_sweep")
    cfg = tiny(tmp_path, "sweep.on_busy=skip")
    folder = tmp_path / "states" / config_hash(cfg)
    holder = hold_lock(folder, 60)
    try:
        skipped = run_job(cfg, output_dir=tmp_path / "out1")
    finally:
        holder.kill()
        holder.wait()
    assert skipped.status == "SKIPPED" and skipped.run_id is None
    assert f"being trained by process {holder.pid}" in skipped.reason and "run-held-elsewhere" in skipped.reason
    assert "sweep.on_busy=wait" in skipped.reason

    holder = hold_lock(folder, 3)
    start = time.monotonic()
    waited = run_job(tiny(tmp_path), output_dir=tmp_path / "out2")  # sweep.on_busy=wait, the default
    holder.wait()
    assert waited.status == "FINISHED" and time.monotonic() - start >= 2.0
    assert f"is being trained by process {holder.pid}" in caplog.text and "waiting for it" in caplog.text


def test_a_gpu_slot_without_a_cuda_device_is_refused_and_elsewhere_trains_on_the_cpu_saying_so(
        tmp_path, mlflow_uri, monkeypatch):
    """CUDA_VISIBLE_DEVICES names a GPU, torch (here, a CPU machine) sees none, train.device=auto: in a gpu_queue GPU
    slot the job is refused before the model loads; outside the queue (a Slurm allocation, a shell) it trains on
    the CPU with a warning logged on its run."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("GPU_QUEUE_SLOT", "0")
    with pytest.raises(UserError, match=r"in a GPU slot .*torch sees no CUDA device.*hydra\.launcher\.gpus=\[\]"):
        run_job(compose_config("train.max_steps=1", f"train.state_dir={tmp_path / 'states'}"),
                output_dir=tmp_path / "refused")
    assert not list((tmp_path / "states").glob("*/*/state-*.pt"))

    monkeypatch.delenv("GPU_QUEUE_SLOT")
    outcome = run_job(compose_config("train.max_steps=1", f"train.state_dir={tmp_path / 'states'}"),
                      output_dir=tmp_path / "cpu")
    assert outcome.status == "FINISHED"
    run = MlflowClient(mlflow_uri).get_run(outcome.run_id)
    assert run.data.params["data.warnings"] == "1" and run.data.tags["gpu"] == "0"
    warnings = (tmp_path / "cpu" / "warnings.txt").read_text()
    assert warnings.startswith("train.device: 1 GPU named by CUDA_VISIBLE_DEVICES that torch cannot use: '0'.")
    assert "trains on the CPU" in warnings

    monkeypatch.setenv("GPU_QUEUE_SLOT", "0")  # train.device=cpu is a choice: neither refused nor warned about
    from lora_sweep.training.session import check_device

    assert check_device(compose_config("train.device=cpu")) is None
    assert check_device(compose_config(), {"CUDA_VISIBLE_DEVICES": "", "GPU_QUEUE_SLOT": "1"}) is None  # CPU slot
    import torch

    if not torch.cuda.is_available():  # train.device=cuda here: refused before the model loads
        with pytest.raises(UserError, match=r"^train\.device=cuda, but torch .* sees no CUDA device"):
            check_device(compose_config("train.device=cuda"), {})


def test_a_truncated_image_skipped_while_loading_counts_in_the_runs_warnings(tmp_path, mlflow_uri):
    """A valid header with truncated pixels passes the header scan; skipped at load, it was only a log line."""
    make_dataset(tmp_path / "ds", seed=0)
    whole = (tmp_path / "ds" / "2_thing" / "img1.png").read_bytes()
    (tmp_path / "ds" / "2_thing" / "img1.png").write_bytes(whole[:300])  # noise: thousands of bytes in all
    outcome = run_job(compose_config("train.max_steps=1", "data=folder", f"data.dir={tmp_path / 'ds'}",
                                     f"train.state_dir={tmp_path / 'states'}", f"data.cache_dir={tmp_path / 'cache'}"),
                      output_dir=tmp_path / "out")
    assert outcome.status == "FINISHED", outcome.reason
    run = MlflowClient(mlflow_uri).get_run(outcome.run_id)
    assert run.data.params["data.warnings"] == "1" and run.data.params["data.skipped_images"] == "1"
    warnings = (tmp_path / "out" / "warnings.txt").read_text()
    assert warnings.startswith("data.dir: 1 image whose pixels failed to decode") and "img1.png" in warnings


def test_the_optimizer_params_record_what_the_optimizer_ran_with(tmp_path, mlflow_uri):
    """optimizer.optimizer_args values and Adafactor's relative_step rewrite show in the params, not the composed
    config's values (the table and compare read params)."""
    from lora_sweep.job.run import run_params

    outcome = run_job(tiny(tmp_path, 'optimizer.optimizer_args=["weight_decay=0.1","betas=(0.9,0.99)"]'),
                      output_dir=tmp_path / "out")
    assert outcome.status == "FINISHED", outcome.reason
    params = MlflowClient(mlflow_uri).get_run(outcome.run_id).data.params
    assert params["optimizer.args.weight_decay"] == "0.1" and params["optimizer.args.betas"] == "[0.9, 0.99]"
    assert params["optimizer.args.eps"] == "1e-08" and params["optimizer.scheduler"] == "constant"

    default = run_params(compose_config("optimizer=adafactor"))
    assert default["optimizer.scheduler"] == "adafactor:0.0001" and default["train.lr"] is None
    assert default["optimizer.args.relative_step"] is True and default["optimizer.args.eps"] == [1e-30, 1e-3]
    preset = run_params(compose_config("optimizer=adafactor", "optimizer.scheduler=constant_with_warmup",
                                       'optimizer.optimizer_args=["scale_parameter=False","relative_step=False",'
                                       '"warmup_init=False"]'))
    assert preset["optimizer.args.relative_step"] is False and preset["optimizer.args.scale_parameter"] is False
    assert preset["optimizer.scheduler"] == "constant_with_warmup" and preset["train.lr"] == 1e-4
    forced = run_params(compose_config("optimizer=adafactor", 'optimizer.optimizer_args=["relative_step=False",'
                                       '"warmup_init=True"]'))  # kohya turns relative_step back on
    assert forced["optimizer.args.relative_step"] is True and forced["optimizer.scheduler"] == "adafactor:0.0001"
