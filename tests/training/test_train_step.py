"""One micro-batch of the real training step (train.micro_batch_loss on the tiny SDXL and the bundled photos),
watched at the lines where kohya v0.8.7's `train_network.py` fixes dtypes and the autocast boundary:

    latents = batch["latents"].to(device).to(dtype=weight_dtype); latents = latents * vae_scale_factor
    with autocast(): text encoders
    get_noise_noisy_latents_and_timesteps(...)          # outside autocast
    with autocast(): unet(noisy_latents.to(weight_dtype), ...)   # sdxl_train_network.call_unet

CPU autocast has no fp32 rule for `pow`, so the numbers alone would not show a noise step run inside autocast; the
autocast state seen by the noise step and the dtypes of its input and of the U-Net input are what a CPU can assert.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import RecordingSink, compose_config

from lora_sweep.training import noise as noise_lib
from lora_sweep.training import train as train_lib
from lora_sweep.training.precision import PRECISIONS
from lora_sweep.training.session import build_session


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One fp32 session; each test swaps in the precision policy it looks at (the step reads only its dtypes)."""
    cfg = compose_config("train.max_steps=1", "train.batch_size=2", "train.device=cpu")
    torch.manual_seed(0)
    return build_session(cfg, output_dir=tmp_path_factory.mktemp("step"), sink=RecordingSink())


@pytest.fixture
def watched(session, monkeypatch):
    """Run micro_batch_loss under `policy` and report what the noise step and the U-Net were given."""
    seen: dict = {}
    real_noise = noise_lib.kohya_noisy_latents

    def noise_step(latents, alphas_cumprod, options, **kwargs):
        seen["autocast_in_noise"] = torch.is_autocast_enabled("cpu")
        seen["x0"] = latents
        seen["bounds"] = (options.min_timestep, options.max_timestep)
        seen["noisy"] = real_noise(latents, alphas_cumprod, options, **kwargs)
        return seen["noisy"]

    def unet_input(module, args, kwargs):
        seen["unet_sample"] = args[0]
        seen["autocast_in_unet"] = torch.is_autocast_enabled("cpu")

    monkeypatch.setattr(noise_lib, "kohya_noisy_latents", noise_step)
    handle = session.unet.register_forward_pre_hook(unet_input, with_kwargs=True)
    original_policy, original_noise = session.policy, session.noise_options

    def run(name: str, **noise_overrides):
        session.policy = PRECISIONS[name]
        session.noise_options = dataclasses.replace(original_noise, **noise_overrides)
        try:
            seen.clear()
            batch = [session.batch_items[0], session.batch_items[1]]
            with torch.no_grad():
                terms = train_lib.micro_batch_loss(session, batch, random.Random(0), 1)
            seen["terms"], seen["cached"] = terms, torch.stack([session.prepared.examples[i].latents for i in batch])
            return seen
        finally:
            session.noise_options = original_noise

    yield run
    handle.remove()
    session.policy = original_policy


@pytest.mark.parametrize("name", sorted(PRECISIONS))
def test_noise_step_runs_outside_autocast_on_latents_cast_then_scaled(watched, session, name):
    seen = watched(name)
    dtype = PRECISIONS[name].latent_dtype  # kohya's weight_dtype: fp16 under fp16/fp8, bf16 under bf16/fp8_bf16
    assert seen["autocast_in_noise"] is False
    assert seen["autocast_in_unet"] is (name != "fp32")
    expected_x0 = seen["cached"].to(dtype=dtype) * session.vae_scale  # cast first, then scale
    assert seen["x0"].dtype == dtype and torch.equal(seen["x0"], expected_x0)
    assert seen["noisy"].noise.dtype == seen["noisy"].noisy_latents.dtype == dtype
    assert seen["unet_sample"].dtype == dtype
    assert seen["bounds"] == (None, None)  # config null: kohya's 0 / 1000
    assert torch.isfinite(seen["terms"].loss)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_unet_input_is_cast_to_weight_dtype_when_an_offset_makes_x_t_fp32(watched, name):
    seen = watched(name, offset=0.05)
    assert seen["noisy"].noisy_latents.dtype == torch.float32  # kohya: fp32 offset noise promotes x_t
    assert seen["unet_sample"].dtype == PRECISIONS[name].latent_dtype  # call_unet: noisy_latents.to(weight_dtype)
    assert torch.equal(seen["unet_sample"], seen["noisy"].noisy_latents.to(PRECISIONS[name].latent_dtype))


def test_timestep_bounds_reach_the_noise_step(watched):
    seen = watched("fp32", min_timestep=990, max_timestep=995)
    assert seen["bounds"] == (990, 995)
    assert ((seen["noisy"].timesteps >= 990) & (seen["noisy"].timesteps < 995)).all()


def test_timestep_bounds_are_in_the_lora_metadata_as_kohya_writes_them(session):
    """kohya train_util.get_sai_model_spec: modelspec.timestep_range = "min,max" once either bound is set."""
    from lora_sweep.training.metadata import kohya_metadata

    def timestep_range(**bounds):
        saved = {k: session.cfg.noise[k] for k in bounds}
        session.cfg.noise.update(bounds)
        try:
            meta = kohya_metadata(session.cfg, session.prepared, session.optimizer, steps=1, epoch=1)
        finally:
            session.cfg.noise.update(saved)
        return meta.get("modelspec.timestep_range")

    assert timestep_range() is None
    assert timestep_range(min_timestep=200) == "200,1000"
    assert timestep_range(max_timestep=500) == "0,500"
    assert timestep_range(min_timestep=100, max_timestep=900) == "100,900"


def test_the_network_keys_are_in_the_lora_metadata_as_v087_writes_them(session):
    """ss_network_dim / alpha / dropout as str() of v0.8.7's args; ss_network_args = json.dumps(net_kwargs) only when
    v0.8.7 had --network_args: their strings, then the injected "dropout" (not under dim_from_weights)."""
    from omegaconf import OmegaConf

    from lora_sweep.training.metadata import kohya_metadata

    def network_keys(**values):
        saved = {k: OmegaConf.to_container(session.cfg.network)[k] for k in values}  # a copy: lists update in place
        session.cfg.network.update(values)
        try:
            meta = kohya_metadata(session.cfg, session.prepared, session.optimizer, steps=1, epoch=1)
        finally:
            session.cfg.network.update(saved)
        return tuple(meta.get(f"ss_network_{k}") for k in ("dim", "alpha", "dropout", "args"))

    assert network_keys() == ("4", "1.0", "None", None)
    assert network_keys(network_args=["conv_dim=32", "conv_alpha=16"], dropout=0.1, rank=16, alpha=8.0) == (
        "16", "8.0", "0.1", '{"conv_dim": "32", "conv_alpha": "16", "dropout": 0.1}')
    assert network_keys(conv_dim=32, rank_dropout=0.25) == (
        "4", "1.0", "None", '{"conv_dim": "32", "rank_dropout": "0.25", "dropout": null}')
    assert network_keys(network_args=["module_dropout=0.1"], dim_from_weights=True)[3] == '{"module_dropout": "0.1"}'
    # what `--network_args conv_alpha=16 module_dropout=0` gives v0.8.7, not str(float)'s "16.0" and "0.0"
    assert network_keys(conv_dim=32, conv_alpha=16.0, module_dropout=0.0)[3] == (
        '{"conv_dim": "32", "conv_alpha": "16", "module_dropout": "0", "dropout": null}')


def test_the_lora_metadata_counts_the_sessions_dataset_as_kohya_does(session):
    """Folder mode (the bundled photos): every training entry in ss_num_train_images and ss_bucket_info, no reg."""
    import json

    from lora_sweep.training.metadata import kohya_metadata

    meta = kohya_metadata(session.cfg, session.prepared, session.optimizer, steps=1, epoch=1)
    entries = len(session.batch_items)
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert (int(meta["ss_num_train_images"]), sum(b["count"] for b in buckets.values())) == (entries, entries)
    assert sum(d["n_repeats"] * d["img_count"] for d in json.loads(meta["ss_dataset_dirs"]).values()) == entries
    assert (meta["ss_num_reg_images"], meta["ss_reg_dataset_dirs"], meta["ss_resolution"]) == ("0", "{}", "(64, 64)")
    assert "ss_datasets" not in meta


def test_the_scans_a_caller_made_are_not_made_again(tmp_path, monkeypatch):
    """train(scans=..., specs=..., validation_scan=...) trains on the caller's scans of data.dir and
    data.validation_dir."""
    from conftest import write_image

    from lora_sweep.checks import preflight
    from lora_sweep.data.dataset import scan_folder
    from lora_sweep.data.photos import data_folder
    from lora_sweep.training import session as session_lib

    write_image(tmp_path / "held_out" / "1_thing" / "a.png", caption="a thing")
    cfg = compose_config("train.max_steps=1", "train.batch_size=2", "train.device=cpu",
                         f"data.validation_dir={tmp_path / 'held_out'}", "validation.timesteps=[500]")
    specs, scans = preflight.training_scans(cfg, data_folder(cfg))
    validation_scan = scan_folder(tmp_path / "held_out", cfg.data.caption_extension)
    monkeypatch.setattr(session_lib, "scan_folder", lambda *args, **kwargs: pytest.fail("scanned again"))
    monkeypatch.setattr(session_lib, "inspect_datasets", lambda *args, **kwargs: pytest.fail("scanned again"))
    seen = {}
    monkeypatch.setattr(session_lib, "log_data", lambda cfg, data, sink, output_dir: seen.update(data=data))
    result = train_lib.train(cfg, output_dir=tmp_path / "out", sink=RecordingSink(), scans=scans, specs=specs,
                             validation_scan=validation_scan)
    assert result.steps == 1 and seen["data"].scans == scans
    assert [e.item.path.name for e in seen["data"].validation] == ["a.png"]


def test_a_max_token_length_reaches_the_lora_metadata_and_the_unet(session):
    """ss_max_token_length as v0.8.7 writes args.max_token_length ("None", "150", "225"); captions encoded at the
    step (not cached) give the U-Net a context of 227 tokens."""
    from lora_sweep.training.metadata import kohya_metadata

    def metadata_value():
        meta = kohya_metadata(session.cfg, session.prepared, session.optimizer, steps=1, epoch=1)
        return meta["ss_max_token_length"]

    assert metadata_value() == "None"
    example = dataclasses.replace(session.prepared.examples[0], context=None, pooled=None)
    session.cfg.data.max_token_length = 225
    try:
        assert metadata_value() == "225"
        context, pooled = session.text_for([example, example])
        latents = torch.stack([example.latents, example.latents])
        with torch.no_grad():
            out = session.unet_forward(latents, torch.tensor([500, 500]), context, pooled,
                                       torch.stack([example.time_ids, example.time_ids]))
    finally:
        session.cfg.data.max_token_length = None
    assert context.shape == (2, 227, 32 + 48) and pooled.shape == (2, 40) and out.shape == latents.shape



def test_a_batch_is_encoded_together_and_one_image_reads_its_cache(session, monkeypatch):
    """v0.8.7 without --cache_text_encoder_outputs encodes each batch's captions in one call (get_text_cond):
    TE2's text_projection of a (B, 1280) batch rounds otherwise than the (1, 1280) products a per-image cache holds
    (issue 33: 4730 of 5120 pooled values at batch 4, SDXL on the CPU). A batch of several is encoded now, whatever
    its cache, in fp32 with the encoders on the training device; a batch of one reads its cache (the same product),
    and so does any batch in mixed precision (the cache is fp32 where kohya encodes in the training dtype)."""
    from lora_sweep.model.encode import encode_prompts

    first, second = session.prepared.examples[:2]
    stale = [dataclasses.replace(e, context=torch.zeros_like(e.context), pooled=torch.zeros_like(e.pooled))
             for e in (first, second)]
    context, pooled = session.text_for(stale)
    want_context, want_pooled = encode_prompts(session.parts, [first.item.caption, second.item.caption])
    assert torch.equal(context, want_context) and torch.equal(pooled, want_pooled)
    assert pooled.abs().sum() > 0
    one_context, one_pooled = session.text_for(stale[:1])
    assert torch.equal(one_context, torch.zeros_like(first.context).unsqueeze(0))
    assert torch.equal(one_pooled, torch.zeros_like(first.pooled).unsqueeze(0))
    monkeypatch.setattr(session, "policy", PRECISIONS["fp16"])
    assert torch.equal(session.text_for(stale)[1], torch.zeros_like(pooled))

@pytest.mark.parametrize("overrides, expected", [
    ([], {"ss_optimizer": "torch.optim.adamw.AdamW", "ss_lr_scheduler": "constant", "ss_lr_warmup_steps": "0",
          "ss_learning_rate": "0.0001", "ss_unet_lr": "None", "ss_text_encoder_lr": "None"}),
    (["train.text_encoder_lr=5e-5", "network.train_text_encoder=true"],  # v0.8.7: the flags as given
     {"ss_learning_rate": "0.0001", "ss_unet_lr": "None", "ss_text_encoder_lr": "5e-05"}),
    (["train.text_encoder_lr=0"], {"ss_text_encoder_lr": "0.0", "ss_unet_lr": "None"}),
    (["optimizer.scheduler=cosine", "optimizer.warmup_steps=2", "optimizer.optimizer_args=['weight_decay=0.1']"],
     {"ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.1)", "ss_lr_scheduler": "cosine",
      "ss_lr_warmup_steps": "2"}),
    (["optimizer=adafactor", "optimizer.scheduler=cosine"],  # relative_step: kohya's rewrite, the lrs None
     {"ss_optimizer": "transformers.optimization.Adafactor(relative_step=True)",
      "ss_lr_scheduler": "adafactor:0.0001", "ss_learning_rate": "None", "ss_unet_lr": "None",
      "ss_text_encoder_lr": "None"}),
    (["optimizer=sgd_nesterov"], {"ss_optimizer": "torch.optim.sgd.SGD(momentum=0.9)"}),
])
def test_the_lora_metadata_records_optimizer_and_schedule_as_v087(session, overrides, expected):
    from lora_sweep.training.metadata import kohya_metadata
    from lora_sweep.training.session import make_optimizer

    cfg = compose_config("train.max_steps=1", "train.batch_size=2", "train.device=cpu", *overrides)
    optimizer, _ = make_optimizer(cfg, [{"name": "unet", "params": [torch.nn.Parameter(torch.zeros(2, 2))],
                                         "lr": cfg.train.lr}])
    meta = kohya_metadata(cfg, session.prepared, optimizer, steps=1, epoch=1)
    assert {k: meta[k] for k in expected} == expected


def test_the_v_pred_loss_switches_are_recorded_under_lora_sweep_keys(session):
    """The tester's item 12: v0.8.7 records neither, yet v_pred_like_loss=0.1 changed a final loss 1.04 to 11.97."""
    from lora_sweep.training.metadata import kohya_metadata

    def v_pred_keys(**values):
        saved = {k: session.cfg.loss[k] for k in values}
        session.cfg.loss.update(values)
        try:
            meta = kohya_metadata(session.cfg, session.prepared, session.optimizer, steps=1, epoch=1)
        finally:
            session.cfg.loss.update(saved)
        return meta["lora_sweep_v_pred_like_loss"], meta["lora_sweep_scale_v_pred_loss_like_noise_pred"]

    assert v_pred_keys() == ("None", "False")
    assert v_pred_keys(v_pred_like_loss=0.1, scale_v_pred_loss_like_noise_pred=True) == ("0.1", "True")
