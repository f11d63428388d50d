"""LoRA on kohya's SDXL targets (`networks/lora.py`: every Linear in the UNet's transformer blocks, with conv_dim also
the ResNet, Downsample and Upsample convs (LoCon), optionally the CLIP attention and MLP linears), and saving it as
kohya and diffusers/PEFT files. PEFT's init (down kaiming-uniform a=sqrt(5), up zeros) and scale alpha/rank are
kohya's, so the same targets, rank and alpha train the same network. docs/network.md describes the module set.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path

import torch

from lora_sweep.atomic import write_with

# Every Linear inside a Transformer2DModel of the UNet (kohya: 722 modules on SDXL base).
UNET_TARGETS = (
    r".*attentions\.\d+\.(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
    r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
)
# kohya's UNET_TARGET_REPLACE_MODULE, and the classes conv_dim (or a weights file) adds: their Linear and Conv2d
# children get LoRAs, scanned by class name as v0.8.7 does
TRANSFORMER_CLASSES = ("Transformer2DModel",)
CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# kohya's CLIPAttention / CLIPMLP linears.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ADAPTER = "default"


def add_lora(module: torch.nn.Module, *, rank: int, alpha: float, targets, dropout: float = 0.0,
             patterns: Mapping[str, tuple[int, float]] | None = None) -> list[str]:
    """Freeze `module`, attach a PEFT LoRA adapter and return the wrapped modules' names. `targets`: PEFT's
    target_modules (a regex, or exact module names); `patterns`: module name -> (rank, alpha) where it is not
    (`rank`, `alpha`), as PEFT's rank_pattern / alpha_pattern. Text encoders use peft's `inject_adapter_in_model`
    (transformers' `add_adapter` wants a newer peft than pinned)."""
    from peft import LoraConfig, inject_adapter_in_model

    module.requires_grad_(False)
    exact = {re.escape(name): value for name, value in (patterns or {}).items()}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True, target_modules=targets,
                        rank_pattern={k: r for k, (r, _) in exact.items()},
                        alpha_pattern={k: a for k, (_, a) in exact.items()})
    if type(module).__module__.startswith("diffusers."):
        module.add_adapter(config, adapter_name=ADAPTER)
    else:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in module.named_parameters() if ".lora_A" in n})


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def kohya_alpha(rank: int, alpha: float | None) -> float:
    """v0.8.7's LoRAModule: an alpha of None or 0 is the rank (scale 1)."""
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


def unet_modules(unet: torch.nn.Module, *, rank: int, alpha: float, conv_dim: int | None = None,
                 conv_alpha: float | None = None) -> dict[str, tuple[int, float]]:
    """v0.8.7's U-Net LoRA modules (`LoRANetwork.create_modules`) by diffusers name -> (rank, alpha).

    Every Linear and Conv2d child of a Transformer2DModel; with conv_dim set (0 included, as v0.8.7 tests `is not
    None`) also those of ResnetBlock2D, Downsample2D and Upsample2D. Linear and 1x1 convs take (rank, alpha); kxk
    convs take (conv_dim, conv_alpha: null is 1.0) and are skipped when conv_dim is 0. SDXL: 722, or 788 with conv_dim.
    """
    classes = TRANSFORMER_CLASSES + (CONV_CLASSES if conv_dim is not None else ())
    found: dict[str, tuple[int, float]] = {}
    for name, pointwise in kohya_candidates(unet, classes).items():
        if pointwise:
            found[name] = (rank, kohya_alpha(rank, alpha))
        elif conv_dim:
            found[name] = (conv_dim, kohya_alpha(conv_dim, 1.0 if conv_alpha is None else conv_alpha))
    return found


def kohya_candidates(model: torch.nn.Module, classes) -> dict[str, bool]:
    """Every Linear / Conv2d under a module whose class name is in `classes`, by name -> whether it takes the network
    rank (a Linear or 1x1 conv) rather than conv_dim (a kxk conv)."""
    out = {}
    for parent, module in model.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            kind = type(child).__name__
            if kind in ("Linear", "Conv2d"):
                out[f"{parent}.{child_name}"] = kind == "Linear" or tuple(child.kernel_size) == (1, 1)
    return out


def unet_targets(net, unet: torch.nn.Module) -> tuple[str | list[str], dict[str, tuple[int, float]]]:
    """PEFT's target_modules and add_lora's `patterns` for network config `net` on `unet`: kohya's transformer Linears
    (UNET_TARGETS) without conv_dim, else `unet_modules`' names with the modules not at (rank, alpha)."""
    conv_dim = network_value(net, "conv_dim")
    if conv_dim is None:
        return UNET_TARGETS, {}
    modules = unet_modules(unet, rank=net.rank, alpha=net.alpha, conv_dim=conv_dim,
                           conv_alpha=network_value(net, "conv_alpha"))
    default = (net.rank, float(net.alpha))
    return list(modules), {name: value for name, value in modules.items() if value != default}


_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}


def sgm_unet_name(diffusers_name: str, layers_per_block: int, up_attention: Collection[int] = (0, 1)) -> str:
    """A diffusers UNet module path as kohya's SGM name (docs/network.md has the table). With lpb = layers_per_block
    and a level of lpb + 1 slots: down_blocks.b.{resnets,attentions}.j -> input_blocks.{1 + b*(lpb+1) + j}.{0,1},
    downsamplers.0.conv -> input_blocks.{(b+1)*(lpb+1)}.0.op, mid_block resnets.i / attentions.0 -> middle_block.{2i}
    / .1, up_blocks.b.{resnets,attentions}.j -> output_blocks.{b*(lpb+1) + j}.{0,1}, upsamplers.0.conv ->
    output_blocks.{b*(lpb+1) + lpb}.{2, or 1 where up block b (not in `up_attention`) has no attention}.conv. Inside a
    resnet conv1, conv2, time_emb_proj, conv_shortcut are in_layers.2, out_layers.3, emb_layers.1, skip_connection.
    """
    level = layers_per_block + 1

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"{_RESNET_SGM.get(head, head)}{'.' + tail if tail else ''}"

    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", diffusers_name):
        side, block, kind, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        first = 1 + block * level if side == "down" else block * level
        where = "input_blocks" if side == "down" else "output_blocks"
        return f"{where}.{first + index}.{0 if kind == 'resnets' else 1}.{resnet(rest) if kind == 'resnets' else rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", diffusers_name):
        return f"input_blocks.{(int(m[1]) + 1) * level}.0.op"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", diffusers_name):
        block = int(m[1])
        return f"output_blocks.{block * level + layers_per_block}.{2 if block in up_attention else 1}.conv"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", diffusers_name):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", diffusers_name):
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"not a UNet module kohya's LoRA targets: {diffusers_name}")


def up_blocks_with_attention(unet: torch.nn.Module) -> frozenset[int]:
    """The indices b of up_blocks.b that have attentions (their upsampler sits in SGM slot 2, not 1)."""
    return frozenset(int(m[1]) for name, _ in unet.named_modules()
                     if (m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.0", name)))


def kohya_module_name(prefix: str, name: str, layers_per_block: int, up_attention: Collection[int] = (0, 1)) -> str:
    """kohya's module name (`lora_unet_input_blocks_4_1_proj_in`, `lora_te1_text_model_encoder_layers_0_mlp_fc1`) of
    the diffusers / transformers module `name` of the part `prefix` (lora_unet, lora_te1, lora_te2)."""
    if prefix == "lora_unet":
        path = sgm_unet_name(name, layers_per_block, up_attention)
    else:  # kohya names CLIP modules from `text_model.`; transformers 5's CLIPTextModel dropped that level
        path = name if name.startswith("text_model.") else f"text_model.{name}"
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_state_dict(
    modules: Mapping[str, torch.nn.Module], *, layers_per_block: int, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """kohya keys of every LoRA-wrapped module; `modules` maps a prefix (`lora_unet`, `lora_te1`, `lora_te2`) to its
    model. Each module's `.alpha` is the one its PEFT layer trains with, so the file's alpha/rank is the trained
    scale. A conv LoRA keeps PEFT's shapes, which are kohya's: lora_down (r, in, k, k), lora_up (out, r, 1, 1)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, model in modules.items():
        up_attention = up_blocks_with_attention(model) if prefix == "lora_unet" else ()
        for name, layer in model.named_modules():
            if not hasattr(layer, "lora_A") or ADAPTER not in getattr(layer, "lora_A", {}):
                continue
            key = kohya_module_name(prefix, name, layers_per_block, up_attention)
            out[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]), dtype=dtype)
    return out


def save_kohya(path: Path, state: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a kohya-format LoRA file atomically."""
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in metadata.items()}
    return write_with(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def save_diffusers(folder: Path, unet, text_encoder=None, text_encoder_2=None) -> Path:
    """Write `pytorch_lora_weights.safetensors` into `folder`, atomically: PEFT keys (`unet.<module>.lora_A.weight`,
    `text_encoder.`, `text_encoder_2.`) and each model's LoraConfig (rank, alpha, targets) in the safetensors metadata
    `lora_adapter_metadata`, as diffusers' own writers store it, so `load_lora_weights` applies alpha/rank.

    The keys stay PEFT's, unconverted, as `save_lora_adapter` writes them: diffusers' loader converts the UNet's
    older `.lora.down` names only when the first key lacks `lora_A`, and kohya's targets put `proj_in` first.
    """
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    def layers(model):
        return get_peft_model_state_dict(model, adapter_name=ADAPTER) if model is not None else None

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


# network_args keys that map onto network.* keys, with v0.8.7's conversion of the string
NETWORK_ARGS_KEYS = {"conv_dim": int, "conv_alpha": float, "rank_dropout": float, "module_dropout": float}
# networks/lora.py's block-wise keys: v0.8.7's block index never matches SDXL's module names (docs/network.md)
BLOCKWISE_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                  "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")


def parse_network_args(items) -> dict[str, str]:
    """`key=value` strings split as v0.8.7 splits them (exactly one "=", values stay strings); ValueError otherwise."""
    parsed = {}
    for item in items:
        parts = str(item).split("=")
        if len(parts) != 2:
            raise ValueError(f"'{item}' is not key=value with exactly one '='")
        parsed[parts[0]] = parts[1]
    return parsed


def network_args_problems(net) -> list[str]:
    """Every problem of network.network_args, one paragraph each: not key=value, a block-wise key, `dropout`, an
    unknown key, a value that does not convert as v0.8.7 converts it, or one that disagrees with its network.* key."""
    try:
        args = parse_network_args(net.network_args)
    except ValueError as exc:
        return [f"network.network_args: {exc} (v0.8.7 splits each on '=' and fails otherwise)."]
    problems = []
    for key, value in args.items():
        if key in BLOCKWISE_ARGS:
            problems.append(
                f"network.network_args: '{key}' is refused: v0.8.7's block index recognises only diffusers block "
                "names, so on SDXL's input_blocks / middle_block / output_blocks every module gets index -1 "
                "(block_dims[24], no per-block learning rate). Leave it out; docs/network.md explains.")
        elif key == "dropout":
            problems.append("network.network_args: 'dropout' does nothing in v0.8.7's LoRA (it only reaches "
                            "ss_network_args); set network.dropout (kohya's --network_dropout) instead.")
        elif key not in NETWORK_ARGS_KEYS:
            problems.append(f"network.network_args: '{key}' is not a key networks.lora reads (v0.8.7 ignores it "
                            f"silently; lora-sweep refuses it). Accepted: {', '.join(NETWORK_ARGS_KEYS)}.")
        else:
            try:
                converted = NETWORK_ARGS_KEYS[key](value)
            except ValueError:
                problems.append(f"network.network_args: {key}='{value}' is not {NETWORK_ARGS_KEYS[key].__name__} "
                                f"(v0.8.7 converts it with {NETWORK_ARGS_KEYS[key].__name__}()).")
                continue
            own = getattr(net, key)
            if own is not None and own != converted:
                problems.append(f"network.network_args: {key}={value} disagrees with network.{key}={own}; set it "
                                "one way only.")
    return problems


def network_value(net, key: str):
    """network.<key>, or its network_args value converted as v0.8.7 converts it (network_args_problems passed)."""
    own = getattr(net, key)
    if own is not None:
        return own
    value = parse_network_args(net.network_args).get(key)
    return None if value is None else NETWORK_ARGS_KEYS[key](value)


def kohya_dropouts(cfg) -> tuple[float | None, float | None, float | None]:
    """(network_dropout, rank_dropout, module_dropout) as v0.8.7's LoRAModule receives them: None is no dropout and
    no draw; a network.dropout of 0.0 is None (v0.8.7's default); network.dim_from_weights turns all three off
    (create_network_from_weights passes none of them)."""
    net = cfg.network
    if net.dim_from_weights:
        return None, None, None
    return (net.dropout or None), network_value(net, "rank_dropout"), network_value(net, "module_dropout")
