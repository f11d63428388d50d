"""The LoRA starts where v0.8.7's networks/lora.py starts it: every module kohya creates draws from the global torch
RNG in kohya's order (the text encoders' even when they do not train), PEFT's adapters hold those values, and the RNG
is left where kohya leaves it. The SDXL values were derived by running v0.8.7's own `create_network` over kohya's
SdxlUNet2DConditionModel and the SDXL CLIP encoders (architectures on the meta device), after torch.manual_seed(42)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import compose_config
from lora_files import tiny_pipe

from lora_sweep.model.network import (
    add_network,
    created_modules,
    kohya_lora_parameters,
    kohya_module_name,
    lora_module_draws,
    lora_parameters,
    up_blocks_with_attention,
)
from lora_sweep.model.tiny_sdxl import sdxl_asset_config
from lora_sweep.training.precision import grad_total_norm

# v0.8.7, seed 42, rank 4, alpha 1: (module count, sha256 of every lora_down's bytes in creation order, the first
# U-Net module's first 3 values, torch.rand(3) after the network)
KOHYA_SDXL = {
    "default": (264 + 722, "a3dae2acce1275c0440b511234f6c3774b5bd98ab535e1de84cfc2559968e95a",
                ["-0x1.280e440000000p-7", "0x1.40949e0000000p-8", "0x1.7944e20000000p-6"],
                ["0x1.9a7dc00000000p-3", "0x1.e0b2980000000p-1", "0x1.c9a9dc0000000p-2"]),
    "conv_dim=4": (264 + 788, "27cbf5fc43300533b5e66111c11c3f0a26f9bafde044bfa95d7e18efd2886caf",
                   ["0x1.251a860000000p-6", "0x1.dd39f60000000p-10", "-0x1.e4aa160000000p-7"],
                   ["0x1.8232bc0000000p-2", "0x1.0139e80000000p-1", "0x1.d2d6d80000000p-1"]),
}
KOHYA_TE1_FIRST = ["-0x1.d3e3d40000000p-6", "0x1.baa9e00000000p-8", "-0x1.d5ef6a0000000p-8"]


@pytest.fixture(scope="module")
def sdxl_on_meta():
    """SDXL-base's U-Net and text encoders from the bundled configs, without weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sdxl_asset_config("unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_dict(sdxl_asset_config("text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(sdxl_asset_config("text_encoder_2")))
    return unet, (te1, te2)


def hexes(values: torch.Tensor) -> list[str]:
    return [v.hex() for v in values.flatten().tolist()]


@pytest.mark.parametrize("variant", ["default", "conv_dim=4"])
def test_sdxl_draws_are_v087s_in_its_order(sdxl_on_meta, variant):
    unet, encoders = sdxl_on_meta
    overrides = ["network.rank=4", "network.alpha=1"] + (["network.conv_dim=4"] if variant != "default" else [])
    modules = created_modules(compose_config(*overrides).network, unet, encoders)
    count, digest, first_unet, after = KOHYA_SDXL[variant]
    torch.manual_seed(42)
    downs = [lora_module_draws(model.get_submodule(name), rank) for model, name, rank in modules]
    assert (len(downs), hexes(torch.rand(3))) == (count, after)
    assert hexes(downs[0][0, :3]) == KOHYA_TE1_FIRST
    assert hexes(downs[264].flatten()[:3]) == first_unet
    assert hashlib.sha256(b"".join(d.numpy().tobytes() for d in downs)).hexdigest() == digest


def kohya_names(unet, modules) -> list[str]:
    """kohya's module names of `created_modules`' U-Net entries."""
    lpb, up_attention = unet.config.layers_per_block, up_blocks_with_attention(unet)
    return [kohya_module_name("lora_unet", name, lpb, up_attention) for model, name, _ in modules if model is unet]


def test_the_tiny_network_starts_from_kohyas_draws_and_leaves_the_rng_after_them():
    pipe, net = tiny_pipe(), compose_config("network.rank=4", "network.alpha=1").network
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    modules = created_modules(net, pipe.unet, encoders)
    torch.manual_seed(42)
    downs = [lora_module_draws(model.get_submodule(name), rank) for model, name, rank in modules]
    after = hexes(torch.rand(2))
    torch.manual_seed(42)
    add_network(net, pipe.unet, encoders)
    assert hexes(torch.rand(2)) == after
    assert after == ["0x1.2069b80000000p-2", "0x1.82f50a0000000p-1"]
    # the text encoders' 36 modules draw first, though only the U-Net trains (network_train_unet_only)
    assert [model is pipe.unet for model, _, _ in modules] == [False] * 36 + [True] * 132
    assert kohya_names(pipe.unet, modules)[:4] == [
        "lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_v"]
    layers = [pipe.unet.get_submodule(name) for model, name, _ in modules if model is pipe.unet]
    pairs = zip(layers, downs[36:], strict=True)
    assert all(torch.equal(layer.lora_A["default"].weight, down) for layer, down in pairs)
    assert all(not layer.lora_B["default"].weight.any() for layer in layers)
    assert hexes(layers[0].lora_A["default"].weight[0, :3]) == [
        "-0x1.f11f3c0000000p-4", "0x1.e381a00000000p-7", "0x1.0ed2140000000p-4"]
    assert not any("lora_" in name for name, _ in pipe.text_encoder.named_parameters())


def test_the_clip_norm_sums_in_kohyas_parameter_order():
    pipe, net = tiny_pipe(), compose_config("network.conv_dim=4", "network.train_text_encoder=true").network
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    modules = created_modules(net, pipe.unet, encoders)
    add_network(net, pipe.unet, encoders)
    kohya_order = [p for model, name, _ in modules for p in (model.get_submodule(name).lora_A["default"].weight,
                                                            model.get_submodule(name).lora_B["default"].weight)]
    ours = [p for prefix, model in (("lora_te1", encoders[0]), ("lora_te2", encoders[1]), ("lora_unet", pipe.unet))
            for p in kohya_lora_parameters(model, prefix)]
    assert [id(p) for p in ours] == [id(p) for p in kohya_order]
    big = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q").lora_A["default"]
    for p in ours:  # norms of 1 and one of 4096: where the large one sits shows in the float sum's last bits
        p.grad = torch.zeros_like(p)
        p.grad.view(-1)[0] = 4096.0 if p is big.weight else 1.0
    peft_order = lora_parameters(encoders[0]) + lora_parameters(encoders[1]) + lora_parameters(pipe.unet)
    assert sorted(map(id, peft_order)) == sorted(map(id, ours))
    kohya = torch.nn.utils.clip_grad_norm_(kohya_order, max_norm=1e9)  # v0.8.7's accelerator.clip_grad_norm_
    assert grad_total_norm(ours).item().hex() == kohya.item().hex() == "0x1.0000be0000000p+12"
    assert grad_total_norm(peft_order).item().hex() == "0x1.0000bc0000000p+12"  # PEFT's attn1, attn2, ff
