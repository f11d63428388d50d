"""LoRA on kohya's SDXL targets (`networks/lora.py`: every Linear in the UNet's transformer blocks, optionally the CLIP
attention and MLP linears), and saving it as kohya and diffusers/PEFT files. PEFT's init (down kaiming-uniform
a=sqrt(5), up zeros) and scale alpha/rank are kohya's, so the same targets, rank and alpha train the same network.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_sweep.atomic import write_with

# Every Linear inside a Transformer2DModel of the UNet (kohya: 722 modules on SDXL base).
UNET_TARGETS = (
    r".*attentions\.\d+\.(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
    r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
)
# kohya's CLIPAttention / CLIPMLP linears.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ADAPTER = "default"


def add_lora(module: torch.nn.Module, *, rank: int, alpha: float, targets) -> list[str]:
    """Freeze `module`, attach a PEFT LoRA adapter and return the wrapped modules' names. Text encoders use peft's
    `inject_adapter_in_model` (transformers' `add_adapter` wants a newer peft than pinned). PEFT's `lora_dropout`
    (on the input) stays off: kohya's dropouts are model/regularization.py's."""
    from peft import LoraConfig, inject_adapter_in_model

    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True, target_modules=targets)
    if type(module).__module__.startswith("diffusers."):
        module.add_adapter(config, adapter_name=ADAPTER)
    else:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in module.named_parameters() if ".lora_A" in n})


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def sgm_unet_name(diffusers_name: str, layers_per_block: int) -> str:
    """A diffusers UNet module path as kohya's SGM name: down_blocks.b.attentions.j -> input_blocks.{1 + b*(lpb+1) +
    j}.1, mid_block.attentions.0 -> middle_block.1, up_blocks.b.attentions.j -> output_blocks.{b*(lpb+1) + j}.1."""
    lpb = layers_per_block
    m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", diffusers_name)
    if m:
        return f"input_blocks.{1 + int(m[1]) * (lpb + 1) + int(m[2])}.1.{m[3]}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", diffusers_name)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", diffusers_name)
    if m:
        return f"output_blocks.{int(m[1]) * (lpb + 1) + int(m[2])}.1.{m[3]}"
    raise ValueError(f"not a UNet transformer module: {diffusers_name}")


def kohya_state_dict(
    modules: Mapping[str, torch.nn.Module], *, layers_per_block: int, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """kohya keys of every LoRA-wrapped module; `modules` maps a prefix (`lora_unet`, `lora_te1`, `lora_te2`) to its
    model. Each module's `.alpha` is the one its PEFT layer trains with, so the file's alpha/rank is the trained
    scale."""
    out: dict[str, torch.Tensor] = {}
    for prefix, model in modules.items():
        for name, layer in model.named_modules():
            if not hasattr(layer, "lora_A") or ADAPTER not in getattr(layer, "lora_A", {}):
                continue
            if prefix == "lora_unet":
                path = sgm_unet_name(name, layers_per_block)
            else:  # kohya names CLIP modules from `text_model.`; transformers 5's CLIPTextModel dropped that level
                path = name if name.startswith("text_model.") else f"text_model.{name}"
            key = f"{prefix}_{path.replace('.', '_')}"
            out[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]), dtype=dtype)
    return out


def save_kohya(path: Path, state: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a kohya-format LoRA file atomically, with v0.8.7's `sshs_*` hashes added (`addnet_hashes`)."""
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in metadata.items()}
    meta |= addnet_hashes(state, meta)
    return write_with(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def addnet_hashes(state: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as v0.8.7's `precalculate_safetensors_hashes` makes them for
    sd-webui-additional-networks: over the file `state` gives with only the `ss_*` metadata in its header, the
    sha256 of the bytes after the header, and 8 hex of the sha256 of 64 KiB at 1 MiB (of nothing, for a small file).
    """
    from safetensors.torch import save

    blob = save(state, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(blob[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(blob[header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]}


def save_diffusers(folder: Path, unet, text_encoder=None, text_encoder_2=None, *,
                   dtype: torch.dtype | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` into `folder`, atomically: PEFT keys (`unet.<module>.lora_A.weight`,
    `text_encoder.`, `text_encoder_2.`) and each model's LoraConfig (rank, alpha, targets) in the safetensors metadata
    `lora_adapter_metadata`, as diffusers' own writers store it, so `load_lora_weights` applies alpha/rank. `dtype`:
    every tensor cast to it (None: as trained).

    The keys stay PEFT's, unconverted, as `save_lora_adapter` writes them: diffusers' loader converts the UNet's
    older `.lora.down` names only when the first key lacks `lora_A`, and kohya's targets put `proj_in` first.
    """
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    def layers(model):
        if model is None:
            return None
        tensors = get_peft_model_state_dict(model, adapter_name=ADAPTER)
        return {k: v.to(dtype) for k, v in tensors.items()} if dtype is not None else tensors

    def config(model):
        return model.peft_config[ADAPTER].to_dict() if model is not None else None

    target = Path(folder) / "pytorch_lora_weights.safetensors"

    def write(tmp: Path) -> None:
        StableDiffusionXLPipeline.save_lora_weights(
            str(tmp.parent),
            unet_lora_layers=layers(unet),
            text_encoder_lora_layers=layers(text_encoder),
            text_encoder_2_lora_layers=layers(text_encoder_2),
            unet_lora_adapter_metadata=config(unet),
            text_encoder_lora_adapter_metadata=config(text_encoder),
            text_encoder_2_lora_adapter_metadata=config(text_encoder_2),
            weight_name=tmp.name,
            safe_serialization=True,
        )

    return write_with(target, write)


def set_lora_multiplier(modules, multiplier: float) -> None:
    """Every PEFT LoRA layer's scaling set to its alpha / rank times `multiplier` (kohya's LoRAModule.multiplier)."""
    from peft.tuners.lora import LoraLayer

    for module in modules:
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                base = layer.__dict__.setdefault("_lora_sweep_scaling", dict(layer.scaling))
                for adapter, scale in base.items():
                    layer.scaling[adapter] = scale * multiplier
                layer.__dict__["_lora_sweep_multiplier"] = multiplier  # kohya's dropout forward multiplies by it alone


def kohya_dropouts(cfg) -> tuple[float | None, float | None, float | None]:
    """(network_dropout, rank_dropout, module_dropout) as v0.8.7's LoRAModule receives them; None is off (no draw).

    network.dropout 0 is None (F.dropout with p=0 draws nothing); all three are None under network.dim_from_weights
    (v0.8.7's create_network_from_weights receives none of them). docs/kohya-reference.md §8.
    """
    net = cfg.network
    if net.dim_from_weights:
        return None, None, None
    return net.dropout or None, net.rank_dropout, net.module_dropout
