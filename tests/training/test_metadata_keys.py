"""The whole `ss_*` set of a saved LoRA against v0.8.7's key list (tests/data/kohya_v087_ss_keys.json, taken from
train_network.py and networks/lora.py with the lines cited there), in both dataset modes, and v0.8.7's hashes."""

from __future__ import annotations

import hashlib
import json
import math
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import RecordingSink, compose_config

from lora_sweep.training.metadata import kohya_metadata, model_keys

KEYS = json.loads((Path(__file__).parents[1] / "data" / "kohya_v087_ss_keys.json").read_text(encoding="utf-8"))
ALWAYS = set(KEYS["always"]["keys"]) | set(KEYS["at_save"]["keys"]) | set(KEYS["model"]["keys"])


def _ss_keys(meta: dict[str, str]) -> set[str]:
    extras = {k for k in meta if not k.startswith("ss_")}
    assert all(k.startswith(("lora_sweep_", "modelspec.", "sshs_")) for k in extras), extras
    return {k for k in meta if k.startswith("ss_")}


def _v087_hashes(path: Path) -> tuple[str, str]:
    """v0.8.7's precalculate_safetensors_hashes on the file's tensors and ss_* metadata (written here again)."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        meta = {k: v for k, v in f.metadata().items() if k.startswith("ss_")}
    b = BytesIO(save(tensors, meta))
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    return hashlib.sha256(b.read()).hexdigest(), legacy


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step folder-mode training with zero terminal SNR, v-prediction, its loss scaling, clip_skip and full fp16
    (AdamW's eps raised: fp16 rounds 1e-8 to 0, and lora_down's zero first gradient would step by 0/0)."""
    from lora_sweep.training.train import train

    cfg = compose_config("train.max_steps=2", "train.batch_size=2", "loss.zero_terminal_snr=true",
                         "model.v_prediction=true", "loss.scale_v_pred_loss_like_noise_pred=true",
                         "model.clip_skip=2", "precision=fp16", "precision.full_fp16=true", "optimizer.args.eps=1e-4",
                         "sampling.prompts=[]", "validation.fit_images=0")
    sink = RecordingSink()
    result = train(cfg, output_dir=tmp_path_factory.mktemp("keys") / "out", sink=sink)
    return sink, result.files["kohya"]


def test_a_folder_mode_lora_has_v087s_keys_and_its_hashes(trained):
    from safetensors import safe_open

    sink, path = trained
    assert all(math.isfinite(float(sink.logged[f"train/loss@{s}"])) for s in (1, 2))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {torch.float16}  # the LoRA's training dtype, as v0.8.7 saves without --save_precision
    assert _ss_keys(meta) == ALWAYS | set(KEYS["folder_mode"]["keys"])
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _v087_hashes(path)
    assert meta["sshs_legacy_hash"] == "e3b0c442"  # a file under 1 MiB: the sha256 of nothing
    assert {k: meta[k] for k in ("ss_zero_terminal_snr", "ss_clip_skip", "ss_v2", "ss_full_fp16", "ss_cache_latents",
                                 "ss_lowram", "ss_training_comment", "ss_sd_scripts_commit_hash", "ss_num_epochs",
                                 "ss_mixed_precision",
                                 "ss_network_dropout", "modelspec.encoder_layer", "modelspec.prediction_type")} == {
        "ss_zero_terminal_snr": "True", "ss_clip_skip": "2", "ss_v2": "False", "ss_full_fp16": "True",
        "ss_cache_latents": "True", "ss_lowram": "False", "ss_training_comment": "None",
        "ss_sd_scripts_commit_hash": "(unknown)", "ss_num_epochs": "1", "ss_network_dropout": "None",
        "ss_mixed_precision": "fp16",
        "modelspec.encoder_layer": "2", "modelspec.prediction_type": "v"}
    assert 0 <= int(meta["ss_session_id"]) <= 2**32 and float(meta["ss_training_started_at"]) > 1.6e9


def test_a_toml_mode_lora_has_v087s_keys(tmp_path, monkeypatch):
    from kohya_dataset import write_kohya_dataset

    from lora_sweep.checks import preflight
    from lora_sweep.data.buckets import assign_with_settings, bucket_settings

    monkeypatch.chdir(tmp_path)
    cfg = compose_config("data=folder", "data.dir=null", f"data.dataset_config={write_kohya_dataset(tmp_path)}")
    specs, scans = preflight.training_scans(cfg, None)
    entries = [(item, assign_with_settings(item.size, bucket_settings(specs[item.dataset]))[0])
               for scan in scans for item in scan.items]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    meta = kohya_metadata(cfg, SimpleNamespace(specs=specs, trained=entries), optimizer, steps=1, epoch=1)
    assert _ss_keys(meta) == ALWAYS | set(KEYS["toml_mode"]["keys"])
    assert "modelspec.encoder_layer" not in meta and meta["ss_clip_skip"] == "None"


def test_model_keys_hash_a_checkpoint_as_v087(tmp_path):
    blob = bytes(range(256)) * (0x120000 // 256)
    (tmp_path / "base.safetensors").write_bytes(blob)
    (tmp_path / "folder").mkdir()
    assert model_keys(str(tmp_path / "base.safetensors"), "sdxl") == {
        "ss_sd_model_name": "base.safetensors",
        "ss_sd_model_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
        "ss_new_sd_model_hash": hashlib.sha256(blob).hexdigest()}
    assert model_keys(str(tmp_path / "folder"), "sdxl") == {
        "ss_sd_model_name": "folder", "ss_sd_model_hash": "IsADirectory", "ss_new_sd_model_hash": "IsADirectory"}
    assert model_keys(None, "tiny") == {"ss_sd_model_name": "lora-sweep-tiny"}


def test_addnet_hashes_of_a_file_over_1_mib_read_only_the_ss_keys(tmp_path):
    from safetensors.torch import save_file

    from lora_sweep.model.network import addnet_hashes, save_kohya

    state = {"b.alpha": torch.tensor(4.0), "a.lora_down.weight": torch.arange(300_000, dtype=torch.float32)}
    path = save_kohya(tmp_path / "x.safetensors", state, {"ss_seed": "42", "modelspec.title": "x"})
    again = tmp_path / "y.safetensors"
    save_file(state, str(again), {"ss_seed": "42", "modelspec.title": "another title"})
    hashes = addnet_hashes(state, {"ss_seed": "42", "modelspec.title": "another title"})
    assert (hashes["sshs_model_hash"], hashes["sshs_legacy_hash"]) == _v087_hashes(path) == _v087_hashes(again)
    assert hashes["sshs_legacy_hash"] != "e3b0c442"
