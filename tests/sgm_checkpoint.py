"""A single-file SDXL checkpoint from a diffusers pipeline (the tiny model), for the loader's single-file tests:
diffusers keys renamed to the original SGM / LDM / open_clip layout that `from_single_file` reads."""

from __future__ import annotations

from pathlib import Path

from lora_sweep.model.tiny_sdxl import TINY_RECIPE_VERSION


def save_single_file(pipe, path: Path, recipe: str | None = TINY_RECIPE_VERSION) -> None:
    """Write an SDXL-architecture pipeline's weights as one .safetensors in the original (SGM) checkpoint layout.

    Why: it lets the tests drive the single-file branch of `load_sdxl` with no real checkpoint.
    The metadata names the recipe, so the loader takes the tiny configs; recipe=None writes no metadata, as a
    real SDXL-base-architecture checkpoint has none (the loader then uses SDXL-base's configs).
    """
    from safetensors.torch import save_file

    tensors = {"model.diffusion_model." + k: v for k, v in unet_to_sgm(pipe.unet).items()}
    tensors |= {"first_stage_model." + k: v for k, v in _vae_to_ldm(pipe.vae).items()}
    for key, value in pipe.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            tensors["conditioner.embedders.0.transformer." + _with_prefix(key, "text_model.")] = value
    tensors |= {"conditioner.embedders.1.model." + k: v for k, v in _clip_to_open_clip(pipe.text_encoder_2).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"lora_sweep.recipe": recipe} if recipe else None)


def _with_prefix(key: str, prefix: str) -> str:
    return key if key.startswith(prefix) else prefix + key


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        key = key.replace(old, new)
    return key


_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                  ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def unet_to_sgm(unet) -> dict:
    """diffusers UNet keys -> SGM (input_blocks / middle_block / output_blocks) keys."""
    import re

    per_level = unet.config.layers_per_block + 1  # resnets (+ attentions) + the down/upsampler slot
    up_has_attention = {int(k.split(".")[1]) for k in unet.state_dict() if re.match(r"up_blocks\.\d+\.attentions", k)}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, value in unet.state_dict().items():
        head, _, leaf = key.rpartition(".")
        if head in fixed:
            out[f"{fixed[head]}.{leaf}"] = value
            continue
        parts = key.split(".")
        if parts[0] == "mid_block":
            index, rest = int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * index}.{_rename(rest, _RESNET_TO_LDM)}" if parts[1] == "resnets" \
                else f"middle_block.1.{rest}"
        else:
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            down = parts[0] == "down_blocks"
            first = 1 + block * per_level if down else block * per_level
            if kind == "resnets":
                new = f"{first + index}.0.{_rename(rest, _RESNET_TO_LDM)}"
            elif kind == "attentions":
                new = f"{first + index}.1.{rest}"
            elif down:  # downsamplers.0.conv.*
                new = f"{first + per_level - 1}.0.op.{rest.removeprefix('conv.')}"
            else:  # upsamplers.0.conv.* sits after the resnet (and the attention, where the level has one)
                new = f"{first + per_level - 1}.{2 if block in up_has_attention else 1}.{rest}"
            new = ("input_blocks." if down else "output_blocks.") + new
        out[new] = value
    return out


def _vae_to_ldm(vae) -> dict:
    """diffusers AutoencoderKL keys -> original LDM VAE keys (attention projections as 1x1 convs)."""
    levels = len(vae.config.block_out_channels)
    pairs = (("conv_norm_out", "norm_out"), ("mid_block.resnets.0", "mid.block_1"),
             ("mid_block.resnets.1", "mid.block_2"), ("mid_block.attentions.0", "mid.attn_1"),
             ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
             ("conv_shortcut", "nin_shortcut"), ("downsamplers.0", "downsample"), ("upsamplers.0", "upsample"),
             ("resnets", "block"))
    out = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
            key = ".".join([parts[0], "down" if parts[1] == "down_blocks" else "up", str(level), *parts[3:]])
        new = _rename(key, pairs)
        if ".attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def _clip_to_open_clip(text_encoder_2) -> dict:
    """CLIPTextModelWithProjection keys -> open_clip keys (q/k/v fused into in_proj, projection transposed)."""
    import torch

    state = {_with_prefix(k, "text_model.").removeprefix("text_model."): v
             for k, v in text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
    out = {"positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T}
    pairs = (("encoder.layers.", "transformer.resblocks."), ("self_attn.", "attn."), ("layer_norm1", "ln_1"),
             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
    for key in sorted(state):
        if ".q_proj." in key:
            leaf = key.rsplit(".", 1)[1]
            fused = torch.cat([state[key.replace(".q_proj.", f".{n}_proj.")] for n in "qkv"], dim=0)
            out[_rename(key.replace(".q_proj.", ".").replace(f".{leaf}", f".in_proj_{leaf}"), pairs)] = fused
        elif ".k_proj." not in key and ".v_proj." not in key:
            out[_rename(key, pairs)] = state[key]
    return out

