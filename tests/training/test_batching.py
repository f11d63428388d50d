"""Batching as kohya counts it: max_steps counts optimizer updates, a partial accumulation at an epoch's end still
steps, and epoch/step checkpoints carry sd-scripts' names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import compose_config
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors import safe_open

from lora_sweep.job.run import run_job


def square_dataset(root: Path, repeats: int, images: int = 2) -> Path:
    """`images` 64x64 pictures (one bucket, so every batch is full) in kohya's `<repeats>_<name>` layout."""
    folder = root / "data" / f"{repeats}_thing"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of thing {i}")
    return root / "data"


def train(tmp_path: Path, data: Path, *overrides: str):
    cfg = compose_config("data=folder", f"data.dir={data}", "train.batch_size=2", "train.grad_accum=2",
                         f"train.state_dir={tmp_path / 'states'}", "train.device=cpu", *overrides)
    return run_job(cfg, output_dir=tmp_path / "out")


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def metadata(path: Path, *keys: str) -> tuple[str, ...]:
    with safe_open(str(path), "pt") as f:
        return tuple(f.metadata()[k] for k in keys)


def test_batch_2_accumulation_2_for_3_steps_sees_12_images_in_3_logged_steps(tmp_path, mlflow_uri):
    outcome = train(tmp_path, square_dataset(tmp_path, repeats=10), "train.max_steps=3")  # 20 entries: 10 batches
    assert outcome.status == "FINISHED"
    assert history(mlflow_uri, outcome.run_id, "train/images_seen") == [(1, 4), (2, 8), (3, 12)]
    assert [s for s, _ in history(mlflow_uri, outcome.run_id, "train/loss")] == [1, 2, 3]
    assert {v for _, v in history(mlflow_uri, outcome.run_id, "train/epoch")} == {1}
    with safe_open(str(outcome.files["kohya"]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "3" and meta["ss_total_batch_size"] == "4" and meta["ss_epoch"] == "1"


def test_partial_accumulation_at_epoch_end_steps_and_checkpoints_follow_sd_scripts_names(tmp_path, mlflow_uri):
    # 6 entries in batches of 2 = 3 micro-batches per epoch; with accumulation 2 an epoch is 2 optimizer steps,
    # the second made of a single micro-batch. 6 steps = 3 epochs.
    data = square_dataset(tmp_path, repeats=3)
    outcome = train(tmp_path, data, "train.max_steps=6", "train.save_every_epochs=1", "train.save_every=4")
    assert outcome.status == "FINISHED"
    seen = history(mlflow_uri, outcome.run_id, "train/images_seen")
    assert seen == [(1, 4), (2, 6), (3, 10), (4, 12), (5, 16), (6, 18)]
    assert history(mlflow_uri, outcome.run_id, "train/epoch") == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)]

    out = tmp_path / "out"
    written = sorted(p.name for p in out.glob("lora*.safetensors"))
    # Epoch files after epochs 1 and 2, not after the last (the final file is that one); a step file at step 4.
    assert written == ["lora-000001.safetensors", "lora-000002.safetensors", "lora-step00000004.safetensors",
                       "lora.safetensors"]
    # ss_epoch as v0.8.7 writes it: the 1-based epoch in an epoch file, the 0-based loop epoch in a step file,
    # num_train_epochs in the final file
    assert metadata(out / "lora-000002.safetensors", "ss_epoch", "ss_steps") == ("2", "4")
    assert metadata(out / "lora-step00000004.safetensors", "ss_epoch", "ss_steps") == ("1", "4")
    assert metadata(out / "lora.safetensors", "ss_epoch", "ss_num_epochs", "ss_steps") == ("3", "3", "6")
    for name in written:  # every file carries each module's alpha (network.alpha 1), which its consumers read
        with safe_open(str(out / name), "pt") as f:
            downs = [k for k in f.keys() if k.endswith(".lora_down.weight")]
            assert downs and {f.get_tensor(k.replace(".lora_down.weight", ".alpha")).item() for k in downs} == {1.0}
    logged = {Path(a.path).name for a in MlflowClient(mlflow_uri).list_artifacts(outcome.run_id, "lora/checkpoints")}
    assert logged == {"lora-000001.safetensors", "lora-000002.safetensors", "lora-step00000004.safetensors"}


def test_epochs_become_steps_and_a_resumed_run_keeps_deleting_outside_the_save_windows(tmp_path, mlflow_uri):
    """6 entries in batches of 2 with accumulation 2: 2 steps an epoch, so 2 epochs are 4 steps. Step files every
    step with save_last_n_steps 2 keep steps s-2..s; epoch files with save_last_n_epochs 1 keep the last one. Resumed
    from step 4 with 3 epochs (6 steps), the new process deletes the step files the first one wrote."""
    data = square_dataset(tmp_path, repeats=3)
    saving = ["train.save_every=1", "train.keep_states=1", "train.save_last_n_steps=2", "train.save_every_epochs=1",
              "train.save_last_n_epochs=1", "train.save_precision=fp16"]
    first = train(tmp_path, data, "train.max_train_epochs=2", "train.max_steps=100", *saving)
    assert first.status == "FINISHED"
    assert [s for s, _ in history(mlflow_uri, first.run_id, "train/loss")] == [1, 2, 3, 4]
    params = MlflowClient(mlflow_uri).get_run(first.run_id).data.params
    assert (params["train.max_steps"], params["train.max_train_epochs"]) == ("4", "2")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("lora*.safetensors")) == [
        "lora-000001.safetensors", "lora-step00000002.safetensors", "lora-step00000003.safetensors",
        "lora-step00000004.safetensors", "lora.safetensors"]
    assert metadata(out / "lora.safetensors", "ss_max_train_steps", "ss_num_epochs", "ss_epoch") == ("4", "2", "2")
    logged = {Path(a.path).name for a in MlflowClient(mlflow_uri).list_artifacts(first.run_id, "lora/checkpoints")}
    assert len(logged) == 5  # MLflow keeps every file the run logged: steps 1-4 and epoch 1
    for path in [*out.glob("lora*.safetensors"), out / "diffusers" / "pytorch_lora_weights.safetensors"]:
        with safe_open(str(path), "pt") as f:  # train.save_precision: every tensor, alpha included
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path.name

    (state,) = (tmp_path / "states").glob("*/*/state-step00000004.pt")
    resumed = train(tmp_path, data, "train.max_train_epochs=3", f"train.resume={state}", *saving)
    assert resumed.status == "FINISHED"
    assert [s for s, _ in history(mlflow_uri, resumed.run_id, "train/loss")] == [5, 6]
    assert sorted(p.name for p in out.glob("lora-step*.safetensors")) == [
        "lora-step00000004.safetensors", "lora-step00000005.safetensors", "lora-step00000006.safetensors"]
    assert metadata(out / "lora-step00000005.safetensors", "ss_epoch", "ss_num_epochs") == ("2", "3")
