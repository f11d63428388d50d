"""One real training of the tiny SDXL on the bundled photos, recorded in a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, new_store
from lora_files import assert_loads_as_kohya_merge

from lora_sweep.errors import UserError
from lora_sweep.job.run import run_job


def train_tiny(tmp_path: Path, *overrides: str):
    cfg = compose_config("train.max_steps=3", "train.batch_size=2", *overrides)
    return run_job(cfg, output_dir=tmp_path / "out")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training shared by the tests below (a few seconds on 2 cores)."""
    import os

    tmp = tmp_path_factory.mktemp("train")
    os.environ["MLFLOW_TRACKING_URI"] = new_store(tmp / "mlflow.db")
    try:
        outcome = train_tiny(tmp)
        from mlflow.tracking import MlflowClient

        yield outcome, MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), tmp
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_run_finishes_with_finite_loss_params_history_and_both_lora_files(trained):
    outcome, client, _ = trained
    assert outcome.status == "FINISHED" and np.isfinite(outcome.final_loss)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["noise.offset"] == "0.0" and run.data.params["train.max_steps"] == "3"
    assert run.data.tags["lora_sweep.role"] == "job" and len(run.data.tags["config_hash"]) == 16
    history = client.get_metric_history(outcome.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3] and all(np.isfinite(m.value) for m in history)
    assert client.get_metric_history(outcome.run_id, "train/lr")
    assert {a.path for a in client.list_artifacts(outcome.run_id, "data")} == {"data/buckets.json",
                                                                        "data/datasets.json"}  # no warnings
    assert run.data.params["data.warnings"] == "0"
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "lora")}
    assert "lora/lora.safetensors" in artifacts
    assert {a.path for a in client.list_artifacts(outcome.run_id, "lora/diffusers")} == {
        "lora/diffusers/pytorch_lora_weights.safetensors"}


def test_kohya_file_has_kohya_keys_and_metadata(trained):
    from safetensors import safe_open

    outcome, _, _ = trained
    with safe_open(str(outcome.files["kohya"]), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert any("input_blocks_4_1_transformer_blocks_0_attn1_to_q" in k for k in keys)  # SGM names, as kohya saves
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (meta["ss_network_dropout"], meta["ss_scale_weight_norms"]) == ("None", "None")  # off, as v0.8.7's defaults


def _sample(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, generator=g,
                output_type="np").images[0]


def test_kohya_lora_loads_in_diffusers_and_changes_output(trained):
    from diffusers import StableDiffusionXLPipeline

    from lora_sweep.model.loading import tiny_model_dir

    outcome, _, _ = trained
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir()))
    pipe.set_progress_bar_config(disable=True)
    base = _sample(pipe)
    # The trained LoRA's up-weights are tiny after 3 steps; scale them so the change is visible in 2 steps.
    pipe.load_lora_weights(str(outcome.files["kohya"]), adapter_name="trained")
    pipe.set_adapters(["trained"], adapter_weights=[1.0])
    with_lora = _sample(pipe)
    assert not np.array_equal(base, with_lora)
    pipe.set_adapters(["trained"], adapter_weights=[0.0])
    np.testing.assert_array_equal(_sample(pipe), base)


def test_diffusers_file_loads_at_the_kohya_files_strength(trained):
    """The run's diffusers file gives the U-Net the kohya file's merge W + alpha/r * up @ down (rank 4, alpha 1)."""
    outcome, _, _ = trained
    assert_loads_as_kohya_merge(outcome.files["diffusers"], outcome.files["kohya"])


def test_unreadable_image_is_skipped_with_warning_and_counted(tmp_path, mlflow_uri, caplog):
    from lora_sweep.data.photos import photos_dir

    data = tmp_path / "data" / "3_thing"
    data.mkdir(parents=True)
    src = photos_dir(Path(__import__("os").environ["LORA_SWEEP_CACHE_DIR"])) / "5_photo"
    for name in ["coffee", "rocket"]:
        (data / f"{name}.png").write_bytes((src / f"{name}.png").read_bytes())
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    outcome = train_tiny(tmp_path, "data=folder", f"data.dir={tmp_path / 'data'}", "train.max_steps=1")
    assert outcome.status == "FINISHED"
    assert "broken.png" in caplog.text
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    params = client.get_run(outcome.run_id).data.params
    assert params["data.skipped_images"] == "1" and params["data.images"] == "2"
    assert params["data.warnings"] == "2"  # the skip and the missing captions, in data/warnings.txt with paths
    warnings_txt = Path(client.download_artifacts(outcome.run_id, "data/warnings.txt", str(tmp_path)))
    assert "image that cannot be read: skipped" in warnings_txt.read_text()
    assert str(data / "broken.png") in warnings_txt.read_text()


def test_empty_data_folder_is_a_clear_error_and_no_run_finishes(tmp_path, mlflow_uri):
    """Refused before any MLflow run exists (the pre-flight's check), rather than a FAILED run."""
    (tmp_path / "empty" / "10_nothing").mkdir(parents=True)
    with pytest.raises(UserError, match="data.dir: no readable images"):
        train_tiny(tmp_path, "data=folder", f"data.dir={tmp_path / 'empty'}")
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(mlflow_uri).get_experiment_by_name("lora-sweep")
    assert exp is None or not MlflowClient(mlflow_uri).search_runs([exp.experiment_id])


def test_non_positive_max_steps_fails_before_any_run():
    """A value problem is the pre-flight's, which stops the command before any job or run starts."""
    from lora_sweep.checks.preflight import check_job

    assert "train.max_steps: must be > 0, got 0." in check_job(compose_config("train.max_steps=0")).problems


def test_text_encoder_lora_trains_saves_kohya_te_keys_and_loads(tmp_path, mlflow_uri):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from lora_sweep.model.loading import tiny_model_dir

    outcome = train_tiny(tmp_path, "network.train_text_encoder=true", "train.max_steps=2")
    assert outcome.status == "FINISHED"
    with safe_open(str(outcome.files["kohya"]), "pt") as f:
        keys = list(f.keys())
        te1_up = [f.get_tensor(k) for k in keys if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc1") for k in keys)
    assert any(t.abs().sum() > 0 for t in te1_up)  # the text-encoder LoRA really trained (up starts at zero)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir()))
    pipe.load_lora_weights(str(outcome.files["kohya"]))
    adapters = pipe.get_list_adapters()
    assert adapters.get("text_encoder") and adapters.get("text_encoder_2") and adapters.get("unet")
    found = assert_loads_as_kohya_merge(outcome.files["diffusers"], outcome.files["kohya"])
    assert {name.split("_", 2)[1] for name in found} == {"unet", "te1", "te2"}
