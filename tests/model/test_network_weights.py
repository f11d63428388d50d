"""network.network_weights and network.dim_from_weights as v0.8.7 reads a starting LoRA (reference section 5.7):
kohya and diffusers files load into PEFT's layers, the scale stays network.alpha / rank while the saved file carries
the file's alpha, dim_from_weights takes ranks, alphas and modules from the file and turns the dropouts off, and
mismatches are refused before training."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from lora_files import tiny_pipe
from test_network_settings import configured

from lora_sweep.checks.validate import config_problems
from lora_sweep.errors import UserError
from lora_sweep.model.network import (
    add_network,
    dim_from_weights_ignores,
    file_alpha_differences,
    kohya_dropouts,
    kohya_state_dict,
    load_network_weights,
    read_network_weights,
    save_diffusers,
    save_kohya,
)

TINY_UNET_MODULES, TINY_TE_MODULES = 132, 18 + 18


def built(*overrides: str):
    """The tiny pipeline with lora-sweep's network for `overrides`, and its config."""
    cfg = configured(*overrides)
    pipe = tiny_pipe()
    add_network(cfg.network, pipe.unet, (pipe.text_encoder, pipe.text_encoder_2))
    return pipe, cfg


def trained_files(folder, *overrides: str, diffusers: bool = True):
    """The kohya and diffusers (if `diffusers`) files of a network built from `overrides` whose up weights were
    "trained", and the kohya state dict."""
    pipe, cfg = built(*overrides)
    generator = torch.Generator().manual_seed(3)
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = 0.1 * torch.randn(param.shape, generator=generator)
    parts = {"lora_unet": pipe.unet}
    if cfg.network.train_text_encoder:
        parts |= {"lora_te1": pipe.text_encoder, "lora_te2": pipe.text_encoder_2}
    state = kohya_state_dict(parts, layers_per_block=pipe.unet.config.layers_per_block)
    te = (pipe.text_encoder, pipe.text_encoder_2) if cfg.network.train_text_encoder else (None, None)
    kohya_file = save_kohya(folder / "start.safetensors", state, {})
    return kohya_file, save_diffusers(folder / "diffusers", pipe.unet, *te) if diffusers else None, state


@pytest.fixture(scope="module")
def rank4_files(tmp_path_factory):
    """A rank-4, alpha-2 LoRA on the U-Net and both text encoders, as kohya and diffusers files."""
    return trained_files(tmp_path_factory.mktemp("rank4"), "network.rank=4", "network.alpha=2",
                         "network.train_text_encoder=true")


def lora_layers(model) -> dict:
    return {name: layer for name, layer in model.named_modules() if hasattr(layer, "lora_A") and layer.lora_A}


def test_kohya_and_diffusers_files_start_the_network_with_v087s_alpha_quirk(rank4_files):
    kohya_file, diffusers_file, state = rank4_files
    for file in (kohya_file, diffusers_file):
        pipe, cfg = built("network.rank=4", "network.alpha=1", f"network.network_weights={file}")
        layer = pipe.unet.get_submodule("down_blocks.1.attentions.0.proj_in")
        assert layer.scaling["default"] == 1 / 4  # trains with network.alpha / rank, as v0.8.7's LoRAModule.scale
        saved = kohya_state_dict({"lora_unet": pipe.unet}, layers_per_block=2)
        assert len(saved) == 3 * TINY_UNET_MODULES
        for key, value in saved.items():
            # the file's lora_down / lora_up, and its alpha 2.0 (not network.alpha 1.0): v0.8.7 loads the alpha buffer
            torch.testing.assert_close(value, state[key], msg=key)
        assert float(saved["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 2.0
        assert not lora_layers(pipe.text_encoder)  # U-Net only: the file's text-encoder modules are not built


def test_a_file_alpha_other_than_the_networks_is_warned_of(tmp_path, caplog):
    """The tester's item 8: a LoCon file with conv_alpha 4 started with network.conv_alpha=2 (conv_dim 8 both)."""
    kohya_file, _, state = trained_files(tmp_path, "network.conv_dim=8", "network.conv_alpha=4", diffusers=False)
    pipe, cfg = built("network.conv_dim=8", "network.conv_alpha=2", f"network.network_weights={kohya_file}")
    saved = kohya_state_dict({"lora_unet": pipe.unet}, layers_per_block=2)
    assert {float(v) for k, v in saved.items() if k.endswith(".alpha")} == {1.0, 4.0}  # the file's, as v0.8.7
    assert file_alpha_differences(cfg.network, read_network_weights(kohya_file, {"lora_unet": pipe.unet})) == {
        "network.conv_alpha": (2.0, [4.0])}
    assert ("network.network_weights: the file's alpha 4.0 differs from network.conv_alpha=2.0. As v0.8.7, training "
            "scales by network.conv_alpha / rank, but the kohya file saved from this run carries the file's alpha "
            "(4.0) while the diffusers file carries network.conv_alpha=2.0, so the two apply the LoRA at different "
            "strengths. Set network.conv_alpha to the file's alpha (4.0) to avoid it.") in caplog.text
    assert "network.alpha" not in caplog.text  # 1.0 both
    caplog.clear()
    built("network.conv_dim=8", "network.conv_alpha=4", f"network.network_weights={kohya_file}")
    assert "differs from" not in caplog.text


def test_loading_reports_missing_and_unexpected_modules(rank4_files, caplog):
    kohya_file, _, _ = rank4_files
    cfg = configured()
    pipe = tiny_pipe()
    add_network(cfg.network, pipe.unet, (pipe.text_encoder, pipe.text_encoder_2))
    named = {"lora_unet": pipe.unet, "lora_te1": pipe.text_encoder, "lora_te2": pipe.text_encoder_2}
    weights = read_network_weights(kohya_file, named)
    # U-Net only: the file's 36 text-encoder modules are ignored, as v0.8.7's load_state_dict(strict=False)
    assert load_network_weights(weights, named, path=str(kohya_file)) == (TINY_UNET_MODULES, 0, TINY_TE_MODULES)
    assert "36 of the file's are not in this network" in caplog.text


def test_dim_from_weights_builds_the_files_modules_without_dropouts(tmp_path, caplog):
    kohya_file, _, state = trained_files(tmp_path, "network.rank=8", "network.alpha=4", "network.conv_dim=2",
                                         "network.conv_alpha=3", diffusers=False)
    pipe, cfg = built("network.rank=4", "network.alpha=1", "network.dropout=0.1",
                      f"network.network_weights={kohya_file}", "network.dim_from_weights=true")
    layers = lora_layers(pipe.unet)
    assert len(layers) == len(state) // 3 == 177  # exactly the file's modules, conv ones included
    op = layers["down_blocks.0.downsamplers.0.conv"]
    assert (op.r["default"], op.scaling["default"]) == (2, 3 / 2)  # the file's conv rank and alpha
    proj = layers["down_blocks.1.attentions.0.proj_in"]
    assert (proj.r["default"], proj.scaling["default"]) == (8, 4 / 8)
    assert kohya_dropouts(cfg) == (None, None, None)
    assert kohya_dropouts(configured("network.dropout=0.1")) == (0.1, None, None)
    assert kohya_dropouts(configured()) == (None, None, None)  # network_dropout 0.0 is v0.8.7's None
    # the tester's item 7: v0.8.7 ignores network.dropout=0.1 silently; lora-sweep says so
    assert ("network.dim_from_weights takes ranks and alphas from network.network_weights and trains without "
            "dropout, as v0.8.7: network.dropout=0.1 is ignored") in caplog.text


def test_dim_from_weights_names_every_setting_it_ignores():
    assert dim_from_weights_ignores(configured("network.dim_from_weights=true").network) == []
    assert dim_from_weights_ignores(configured("network.rank=8", "network.alpha=4", "network.conv_dim=8",
                                               'network.network_args=["conv_alpha=4","module_dropout=0.1"]',
                                               "network.rank_dropout=0").network) == [
        "network.rank=8", "network.alpha=4.0", "network.conv_dim=8", "network.network_args conv_alpha=4",
        "network.rank_dropout=0.0", "network.network_args module_dropout=0.1"]


def test_dim_from_weights_builds_the_files_text_encoder_modules(rank4_files):
    kohya_file, _, _ = rank4_files
    pipe, _ = built("network.rank=16", "network.train_text_encoder=true", f"network.network_weights={kohya_file}",
                    "network.dim_from_weights=true")
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        layers = lora_layers(encoder)
        assert len(layers) == 18  # kohya's CLIPAttention and CLIPMLP linears, found by class name
        assert {(layer.r["default"], layer.scaling["default"]) for layer in layers.values()} == {(4, 2 / 4)}


def test_a_rank_mismatch_is_refused_before_training(rank4_files, tmp_path):
    kohya_file, diffusers_file, _ = rank4_files
    for file in (kohya_file, diffusers_file):
        problems = config_problems(configured("network.rank=8", f"network.network_weights={file}"))
        assert len(problems) == 1
        assert problems[0].startswith(f"network.network_weights: the file's ranks do not match this network "
                                      f"({TINY_UNET_MODULES} modules, e.g. ")
        assert "has rank 4 where network.rank is 8" in problems[0]
    assert config_problems(configured("network.rank=8", f"network.network_weights={kohya_file}",
                                          "network.dim_from_weights=true")) == []
    (tmp_path / "not_lora.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    assert config_problems(configured(f"network.network_weights={tmp_path / 'not_lora.safetensors'}")) == [
        f"network.network_weights: '{tmp_path / 'not_lora.safetensors'}' holds no LoRA (no kohya `.lora_down.weight` "
        "key of lora_unet / lora_te1 / lora_te2, no diffusers `unet.` / `text_encoder.` `.lora_A.weight` key)."]
    # the model-side check: a module with other in-features (a file of another model) is refused when it loads
    pipe, _ = built("network.rank=4")
    weights = read_network_weights(kohya_file, {"lora_unet": pipe.unet})
    down, up, alpha = weights["lora_unet_input_blocks_4_1_proj_in"]
    weights["lora_unet_input_blocks_4_1_proj_in"] = (torch.zeros(4, down.shape[1] + 1), up, alpha)
    with pytest.raises(UserError, match=r"\(1 modules, e.g. lora_unet_input_blocks_4_1_proj_in: the file's lora_down "
                                        r"is \(4, 65\), this network's \(4, 64\)\)"):
        load_network_weights(weights, {"lora_unet": pipe.unet}, path=str(kohya_file))


def test_a_relative_starting_file_is_read_from_the_start_folder_and_its_content_counts(tmp_path, monkeypatch):
    """The path is made absolute before the config hash (paths.PATH_SETTINGS); its bytes join the skip-finished
    fingerprint, so a changed file at the same path is not a finished run."""
    from lora_sweep.job.finished import dataset_of
    from lora_sweep.paths import make_paths_absolute

    monkeypatch.chdir(tmp_path)
    cfg = compose_config("network.network_weights=start.safetensors", f"data.cache_dir={tmp_path / 'cache'}")
    assert make_paths_absolute(cfg) == {"network.network_weights": str(tmp_path / "start.safetensors")}
    (tmp_path / "start.safetensors").write_bytes(b"one")
    first = dataset_of(cfg, []).digest
    (tmp_path / "start.safetensors").write_bytes(b"two")
    assert dataset_of(cfg, []).digest != first
    cfg.network.network_weights = None
    assert dataset_of(cfg, []).digest != first


def altered_file(folder, state, name: str, alpha: float | None):
    """`state` as a kohya file whose every `.alpha` is `alpha` (None: left out)."""
    tensors = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    if alpha is not None:
        tensors |= {k: torch.tensor(alpha) for k in state if k.endswith(".alpha")}
    return save_kohya(folder / name, tensors, {})


def test_a_kohya_file_without_alphas_keeps_network_alpha(rank4_files, tmp_path):
    """v0.8.7's load_state_dict(strict=False) leaves the alpha buffer at --network_alpha (1.0, not the rank 4), which
    the file saves and max-norm uses; dim_from_weights builds alpha = rank (create_network_from_weights)."""
    file = altered_file(tmp_path, rank4_files[2], "no_alpha.safetensors", None)
    pipe, _ = built("network.rank=4", "network.alpha=1", f"network.network_weights={file}")
    layer = pipe.unet.get_submodule("down_blocks.1.attentions.0.proj_in")
    assert (layer.lora_alpha["default"], layer.scaling["default"]) == (1.0, 1 / 4)
    saved = kohya_state_dict({"lora_unet": pipe.unet}, layers_per_block=2)
    assert float(saved["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 1.0
    pipe, _ = built("network.rank=16", "network.alpha=1", f"network.network_weights={file}",
                    "network.dim_from_weights=true")
    layer = pipe.unet.get_submodule("down_blocks.1.attentions.0.proj_in")
    assert (layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"]) == (4, 4.0, 1.0)


def test_dim_from_weights_reads_a_file_alpha_of_0_as_the_rank(rank4_files, tmp_path):
    """v0.8.7's LoRAModule: alpha 0 is alpha = rank, scale 1 (not PEFT's 0 / 4 = 0); the saved alpha stays 0."""
    file = altered_file(tmp_path, rank4_files[2], "alpha0.safetensors", 0.0)
    pipe, _ = built("network.rank=16", f"network.network_weights={file}", "network.dim_from_weights=true")
    layer = pipe.unet.get_submodule("down_blocks.1.attentions.0.proj_in")
    assert (layer.r["default"], layer.scaling["default"]) == (4, 1.0)
    saved = kohya_state_dict({"lora_unet": pipe.unet}, layers_per_block=2)
    assert float(saved["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 0.0


def test_dim_from_weights_trains_the_side_the_file_has(tmp_path, caplog):
    """A U-Net-only file with train_text_encoder=true: v0.8.7 builds no text-encoder modules and trains the U-Net."""
    kohya_file, _, _ = trained_files(tmp_path, "network.rank=4", diffusers=False)
    pipe, cfg = built("network.train_text_encoder=true", f"network.network_weights={kohya_file}",
                      "network.dim_from_weights=true")
    assert len(lora_layers(pipe.unet)) == TINY_UNET_MODULES
    assert not lora_layers(pipe.text_encoder) and not lora_layers(pipe.text_encoder_2)
    assert "no module of this model's text encoder 1 (kohya prefix lora_te1)" in caplog.text
    from types import SimpleNamespace

    from lora_sweep.training.session import lora_param_groups

    parts = SimpleNamespace(unet=pipe.unet, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    assert [group["name"] for group in lora_param_groups(cfg, parts)] == ["unet"]  # no empty text-encoder group
