"""The network's kohya settings before anything loads: network_args parsed as v0.8.7 parses them (reference 5.1),
block-wise keys refused for SDXL (5.10), the *_only switches (5.6), conv_dim / conv_alpha; and what
network_train_text_encoder_only builds."""

from __future__ import annotations

import copy
import functools

import pytest
import yaml
from conftest import compose_config

from lora_sweep.checks.validate import config_problems
from lora_sweep.model.network import kohya_dropouts, network_value, parse_network_args

ARGS = "network.network_args"


@functools.cache
def base():
    return compose_config()


def configured(*overrides: str):
    """A copy of the default config (composed once) with `key=value` overrides, values read as YAML."""
    from omegaconf import OmegaConf

    cfg = copy.deepcopy(base())
    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value))
    return cfg


def problems(*overrides: str) -> list[str]:
    return config_problems(configured(*overrides))


def test_network_args_are_split_as_v087_splits_them():
    assert parse_network_args(["conv_dim=32", "conv_alpha=16", "rank_dropout=0.1"]) == {
        "conv_dim": "32", "conv_alpha": "16", "rank_dropout": "0.1"}
    with pytest.raises(ValueError, match="exactly one '='"):
        parse_network_args(["conv_dim=32=1"])
    net = compose_config(f'{ARGS}=["conv_dim=32","conv_alpha=16","module_dropout=0.25"]').network  # Hydra's syntax
    assert (network_value(net, "conv_dim"), network_value(net, "conv_alpha")) == (32, 16.0)
    assert kohya_dropouts(compose_config(f'{ARGS}=["rank_dropout=0.1","module_dropout=0"]', "network.dropout=0.2")) \
        == (0.2, 0.1, 0.0)  # a 0 from network_args is kept: v0.8.7 still draws for it
    assert problems(f'{ARGS}=["conv_dim=32","conv_alpha=16"]', "network.conv_dim=32") == []


@pytest.mark.parametrize(("args", "message"), [
    ('["conv_dim=32=1"]', "network.network_args: 'conv_dim=32=1' is not key=value with exactly one '=' (v0.8.7 "
                          "splits each on '=' and fails otherwise)."),
    ('["conv_dim=x"]', "network.network_args: conv_dim='x' is not int (v0.8.7 converts it with int())."),
    ('["dropout=0.1"]', "network.network_args: 'dropout' does nothing in v0.8.7's LoRA (it only reaches "
                        "ss_network_args); set network.dropout (kohya's --network_dropout) instead."),
    ('["algo=locon"]', "network.network_args: 'algo' is not a key networks.lora reads (v0.8.7 ignores it silently; "
                       "lora-sweep refuses it). Accepted: conv_dim, conv_alpha, rank_dropout, module_dropout."),
    ('["conv_dim=8"]', "network.network_args: conv_dim=8 disagrees with network.conv_dim=16; set it one way only."),
])
def test_bad_network_args_are_refused_in_one_paragraph(args, message):
    assert problems(f"{ARGS}={args}", "network.conv_dim=16") == [message]


def test_every_network_args_item_is_checked_alone():
    """The tester's item 3: a malformed item does not hide the unknown key beside it."""
    assert problems(f'{ARGS}=["foo=1","conv_dim=4=5"]') == [
        "network.network_args: 'conv_dim=4=5' is not key=value with exactly one '=' (v0.8.7 splits each on '=' and "
        "fails otherwise).",
        "network.network_args: 'foo' is not a key networks.lora reads (v0.8.7 ignores it silently; lora-sweep refuses "
        "it). Accepted: conv_dim, conv_alpha, rank_dropout, module_dropout."]


@pytest.mark.parametrize("key", ["block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                                 "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"])
def test_blockwise_keys_are_refused_by_name_with_v087s_sdxl_reason(key):
    [message] = problems(f'{ARGS}=["{key}=1"]')
    assert message.startswith(f"network.network_args: '{key}' is refused: v0.8.7's block index recognises only "
                              "diffusers block names")
    assert "(block_dims[24], no per-block learning rate)" in message


@pytest.mark.parametrize(("overrides", "start"), [
    (["network.network_train_unet_only=true", "network.train_text_encoder=true"],
     "network.network_train_unet_only=true contradicts network.train_text_encoder=true"),
    (["network.network_train_text_encoder_only=true"],
     "network.network_train_text_encoder_only trains only the text encoders' LoRA: it needs"),
    (["network.network_train_unet_only=true", "network.network_train_text_encoder_only=true",
      "network.train_text_encoder=true"], "network.network_train_unet_only and network.network_train_text_encoder_only"
                                          " are both true: nothing would train (v0.8.7 fails at the optimizer)."),
    (["network.dim_from_weights=true"], "network.dim_from_weights takes ranks, alphas and modules from "
                                        "network.network_weights, which is not set"),
    (["network.conv_dim=-1"], "network.conv_dim: must be null (no LoCon), 0"),
    (["network.conv_alpha=-1"], "network.conv_alpha: must be >= 0"),
])
def test_contradicting_network_switches_are_refused(overrides, start):
    [message] = problems(*overrides)
    assert message.startswith(start)


def test_text_encoder_only_trains_no_unet_lora(tmp_path):
    from lora_files import tiny_pipe

    from lora_sweep.model.network import add_network, save_diffusers
    from lora_sweep.training.session import lora_param_groups

    cfg = compose_config("network.network_train_text_encoder_only=true", "network.train_text_encoder=true")
    assert problems("network.network_train_text_encoder_only=true", "network.train_text_encoder=true") == []
    assert problems("network.network_train_unet_only=true") == []
    pipe = tiny_pipe()
    add_network(cfg.network, pipe.unet, (pipe.text_encoder, pipe.text_encoder_2))
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    assert not any("lora_" in name for name, _ in pipe.unet.named_parameters())
    groups = lora_param_groups(cfg, pipe)
    assert [(g["name"], len(g["params"])) for g in groups] == [("text_encoder", 2 * (18 + 18))]
    file = save_diffusers(tmp_path, None, pipe.text_encoder, pipe.text_encoder_2)
    from safetensors.torch import load_file

    assert {key.split(".")[0] for key in load_file(str(file))} == {"text_encoder", "text_encoder_2"}


def test_alpha_0_is_the_rank_as_v087_reads_it():
    """v0.8.7's LoRAModule: network.alpha 0 (and conv_alpha 0) is alpha = rank, scale 1; the alpha buffer, which the
    file saves, holds the rank."""
    from lora_files import tiny_pipe

    from lora_sweep.model.network import add_network, kohya_state_dict

    overrides = ("network.rank=4", "network.alpha=0", "network.conv_dim=2", "network.conv_alpha=0",
                 "network.train_text_encoder=true")
    assert problems(*overrides) == []
    assert problems("network.alpha=-1") == ["network.alpha: must be >= 0, got -1.0."]
    pipe = tiny_pipe()
    add_network(configured(*overrides).network, pipe.unet, (pipe.text_encoder, pipe.text_encoder_2))
    proj = pipe.unet.get_submodule("down_blocks.1.attentions.0.proj_in")
    op = pipe.unet.get_submodule("down_blocks.0.downsamplers.0.conv")
    fc1 = pipe.text_encoder.get_submodule("encoder.layers.0.mlp.fc1")
    assert [(m.r["default"], m.scaling["default"]) for m in (proj, op, fc1)] == [(4, 1.0), (2, 1.0), (4, 1.0)]
    saved = kohya_state_dict({"lora_unet": pipe.unet}, layers_per_block=2)
    assert float(saved["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 4.0
    assert float(saved["lora_unet_input_blocks_3_0_op.alpha"]) == 2.0
