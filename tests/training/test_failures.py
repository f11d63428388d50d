"""Every way a run can fail ends with a clear reason, keeps what was saved, and fails as early as it can."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import time
from pathlib import Path

import pytest
import torch
from cluster_fixtures import free_port
from conftest import compose_config
from mlflow.tracking import MlflowClient

from lora_sweep.errors import UserError, is_out_of_memory
from lora_sweep.job.run import run_job
from lora_sweep.training import checkpoint
from lora_sweep.training import train as train_module
from lora_sweep.training.failures import (
    check_free_space,
    describe_os_error,
    out_of_memory_message,
)


def tiny_job(tmp_path: Path, *overrides: str, output: str = "out"):
    cfg = compose_config("train.max_steps=4", "train.batch_size=2", "train.save_every=1",
                         f"train.state_dir={tmp_path / 'states'}", "train.device=cpu", *overrides)
    return run_job(cfg, output_dir=tmp_path / output)


@contextlib.contextmanager
def fault(kind: str, step: int, *, and_later: bool = False):
    """Within the block, the micro-batches of optimizer step `step` (and of every later one with `and_later`) fail
    through the loop's real paths: "nan_loss" returns a NaN loss, "inf_grad" makes backward leave an inf gradient
    in the first LoRA tensor, "oom" asks the device for 1 PiB first (a real allocation failure)."""
    real, hooks = train_module.micro_batch_loss, []

    def faulty(s, batch, flip_rng, at, **seen):
        for hook in hooks:
            hook.remove()
        hooks.clear()
        if at != step and not (and_later and at > step):
            return real(s, batch, flip_rng, at, **seen)
        if kind == "oom":
            torch.empty(2**50, dtype=torch.uint8, device=s.device)
        if kind == "inf_grad":
            hooks.append(next(iter(s.lora.values())).register_hook(lambda grad: torch.full_like(grad, float("inf"))))
        terms = real(s, batch, flip_rng, at, **seen)
        return dataclasses.replace(terms, loss=terms.loss * float("nan")) if kind == "nan_loss" else terms

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "micro_batch_loss", faulty)
        yield


def test_nan_loss_fails_the_run_naming_step_and_tensor_and_keeps_the_last_good_state(tmp_path, mlflow_uri):
    with fault("nan_loss", 3):
        outcome = tiny_job(tmp_path)
    assert outcome.status == "FAILED"
    assert "train/loss is nan at optimizer step 3" in outcome.reason
    client = MlflowClient(mlflow_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FAILED" and "optimizer step 3" in run.data.tags["lora_sweep.failure"]
    states = checkpoint.list_states(next((tmp_path / "states").glob(f"*/{outcome.run_id}")))
    assert [p.name for p in states] == ["state-step00000001.pt", "state-step00000002.pt"]
    assert str(states[-1]) in outcome.reason  # the message says which state is kept
    assert checkpoint.load_state(states[-1])["position"]["step"] == 2

    # The same config again: it resumes the failed run at step 2 and finishes it, each step logged once.
    again = tiny_job(tmp_path, output="out2")
    assert again.status == "FINISHED" and again.run_id == outcome.run_id
    assert [m.step for m in client.get_metric_history(again.run_id, "train/loss")] == [1, 2, 3, 4]


def test_non_finite_gradient_names_the_tensor_or_skips_the_step(tmp_path, mlflow_uri):
    with fault("inf_grad", 2):
        failed = tiny_job(tmp_path, "train.save_every=0")
    assert failed.status == "FAILED"
    assert "gradient of unet." in failed.reason and "lora_" in failed.reason and "step 2" in failed.reason
    assert "no state had been saved yet" in failed.reason

    with fault("inf_grad", 2):
        skipped = tiny_job(tmp_path, "train.on_nan=skip_step", "train.resume=never")
    assert skipped.status == "FINISHED"
    history = MlflowClient(mlflow_uri).get_metric_history(skipped.run_id, "train/skipped_steps")
    assert sorted((m.step, m.value) for m in history) == [(1, 0), (2, 1), (3, 1), (4, 1)]


def test_skip_step_fails_the_run_after_a_bounded_run_of_skipped_steps(tmp_path, mlflow_uri):
    """A diverged training under train.on_nan=skip_step does not skip to the end and finish: it fails at the bound,
    naming the setting; a bound of 1 allows no skipped step."""
    with fault("inf_grad", 2, and_later=True):
        failed = tiny_job(tmp_path, "train.on_nan=skip_step", "train.max_steps=8", "train.max_consecutive_skips=3")
    assert failed.status == "FAILED"
    assert "skipped 3 optimizer steps in a row (steps 2-4; train.max_consecutive_skips=3)" in failed.reason
    assert str(checkpoint.list_states(next((tmp_path / "states").glob(f"*/{failed.run_id}")))[-1]) in failed.reason
    run = MlflowClient(mlflow_uri).get_run(failed.run_id)
    assert run.info.status == "FAILED" and "train.max_consecutive_skips" in run.data.tags["lora_sweep.failure"]
    history = MlflowClient(mlflow_uri).get_metric_history(failed.run_id, "train/skipped_steps")
    assert max(m.step for m in history) == 3  # step 4's metrics never logged: it failed there

    with fault("inf_grad", 2):
        strict = tiny_job(tmp_path, "train.on_nan=skip_step", "train.resume=never", "train.max_consecutive_skips=1",
                          "sweep.skip_finished=false")
    assert strict.status == "FAILED" and "skipped 1 optimizer steps in a row" in strict.reason  # 1: no skip at all


def test_fp16_overflows_are_skipped_by_the_loss_scaler_and_do_not_count_as_non_finite(tmp_path, mlflow_uri):
    """Under fp16 an inf gradient is what an overflow leaves: the loss scaler skips that update and halves its
    scale; train.on_nan is not involved (a bound of 1 would fail the run at a counted skip)."""
    with fault("inf_grad", 2):
        outcome = tiny_job(tmp_path, "precision=fp16", "train.on_nan=skip_step", "train.max_consecutive_skips=1")
    assert outcome.status == "FINISHED"
    client = MlflowClient(mlflow_uri)
    skipped = sorted((m.step, m.value) for m in client.get_metric_history(outcome.run_id, "train/skipped_steps"))
    assert skipped == [(1, 0), (2, 1), (3, 1), (4, 1)]
    scale = dict((m.step, m.value) for m in client.get_metric_history(outcome.run_id, "train/loss_scale"))
    assert scale[2] == scale[1] / 2 and scale[3] == scale[2]


def test_out_of_memory_fails_the_job_with_the_memory_knobs_and_returns(tmp_path, mlflow_uri, monkeypatch):
    status_file = tmp_path / "status.json"
    monkeypatch.setenv("GPU_QUEUE_STATUS_FILE", str(status_file))
    with fault("oom", 2):  # a real allocation the device cannot satisfy
        outcome = tiny_job(tmp_path)
    assert outcome.status == "FAILED"  # returned, not raised: the queue moves on to the next job
    assert outcome.reason.startswith("OutOfMemoryError: out of memory during training")
    for knob in ("precision=fp8", "train.gradient_checkpointing=true", "train.batch_size=1 train.grad_accum=2"):
        assert knob in outcome.reason
    assert "The last saved state is kept (" in outcome.reason and "state-step00000001.pt)" in outcome.reason
    status = json.loads(status_file.read_text())  # live progress; the run (below) is the record of the failure
    assert status["run_id"] == outcome.run_id and "reason" not in status
    run = MlflowClient(mlflow_uri).get_run(outcome.run_id)
    assert run.info.status == "FAILED" and "gradient_checkpointing" in run.data.tags["lora_sweep.failure"]


def test_out_of_memory_message_from_cuda_error_suggests_only_knobs_not_in_use():
    cuda_error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total)")
    assert is_out_of_memory(cuda_error) and not is_out_of_memory(RuntimeError("shape mismatch"))
    cfg = compose_config("precision=fp8", "train.gradient_checkpointing=true", "train.batch_size=1")
    message = out_of_memory_message(cfg, cuda_error)
    assert "Tried to allocate 2.00 GiB" in message
    assert "precision=fp8" not in message and "gradient_checkpointing" not in message  # already on
    assert "network.rank" in message and "No state had been saved yet" in message  # none given: none claimed
    assert "cached text embeddings" not in message
    # any caption option that changes captions per step keeps the text encoders on the GPU, not only the shuffle
    dropout = out_of_memory_message(compose_config("data.caption_dropout_rate=0.1"), cuda_error)
    assert "captions that do not change per step (now data.caption_dropout_rate=0.1:" in dropout
    kept = out_of_memory_message(cfg, cuda_error, Path("/states/state-step00000002.pt"))
    assert kept.endswith("The last saved state is kept (/states/state-step00000002.pt): the next run of this config "
                         "resumes from it (train.resume=auto).")


def test_out_of_memory_while_sampling_names_the_prompt_and_its_size_not_training_knobs(tmp_path, mlflow_uri,
                                                                                        monkeypatch):
    """`--w 100000 --h 100000` runs out of memory while sampling at step 0: the failure names the prompt and its size,
    not training knobs (precision, gradient checkpointing, rank), and claims no saved state that was never written."""
    from lora_sweep.sampling import images as sampling

    real = sampling.build_pipeline

    def out_of_memory_pipeline(**parts):
        pipe = real(**parts)  # the real pipeline is built (its encoders encode the prompt); only drawing runs out

        class Pipeline:
            def __getattr__(self, name):
                return getattr(pipe, name)

            def __call__(self, **kwargs):  # what the allocator says for 100000x100000 latents
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 37.25 GiB (GPU 0; 23.6 GiB "
                                             "total)")
        return Pipeline()

    monkeypatch.setattr(sampling, "build_pipeline", out_of_memory_pipeline)
    prompt_file = tmp_path / "p6.txt"
    prompt_file.write_text("# big\na car --w 100000 --h 100000 --s 2\n", encoding="utf-8")
    outcome = tiny_job(tmp_path, "sampling.prompts=[]", f"sampling.prompt_file={prompt_file}")
    assert outcome.status == "FAILED"
    assert outcome.reason == (
        f"OutOfMemoryError: out of memory while sampling prompt 1 of 1 (sampling.prompt_file '{prompt_file}', line 2: "
        "100000x100000, 2 steps) (CUDA out of memory. Tried to allocate 37.25 GiB (GPU 0; 23.6 GiB total)). Training "
        "did not run out: this sample did, and its memory grows with its size. Lower that prompt's --w/--h in "
        f"sampling.prompt_file '{prompt_file}', line 2 (sampling.width/sampling.height for prompts without them; --s "
        "and sampling.steps set the time, not the memory). No state had been saved yet: the next run of this config "
        "starts from step 0.")
    run = MlflowClient(mlflow_uri).get_run(outcome.run_id)
    assert run.info.status == "FAILED" and "while sampling prompt 1 of 1" in run.data.tags["lora_sweep.failure"]


def make_read_only(folder: Path):
    """A folder no one can write to: permissions for a normal user; a read-only mount for root (who ignores
    permissions)."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    import subprocess

    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs: {done.stderr.decode().strip()}")
    return lambda: subprocess.run(["umount", str(folder)], check=True)


def test_read_only_output_folder_fails_before_training_naming_it(tmp_path, mlflow_uri):
    read_only = tmp_path / "read_only"
    undo = make_read_only(read_only)
    try:
        start = time.perf_counter()
        with pytest.raises(UserError) as err:
            tiny_job(tmp_path, output="read_only/out")
        assert time.perf_counter() - start < 10  # no model was loaded
    finally:
        undo()
    assert "train.output_dir" in str(err.value) and str(read_only / "out") in str(err.value)
    exp = MlflowClient(mlflow_uri).get_experiment_by_name("lora-sweep")
    assert exp is None or not MlflowClient(mlflow_uri).search_runs([exp.experiment_id])  # no run was started


def test_not_enough_free_space_names_the_folders(tmp_path):
    import shutil

    (tmp_path / "out").mkdir()
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(UserError) as err:  # each fits alone; together (one disk) they do not
        check_free_space({tmp_path: ("train.state_dir", free // 2), tmp_path / "out": ("train.output_dir", free // 2)})
    assert "train.state_dir" in str(err.value) and "train.output_dir" in str(err.value)
    assert str(tmp_path / "out") in str(err.value)
    check_free_space({tmp_path: ("train.state_dir", 1024)})


def test_disk_full_mid_run_message_names_the_file():
    message = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/data/states/state-step1.pt"))
    assert "disk full" in message and "/data/states/state-step1.pt" in message and "resumes" in message


def test_a_full_disk_in_any_writer_is_one_paragraph_naming_the_file_and_what_was_saved(tmp_path):
    from lora_sweep.atomic import write_with
    from lora_sweep.errors import disk_full_error
    from lora_sweep.training.failures import failure_reason

    rust = RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")  # safetensors'
    assert disk_full_error(RuntimeError("wrapped")) is None
    assert disk_full_error(rust).errno == errno.EDQUOT
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "lora-step00000001.safetensors").write_bytes(b"saved")

    def quota(path):
        path.write_bytes(b"half")
        raise rust

    with pytest.raises(OSError) as raised:  # the atomic writer names the target and leaves no half file
        write_with(tmp_path / "out" / "lora-step00000002.safetensors", quota)
    assert raised.value.filename == str(tmp_path / "out" / "lora-step00000002.safetensors")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lora-step00000001.safetensors"]
    cfg = compose_config(f"data.cache_dir={tmp_path / 'cache'}")
    reason = failure_reason(cfg, raised.value, tmp_path / "state-step00000001.pt", tmp_path / "out")
    assert reason.startswith(f"OSError: disk full (disk quota exceeded) while writing "
                             f"'{tmp_path / 'out' / 'lora-step00000002.safetensors'}' (train.output_dir). Now: ")
    assert f"Saved: '{tmp_path / 'out' / 'lora-step00000001.safetensors'}'. The last saved state is kept " \
           f"({tmp_path / 'state-step00000001.pt'})" in reason and "Traceback" not in reason


@pytest.fixture
def fast_http_failures(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def test_unreachable_tracking_server_at_start_names_the_uri(tmp_path, mlflow_uri, fast_http_failures):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        tiny_job(tmp_path, f"tracking.uri={uri}")
    assert uri in str(err.value) and "tracking.uri" in str(err.value)
    assert time.perf_counter() - start < 30
