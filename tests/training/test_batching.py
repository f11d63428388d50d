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
    with safe_open(str(out / "lora-000002.safetensors"), "pt") as f:
        assert f.metadata()["ss_epoch"] == "2" and f.metadata()["ss_steps"] == "4"
    for name in written:  # every file carries each module's alpha (network.alpha 1), which its consumers read
        with safe_open(str(out / name), "pt") as f:
            downs = [k for k in f.keys() if k.endswith(".lora_down.weight")]
            assert downs and {f.get_tensor(k.replace(".lora_down.weight", ".alpha")).item() for k in downs} == {1.0}
    logged = {Path(a.path).name for a in MlflowClient(mlflow_uri).list_artifacts(outcome.run_id, "lora/checkpoints")}
    assert logged == {"lora-000001.safetensors", "lora-000002.safetensors", "lora-step00000004.safetensors"}
