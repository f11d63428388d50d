"""model=tiny: the trained tiny SDXL shipped in the package, its record, and the script that made it."""

from __future__ import annotations

import json
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lora_sweep.errors import UserError
from lora_sweep.model.loading import load_sdxl, resolve_model_path, trained_tiny_dir
from lora_sweep.model.tiny_sdxl import TINY_TRAINED_DIR
from lora_sweep.model.tiny_training import (
    HELD_OUT_SPLIT,
    TRAIN_SPLIT,
    SceneStream,
    TinyTrainingConfig,
    caption_steering,
    encoder_for,
    initial_pipeline,
    noise_prediction_mse,
    psnr,
    sha256,
    train,
    train_decoder,
    train_unet,
    train_vae,
)
from lora_sweep.model.tiny_world import scenes

RECORD = json.loads(TINY_TRAINED_DIR.with_suffix(".json").read_text(encoding="utf-8"))
RERUN_STEPS = 2  # batches 0 and 1 of both stages come from the first chunk of scenes alone
# Not bit-identical across CPUs (kernels, thread counts): a few steps of Adam keep differences far below this.
LOSS_TOLERANCE = 2e-3


def test_model_tiny_is_the_shipped_folder_and_tiny_random_is_built_elsewhere(tmp_path):
    assert resolve_model_path("tiny", None, cache_root=tmp_path) == TINY_TRAINED_DIR
    assert not (tmp_path / "models").exists()  # nothing built at run time
    with pytest.raises(UserError, match="model=tiny: its weights are missing .* set model to tiny_random"):
        trained_tiny_dir(tmp_path / "tiny_trained")


def test_the_world_is_seeded_and_its_captions_fit_77_tokens():
    images, captions = scenes(8, [5, 0, 0])
    again, same = scenes(8, [5, 0, 0])
    assert np.array_equal(images, again) and captions == same
    assert images.shape == (8, 64, 64, 3) and 0 <= images.min() and images.max() <= 1
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TINY_TRAINED_DIR / "tokenizer")
    assert max(len(ids) for ids in tokenizer(captions).input_ids) <= 77


def test_the_scripts_first_steps_give_the_recorded_losses():
    config = TinyTrainingConfig(**RECORD["config"])
    pipe = initial_pipeline(config)
    stream = SceneStream(config.seed, TRAIN_SPLIT, config.train_scenes)
    vae_losses = list(islice(train_vae(pipe.vae, stream, config), RERUN_STEPS))
    assert vae_losses == pytest.approx(RECORD["first_losses"]["vae"][:RERUN_STEPS], rel=LOSS_TOLERANCE)
    # The U-Net stage starts from the initial U-Net and text encoders on the trained (shipped) VAE.
    shipped = load_sdxl(TINY_TRAINED_DIR)
    staged = SimpleNamespace(unet=pipe.unet, vae=shipped.vae, text_encoder=pipe.text_encoder,
                             text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2)
    stream.encode = encoder_for(staged)
    unet_losses = list(islice(train_unet(staged, stream, config), RERUN_STEPS))
    assert unet_losses == pytest.approx(RECORD["first_losses"]["unet"][:RERUN_STEPS], rel=LOSS_TOLERANCE)


def test_stage_3_trains_the_decoder_alone_and_the_shipped_one_beats_its_start():
    config = TinyTrainingConfig(**RECORD["config"])
    vae = load_sdxl(TINY_TRAINED_DIR).vae
    decoder = ("decoder.", "post_quant_conv.")
    before = {name: tensor.clone() for name, tensor in vae.state_dict().items()}
    stream = SceneStream(config.seed, TRAIN_SPLIT, config.train_scenes)
    stream.encode = encoder_for(SimpleNamespace(vae=vae))
    losses = list(islice(train_decoder(vae, stream, config), RERUN_STEPS))
    after = vae.state_dict()
    # The encoder and quant_conv give the latents the U-Net was trained on: not one bit moves.
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items() if not name.startswith(decoder))
    assert not all(torch.equal(after[name], tensor) for name, tensor in before.items() if name.startswith(decoder))
    # Stage 3's first step started from stage 2's decoder; the shipped decoder reconstructs that batch better.
    assert losses[0] < RECORD["first_losses"]["decoder"][0]


def test_stage_3_alone_needs_the_record_of_stages_1_2_without_stage_3(tmp_path):
    out = tmp_path / "out"
    for folder in (TINY_TRAINED_DIR, tmp_path / "nowhere"):  # the shipped record has stage 3; no record at all
        with pytest.raises(UserError, match="--stages-from .* the record of stages 1-2 of this seed and config"):
            train(TinyTrainingConfig(**RECORD["config"]), out, stages_from=folder)
    assert not out.exists()


def test_a_pipeline_read_from_a_folder_is_saved_without_that_folders_path(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from lora_sweep.model.tiny_sdxl import save_tiny_sdxl

    # Stage 3 alone reads stages 1-2's folder; diffusers would write its path into three shipped configs.
    save_tiny_sdxl(StableDiffusionXLPipeline.from_pretrained(TINY_TRAINED_DIR), tmp_path / "saved")
    configs = sorted((tmp_path / "saved").rglob("*.json"))
    assert len(configs) >= 7 and not any("_name_or_path" in path.read_text(encoding="utf-8") for path in configs)
    for name in ("model_index.json", "unet/config.json", "vae/config.json"):
        assert (tmp_path / "saved" / name).read_text() == (TINY_TRAINED_DIR / name).read_text()


def test_the_shipped_weights_are_the_recorded_ones_reconstruct_and_predict_the_noise():
    assert {name: sha256(TINY_TRAINED_DIR / name) for name in RECORD["sha256"]} == RECORD["sha256"]
    parts = load_sdxl(resolve_model_path("tiny", None))
    held_out = SceneStream(RECORD["config"]["seed"], HELD_OUT_SPLIT, 16).chunk(0)
    assert psnr(parts.vae, held_out["pixels"][:16]) >= 24.5  # dB: 25.1 here, 25.6 on 64 scenes; the issue asks 25
    with torch.no_grad():
        fit = noise_prediction_mse(parts, held_out["pixels"][:4], held_out["captions"][:4])
    assert fit["mse"] < 0.5  # the random-weight model: about 1.12


def test_captions_steer_the_background_colour():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model_path("tiny", None))
    steering = caption_steering(pipe, seeds=(0,), pairs=[("red", "blue")], steps=10)
    assert steering["background_hits"] == 1.0  # "on red" is nearer red than blue, "on blue" nearer blue
