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


# The 82 keys v0.8.7 writes for issue 33's run (--train_data_dir, a model folder, no --network_args, no clip skip):
# train_network.py L525-577, L689-708, L712-719 and save_model L774-776, save_weights' sshs_*, get_sai_model_spec's 7
ISSUE33_KEYS = set("""
    modelspec.architecture modelspec.date modelspec.implementation modelspec.prediction_type modelspec.resolution
    modelspec.sai_model_spec modelspec.title ss_adaptive_noise_scale ss_base_model_version ss_batch_size_per_device
    ss_bucket_info ss_bucket_no_upscale ss_cache_latents ss_caption_dropout_every_n_epochs ss_caption_dropout_rate
    ss_caption_tag_dropout_rate ss_clip_skip ss_color_aug ss_dataset_dirs ss_debiased_estimation ss_enable_bucket
    ss_epoch ss_face_crop_aug_range ss_flip_aug ss_full_fp16 ss_gradient_accumulation_steps
    ss_gradient_checkpointing ss_huber_c ss_huber_schedule ss_ip_noise_gamma ss_ip_noise_gamma_random_strength
    ss_keep_tokens ss_learning_rate ss_loss_type ss_lowram ss_lr_scheduler ss_lr_warmup_steps ss_max_bucket_reso
    ss_max_grad_norm ss_max_token_length ss_max_train_steps ss_min_bucket_reso ss_min_snr_gamma ss_mixed_precision
    ss_multires_noise_discount ss_multires_noise_iterations ss_network_alpha ss_network_dim ss_network_dropout
    ss_network_module ss_new_sd_model_hash ss_noise_offset ss_noise_offset_random_strength ss_num_batches_per_epoch
    ss_num_epochs ss_num_reg_images ss_num_train_images ss_optimizer ss_output_name ss_prior_loss_weight
    ss_random_crop ss_reg_dataset_dirs ss_resolution ss_scale_weight_norms ss_sd_model_hash ss_sd_model_name
    ss_sd_scripts_commit_hash ss_seed ss_session_id ss_shuffle_caption ss_steps ss_tag_frequency ss_text_encoder_lr
    ss_total_batch_size ss_training_comment ss_training_finished_at ss_training_started_at ss_unet_lr ss_v2
    ss_zero_terminal_snr sshs_legacy_hash sshs_model_hash
""".split())


def test_the_issue_33_run_writes_v087s_82_keys_with_its_values(tmp_path):
    from safetensors import safe_open

    from lora_sweep.checks import preflight
    from lora_sweep.data.buckets import assign_with_settings, bucket_settings
    from lora_sweep.data.photos import data_folder
    from lora_sweep.model.network import save_kohya
    from lora_sweep.training.metadata import TrainingFacts

    (tmp_path / "sdxl").mkdir()
    cfg = compose_config("data.resolution=64", "network.rank=4", "network.alpha=1", "train.lr=1e-4", "train.seed=42",
                         "train.batch_size=1", "train.max_steps=2", f"model.path={tmp_path / 'sdxl'}")
    specs, scans = preflight.training_scans(cfg, data_folder(cfg))
    entries = [(item, assign_with_settings(item.size, bucket_settings(specs[item.dataset]))[0])
               for scan in scans for item in scan.items]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    meta = kohya_metadata(cfg, SimpleNamespace(specs=specs, trained=entries), optimizer, steps=2, epoch=1,
                          facts=TrainingFacts(batches_per_epoch=40, epochs=1))
    path = save_kohya(tmp_path / "lora.safetensors", {"a.alpha": torch.tensor(1.0)}, meta)
    with safe_open(str(path), "pt") as f:
        written = f.metadata()
    assert len(ISSUE33_KEYS) == 82
    assert {k for k in written if not k.startswith("lora_sweep_")} == ISSUE33_KEYS
    # every value v0.8.7's own parser and metadata dict give for the exported config.toml (the file says how)
    reference = json.loads((Path(__file__).parents[1] / "data" / "kohya_v087_issue33_values.json").read_text())
    assert {k: written[k] for k in reference["values"]} == reference["values"]
    assert (written["ss_network_alpha"], written["ss_resolution"], written["ss_unet_lr"]) == ("1.0", "(64, 64)", "None")
    assert (written["ss_num_train_images"], written["ss_sd_model_hash"]) == ("40", "IsADirectory")
