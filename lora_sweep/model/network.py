"""LoRA on kohya's SDXL targets (`networks/lora.py`: every Linear in the UNet's transformer blocks, with conv_dim also
the ResNet, Downsample and Upsample convs (LoCon), optionally the CLIP attention and MLP linears), and saving it as
kohya and diffusers/PEFT files. PEFT is the mechanism (scale alpha/rank, as kohya); the initial values and the
parameter order are v0.8.7's (`init_as_kohya`, `kohya_lora_parameters`). docs/network.md describes the module set,
docs/kohya-exact.md the initialisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import torch

from lora_sweep.atomic import write_with
from lora_sweep.errors import UserError
from lora_sweep.model.lora_file import read_lora_file
from lora_sweep.model.network_settings import dim_from_weights_ignores, network_value

log = logging.getLogger(__name__)

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


def add_lora(module: torch.nn.Module, *, rank: int, alpha: float, targets,
             patterns: Mapping[str, tuple[int, float]] | None = None) -> list[str]:
    """Freeze `module`, attach a PEFT LoRA adapter and return the wrapped modules' names. `targets`: PEFT's
    target_modules (a regex, or exact module names); `patterns`: module name -> (rank, alpha) where it is not
    (`rank`, `alpha`), as PEFT's rank_pattern / alpha_pattern. Text encoders use peft's `inject_adapter_in_model`
    (transformers' `add_adapter` wants a newer peft than pinned). PEFT's `lora_dropout` (on the input)
    stays off: kohya's dropouts are model/regularization.py's."""
    from peft import LoraConfig, inject_adapter_in_model

    module.requires_grad_(False)
    exact = {re.escape(name): value for name, value in (patterns or {}).items()}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True, target_modules=targets,
                        rank_pattern={k: r for k, (r, _) in exact.items()},
                        alpha_pattern={k: a for k, (_, a) in exact.items()})
    if type(module).__module__.startswith("diffusers."):
        module.add_adapter(config, adapter_name=ADAPTER)
    else:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in module.named_parameters() if ".lora_A" in n})


def add_network(net, unet: torch.nn.Module, text_encoders, *, fp32=contextlib.nullcontext) -> None:
    """Build network config `net`'s LoRA as v0.8.7 does: on the U-Net (none under network_train_text_encoder_only,
    whose U-Net is frozen), on both text encoders when network.train_text_encoder, initialised with v0.8.7's draws
    from the global torch RNG (`init_as_kohya`: every module kohya creates draws, trained or not), then loaded from
    network.network_weights if set. `fp32(model)`: the context each adapter is created in (the trainer's
    placement.adapters_in_fp32)."""
    named = {"lora_unet": unet, "lora_te1": text_encoders[0], "lora_te2": text_encoders[1]}
    weights = read_network_weights(net.network_weights, named) if net.network_weights else None
    ignored = dim_from_weights_ignores(net) if net.dim_from_weights else []
    if ignored:  # v0.8.7 ignores them silently
        log.warning("network.dim_from_weights takes ranks and alphas from network.network_weights and trains without "
                    "dropout, as v0.8.7: %s %s ignored", ", ".join(ignored), "is" if len(ignored) == 1 else "are")
    modules = created_modules(net, unet, text_encoders, weights)  # named before PEFT wraps them
    with undone_draws():
        _add_adapters(net, unet, text_encoders, weights, fp32)
    init_as_kohya(modules)
    if weights is not None:
        load_network_weights(weights, named, path=net.network_weights)
        if not net.dim_from_weights:
            warn_file_alphas(net, weights)


def _add_adapters(net, unet: torch.nn.Module, text_encoders, weights, fp32) -> None:
    """PEFT's adapters on the parts `net` trains (add_network)."""
    if net.network_train_text_encoder_only:
        unet.requires_grad_(False)  # v0.8.7's apply_to builds no U-Net LoRA
    else:
        targets, patterns = unet_targets(net, unet, weights)
        with fp32(unet):
            _add_part_lora(net, unet, "lora_unet", targets, patterns)
    if net.train_text_encoder:
        for prefix, encoder in zip(("lora_te1", "lora_te2"), text_encoders, strict=True):
            targets, patterns = text_encoder_targets(net, encoder, prefix, weights)
            with fp32(encoder):
                _add_part_lora(net, encoder, prefix, targets, patterns)
            encoder.train()


def _add_part_lora(net, model: torch.nn.Module, prefix: str, targets, patterns) -> None:
    """add_lora with `net`'s rank and alpha; no targets (a dim_from_weights file without this part) freezes the part,
    as v0.8.7 then builds no module there and trains the rest."""
    if not targets:
        model.requires_grad_(False)
        log.warning("network.dim_from_weights: the file of network.network_weights has no module of this model's %s "
                    "(kohya prefix %s): no LoRA there, as v0.8.7 builds none; the other parts train.",
                    _PART_NAMES[prefix], prefix)
        return
    add_lora(model, rank=net.rank, alpha=kohya_alpha(net.rank, net.alpha), targets=targets, patterns=patterns)


_PART_NAMES = {"lora_unet": "U-Net", "lora_te1": "text encoder 1", "lora_te2": "text encoder 2"}


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


def unet_targets(net, unet: torch.nn.Module, weights: Mapping[str, tuple] | None = None
                 ) -> tuple[str | list[str], dict[str, tuple[int, float]]]:
    """PEFT's target_modules and add_lora's `patterns` for network config `net` on `unet`: kohya's transformer Linears
    (UNET_TARGETS) without conv_dim, else `unet_modules`' names with the modules not at (rank, alpha); under
    network.dim_from_weights the modules of `weights` (`read_network_weights`) with their ranks and alphas."""
    if net.dim_from_weights:
        return _from_file(weights, unet, "lora_unet")
    conv_dim = network_value(net, "conv_dim")
    if conv_dim is None:
        return UNET_TARGETS, {}
    modules = unet_modules(unet, rank=net.rank, alpha=net.alpha, conv_dim=conv_dim,
                           conv_alpha=network_value(net, "conv_alpha"))
    default = (net.rank, kohya_alpha(net.rank, net.alpha))
    return list(modules), {name: value for name, value in modules.items() if value != default}


def text_encoder_targets(net, encoder: torch.nn.Module, prefix: str, weights: Mapping[str, tuple] | None = None
                         ) -> tuple[str | list[str], dict[str, tuple[int, float]]]:
    """`unet_targets` for a text encoder (`prefix` lora_te1 / lora_te2): kohya's CLIP linears, or the file's."""
    if net.dim_from_weights:
        return _from_file(weights, encoder, prefix)
    return TEXT_ENCODER_TARGETS, {}


def _from_file(weights, model, prefix: str) -> tuple[list[str], dict[str, tuple[int, float]]]:
    modules = weights_targets(weights or {}, model, prefix)
    return list(modules), modules


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
    model. Each module's `.alpha` is its PEFT layer's lora_alpha, in the LoRA weights' dtype and then `dtype`, as
    v0.8.7 casts its alpha buffer. A conv LoRA keeps PEFT's shapes, which are kohya's: lora_down (r, in, k, k),
    lora_up (out, r, 1, 1)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, model in modules.items():
        up_attention = up_blocks_with_attention(model) if prefix == "lora_unet" else ()
        for name, layer in model.named_modules():
            if not hasattr(layer, "lora_A") or ADAPTER not in getattr(layer, "lora_A", {}):
                continue
            key = kohya_module_name(prefix, name, layers_per_block, up_attention)
            out[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            # v0.8.7's alpha buffer is in the network's dtype (fp16 / bf16 under precision.full_*) before the save cast
            alpha = torch.tensor(float(layer.lora_alpha[ADAPTER]), dtype=layer.lora_A[ADAPTER].weight.dtype)
            out[f"{key}.alpha"] = alpha.to(dtype)
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


TEXT_ENCODER_CLASSES = ("CLIPAttention", "CLIPMLP")


def read_network_weights(path: str | Path, parts: Mapping[str, torch.nn.Module]) -> dict[str, tuple]:
    """network.network_weights by this model's kohya module name -> (lora_down, lora_up, alpha), fp32 on the CPU;
    `parts` maps kohya's prefixes (lora_unet, lora_te1, lora_te2) to the models a PEFT file's names are converted
    for. A name that matches no module of the model is kept as `<part>:<name>` (an unexpected key)."""
    out = {}
    for label, value in read_lora_file(path).items():
        part, name = label.split(":", 1)
        kohya_file = name.startswith(part)  # a kohya name carries its prefix; a PEFT name is the module path
        out[name if kohya_file else (_kohya_name_of(part, name, parts.get(part)) or label)] = value
    return out


def _kohya_name_of(prefix: str, name: str, model: torch.nn.Module | None) -> str | None:
    if model is None:
        return None
    lpb = getattr(getattr(model, "config", None), "layers_per_block", 0)
    try:
        up_attention = up_blocks_with_attention(model) if prefix == "lora_unet" else ()
        return kohya_module_name(prefix, name, lpb, up_attention)
    except ValueError:
        return None


def weights_targets(weights: Mapping[str, tuple], model: torch.nn.Module, prefix: str) -> dict[str, tuple[int, float]]:
    """network.dim_from_weights: exactly the modules of `model` the file has, by diffusers name -> (the file's rank,
    the alpha PEFT scales with: the file's, or the rank where it has none or 0, as v0.8.7's
    create_network_from_weights and LoRAModule); v0.8.7 scans the U-Net's conv classes too."""
    classes = TRANSFORMER_CLASSES + CONV_CLASSES if prefix == "lora_unet" else TEXT_ENCODER_CLASSES
    lpb = getattr(getattr(model, "config", None), "layers_per_block", 0)
    up_attention = up_blocks_with_attention(model) if prefix == "lora_unet" else ()
    found = {}
    for name in kohya_candidates(model, classes):
        value = weights.get(kohya_module_name(prefix, name, lpb, up_attention))
        if value is not None:
            found[name] = (value[0].shape[0], kohya_alpha(value[0].shape[0], value[2]))
    return found


def load_network_weights(weights: Mapping[str, tuple], parts: Mapping[str, torch.nn.Module], *,
                         path: str) -> tuple[int, int, int]:
    """Copy the file's lora_down / lora_up into the LoRA layers of `parts` (kohya prefix -> model), as
    v0.8.7's load_state_dict(strict=False); returns (loaded, missing, unexpected) module counts, logged as a warning
    when some are missing or unexpected. Each layer keeps the scale it was built with; its lora_alpha becomes the
    file's where the file has one (v0.8.7's quirk: saved and max-normed with it, docs/network.md), else stays.
    UserError on a shape mismatch."""
    seen, missing, wrong = set(), 0, []
    for prefix, model in parts.items():
        lpb = getattr(getattr(model, "config", None), "layers_per_block", 0)
        up_attention = up_blocks_with_attention(model) if prefix == "lora_unet" else ()
        for name, layer in model.named_modules():
            if not hasattr(layer, "lora_A") or ADAPTER not in getattr(layer, "lora_A", {}):
                continue
            key = kohya_module_name(prefix, name, lpb, up_attention)
            if key not in weights:
                missing += 1
                continue
            seen.add(key)
            down, up, alpha = weights[key]
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            if down.shape != a.shape or up.shape != b.shape:
                wrong.append(f"{key}: the file's lora_down is {tuple(down.shape)}, this network's {tuple(a.shape)}")
                continue
            with torch.no_grad():
                a.copy_(down)
                b.copy_(up)
            if alpha is not None:  # v0.8.7's load_state_dict(strict=False) leaves a missing alpha buffer as built
                layer.lora_alpha[ADAPTER] = alpha
    if wrong:
        raise UserError(f"network.network_weights: '{path}' does not fit this network ({len(wrong)} modules, e.g. "
                        f"{wrong[0]}). v0.8.7 refuses the shape mismatch: set network.rank / network.conv_dim to the "
                        "file's ranks, or set network.dim_from_weights to true; a file of another model does not fit.")
    unexpected = len(set(weights) - seen)
    if not seen:
        raise UserError(f"network.network_weights: none of the {unexpected} modules of '{path}' is a module of this "
                        "network (another model's LoRA, or only the side this run does not train).")
    if missing or unexpected:
        log.warning("network.network_weights: %d modules loaded from %s; %d of this network's modules are not in the "
                    "file (they start as new), %d of the file's are not in this network (ignored), as v0.8.7's "
                    "load_state_dict(strict=False)", len(seen), path, missing, unexpected)
    return len(seen), missing, unexpected


def file_alpha_differences(net, weights: Mapping[str, tuple]) -> dict[str, tuple[float, list[float]]]:
    """network.network_weights without dim_from_weights: by setting (network.alpha, network.conv_alpha), its alpha
    and the file's differing alphas among the modules this network builds (docs/network.md "The alpha quirk")."""
    conv_dim = network_value(net, "conv_dim")
    conv_alpha = network_value(net, "conv_alpha")
    own = {"network.alpha": kohya_alpha(net.rank, net.alpha)}
    if conv_dim:
        own["network.conv_alpha"] = kohya_alpha(conv_dim, 1.0 if conv_alpha is None else conv_alpha)
    sides = (() if net.network_train_text_encoder_only else ("lora_unet",)) + (
        ("lora_te1", "lora_te2") if net.train_text_encoder else ())
    found: dict[str, set[float]] = {}
    for key, (down, _, alpha) in weights.items():
        setting = "network.conv_alpha" if down.ndim == 4 and down.shape[-1] > 1 else "network.alpha"
        if alpha is None or setting not in own or not key.startswith(sides) or float(alpha) == own[setting]:
            continue
        found.setdefault(setting, set()).add(float(alpha))
    return {setting: (own[setting], sorted(alphas)) for setting, alphas in found.items()}


def warn_file_alphas(net, weights: Mapping[str, tuple]) -> None:
    """Warn of v0.8.7's alpha quirk when the file's alphas differ from the network's: the two saved files differ."""
    for setting, (own, alphas) in file_alpha_differences(net, weights).items():
        files = ", ".join(map(str, alphas))
        log.warning("network.network_weights: the file's alpha %s differs from %s=%s. As v0.8.7, training scales by "
                    "%s / rank, but the kohya file saved from this run carries the file's alpha (%s) while the "
                    "diffusers file carries %s=%s, so the two apply the LoRA at different strengths. Set %s to the "
                    "file's alpha (%s) to avoid it.", files, setting, own, setting, files, setting, own, setting,
                    alphas[0])


# Child names in the order kohya's SGM U-Net (library/sdxl_original_unet.py) defines them, class by class
SGM_ORDER = {name: rank for rank, name in enumerate((
    "input_blocks", "middle_block", "output_blocks",  # SdxlUNet2DConditionModel
    "in_layers", "emb_layers", "out_layers", "skip_connection",  # ResnetBlock2D
    "op", "conv",  # Downsample2D, Upsample2D
    "norm", "proj_in", "transformer_blocks", "proj_out",  # Transformer2DModel
    "attn1", "ff", "attn2",  # BasicTransformerBlock
    "to_q", "to_k", "to_v", "to_out",  # CrossAttention
    "net", "proj",  # FeedForward, GEGLU
))}


def sgm_order_key(sgm_name: str) -> tuple[int, ...]:
    """Where the module `sgm_name` (`input_blocks.4.1.transformer_blocks.0.ff.net.2`) comes in kohya's U-Net's
    named_modules; KeyError for a child name kohya's U-Net does not have."""
    return tuple(int(part) if part.isdigit() else SGM_ORDER[part] for part in sgm_name.split("."))


def kohya_unet_order(unet: torch.nn.Module, names) -> list[str]:
    """The diffusers module `names` of `unet` in the order v0.8.7 creates their LoRA modules."""
    lpb, up_attention = unet.config.layers_per_block, up_blocks_with_attention(unet)
    return sorted(names, key=lambda name: sgm_order_key(sgm_unet_name(name, lpb, up_attention)))


def created_modules(net, unet: torch.nn.Module, text_encoders, weights: Mapping[str, tuple] | None = None
                    ) -> list[tuple[torch.nn.Module, str, int]]:
    """Every LoRA module v0.8.7's LoRANetwork creates for network config `net`, in creation order, as (model, module
    name, rank): all of both text encoders' CLIP linears and the U-Net's targets (`unet_modules`), or under
    network.dim_from_weights the modules of the file `weights` (`read_network_weights`) with its ranks."""
    out = []
    for prefix, encoder in zip(("lora_te1", "lora_te2"), text_encoders, strict=True):
        if net.dim_from_weights:
            ranks = {name: rank for name, (rank, _) in weights_targets(weights or {}, encoder, prefix).items()}
        else:  # every CLIP target is a Linear, so every one takes the network rank
            ranks = dict.fromkeys(kohya_candidates(encoder, TEXT_ENCODER_CLASSES), net.rank)
        out += [(encoder, name, rank) for name, rank in ranks.items()]
    if net.dim_from_weights:
        found = weights_targets(weights or {}, unet, "lora_unet")
    else:
        found = unet_modules(unet, rank=net.rank, alpha=kohya_alpha(net.rank, net.alpha),
                             conv_dim=network_value(net, "conv_dim"), conv_alpha=network_value(net, "conv_alpha"))
    return out + [(unet, name, found[name][0]) for name in kohya_unet_order(unet, found)]


def lora_module_draws(base: torch.nn.Module, rank: int) -> torch.Tensor:
    """The draws of v0.8.7's LoRAModule.__init__ for the Linear or Conv2d `base` at `rank`, from the global torch RNG;
    returns lora_down's weight (fp32, CPU). Built as kohya builds them, so torch's own init draws are the same."""
    if type(base).__name__ == "Conv2d":
        down = torch.nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
        torch.nn.Conv2d(rank, base.out_channels, (1, 1), (1, 1), bias=False)  # lora_up: drawn, then zeros
    else:
        down = torch.nn.Linear(base.in_features, rank, bias=False)
        torch.nn.Linear(rank, base.out_features, bias=False)  # lora_up: drawn, then zeros
    torch.nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    return down.weight.detach()


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The wrapped Linear / Conv2d of a PEFT LoRA layer; the module itself when it has no LoRA."""
    return getattr(module, "base_layer", module)


def has_lora(module: torch.nn.Module) -> bool:
    return ADAPTER in getattr(module, "lora_A", {})


@contextlib.contextmanager
def undone_draws() -> Iterator[None]:
    """PEFT's adapter init draws from the global CPU RNG in its own order: the stream is put back afterwards."""
    with torch.random.fork_rng(devices=[]):
        yield


def init_as_kohya(modules: list[tuple[torch.nn.Module, str, int]]) -> int:
    """Draw `created_modules`' LoRAs in order and give each PEFT LoRA layer among them kohya's values (lora_down drawn,
    lora_up zeros); returns how many were set. RuntimeError if a PEFT LoRA layer of the models has no such module."""
    drawn: set[tuple[int, str]] = set()
    for model, name, rank in modules:
        module = model.get_submodule(name)
        down = lora_module_draws(base_layer(module), rank)
        if has_lora(module):
            with torch.no_grad():
                module.lora_A[ADAPTER].weight.copy_(down)
                module.lora_B[ADAPTER].weight.zero_()
            drawn.add((id(model), name))
    models = {id(model): model for model, _, _ in modules}
    missed = [name for key, model in models.items() for name, module in model.named_modules()
              if has_lora(module) and (key, name) not in drawn]
    if missed:
        raise RuntimeError(f"LoRA layers that v0.8.7 creates no module for: {', '.join(missed[:3])}")
    return len(drawn)


def kohya_lora_parameters(model: torch.nn.Module, prefix: str) -> list[torch.nn.Parameter]:
    """The trained LoRA tensors of `model` (kohya part `prefix`) in v0.8.7's network parameter order: lora_down then
    lora_up of each module in creation order, the order its optimizer groups and clip_grad_norm_ sum in."""
    names = [name for name, module in model.named_modules() if has_lora(module)]
    ordered = kohya_unet_order(model, names) if prefix == "lora_unet" else names
    layers = [model.get_submodule(name) for name in ordered]
    params = [p for layer in layers for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
    return [p for p in params if p.requires_grad]
