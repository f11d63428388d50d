"""LoCon (network.conv_dim): v0.8.7's module set on the real SDXL architecture (built on the meta device) and the
tiny model, kohya's SGM names of reference section 5.3, and both saved files loading in diffusers at the trained
strength (the same U-Net output as the trained PEFT model)."""

from __future__ import annotations

import pytest
import torch
from lora_files import tiny_pipe

from lora_sweep.model.network import add_lora, kohya_module_name, kohya_state_dict, save_diffusers, save_kohya
from lora_sweep.model.network import unet_modules as kohya_unet_modules

EXAMPLE_NAMES = ["lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_4_0_skip_connection",
                 "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
                 "lora_unet_middle_block_0_emb_layers_1"]


@pytest.fixture(scope="module")
def sdxl_unet(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from lora_sweep.model.loading import sdxl_base_config_dir

    folder = sdxl_base_config_dir(tmp_path_factory.mktemp("cache"))
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))


def kohya_names(unet, modules) -> dict[str, tuple[int, float]]:
    lpb = unet.config.layers_per_block
    return {kohya_module_name("lora_unet", name, lpb): value for name, value in modules.items()}


def test_sdxl_module_counts_and_names_are_v087s(sdxl_unet):
    plain = kohya_unet_modules(sdxl_unet, rank=16, alpha=8.0)
    locon = kohya_names(sdxl_unet, kohya_unet_modules(sdxl_unet, rank=16, alpha=8.0, conv_dim=32, conv_alpha=None))
    assert len(plain) == 722
    assert len(locon) == 788
    assert sum(value == (32, 1.0) for value in locon.values()) == 38  # 3x3 at conv_dim, conv_alpha null -> 1.0
    assert sum(value == (16, 8.0) for value in locon.values()) == 722 + 28  # Linear and 1x1 at the network rank
    assert {name: locon[name] for name in EXAMPLE_NAMES} == {
        "lora_unet_input_blocks_1_0_in_layers_2": (32, 1.0), "lora_unet_input_blocks_4_0_skip_connection": (16, 8.0),
        "lora_unet_input_blocks_3_0_op": (32, 1.0), "lora_unet_output_blocks_2_2_conv": (32, 1.0),
        "lora_unet_middle_block_0_emb_layers_1": (16, 8.0)}
    assert not [name for name in locon if "input_blocks_0_0" in name or "_out_2" in name or "time_embed" in name
                or "label_emb" in name]
    # v0.8.7 tests conv_dim `is not None`: 0 scans the ResNet blocks and keeps their Linear and 1x1 parts only
    assert len(kohya_unet_modules(sdxl_unet, rank=16, alpha=8.0, conv_dim=0)) == 750
    # an alpha of 0 is the rank (v0.8.7's LoRAModule): scale 1
    zero = kohya_names(sdxl_unet, kohya_unet_modules(sdxl_unet, rank=16, alpha=8.0, conv_dim=32, conv_alpha=0))
    assert zero["lora_unet_input_blocks_3_0_op"] == (32, 32.0)


def test_peft_injects_locon_on_the_meta_sdxl(sdxl_unet):
    import copy

    unet = copy.deepcopy(sdxl_unet)
    modules = kohya_unet_modules(unet, rank=16, alpha=8.0, conv_dim=32, conv_alpha=4.0)
    with torch.device("meta"):
        wrapped = add_lora(unet, rank=16, alpha=8.0, targets=list(modules),
                           patterns={k: v for k, v in modules.items() if v != (16, 8.0)})
    assert len(wrapped) == 788
    op = unet.get_submodule("down_blocks.0.downsamplers.0.conv")
    assert tuple(op.lora_A["default"].weight.shape) == (32, 320, 3, 3)
    assert tuple(op.lora_B["default"].weight.shape) == (320, 32, 1, 1)
    assert op.lora_A["default"].stride == (2, 2) and op.scaling["default"] == 4.0 / 32


def test_tiny_locon_files_load_in_diffusers_at_the_trained_strength(tmp_path):
    from lora_files import library_warnings
    from test_loading import unet_output

    pipe = tiny_pipe()
    unet = pipe.unet
    modules = kohya_unet_modules(unet, rank=4, alpha=2.0, conv_dim=8, conv_alpha=4.0)
    # 132 transformer Linears; 12 resnets (24 3x3 + 12 time_emb_proj), 7 shortcuts, 1 downsampler, 1 upsampler
    assert (len(modules), sum(v == (8, 4.0) for v in modules.values())) == (132 + 12 + 7 + 26, 26)
    add_lora(unet, rank=4, alpha=2.0, targets=list(modules), patterns={k: v for k, v in modules.items()
                                                                       if v != (4, 2.0)})
    generator = torch.Generator().manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data = 0.05 * torch.randn(param.shape, generator=generator)
    trained = unet_output(unet)
    state = kohya_state_dict({"lora_unet": unet}, layers_per_block=unet.config.layers_per_block)
    assert {f"{name}.lora_down.weight" for name in EXAMPLE_NAMES if "input_blocks_4_0" not in name
            and "middle_block_0" not in name} <= set(state)
    assert tuple(state["lora_unet_output_blocks_2_2_conv.lora_down.weight"].shape) == (8, 64, 3, 3)
    assert tuple(state["lora_unet_output_blocks_2_2_conv.lora_up.weight"].shape) == (64, 8, 1, 1)
    assert float(state["lora_unet_input_blocks_3_0_op.alpha"]) == 4.0
    kohya_file = save_kohya(tmp_path / "locon.safetensors", state, {})
    diffusers_file = save_diffusers(tmp_path / "diffusers", unet)
    plain = unet_output(tiny_pipe().unet)
    for file in (kohya_file, diffusers_file):
        fresh = tiny_pipe()
        with library_warnings("diffusers", "peft") as heard:
            fresh.load_lora_weights(str(file.parent), weight_name=file.name)
        assert [line for line in heard if "No LoRA keys associated to" not in line] == [], file.name
        loaded = unet_output(fresh.unet)
        torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5, msg=file.name)
        assert (loaded - plain).abs().max() > 1e-3  # the LoRA changed the output
