"""The network's regularisers as sd-scripts v0.8.7's networks/lora.py applies them, on PEFT's LoRA layers: kohya's
three dropouts (`LoRAModule.forward`) and max-norm (`apply_max_norm_regularization`, `--scale_weight_norms`).
docs/kohya-reference.md §8 states both.

Dropouts act only in training mode: evaluation and sampling put the layers in eval mode (unlike v0.8.7, §11).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_sweep.model.network import ADAPTER, sgm_unet_name, up_blocks_with_attention


@dataclass(frozen=True)
class Dropouts:
    """kohya's dropout probabilities; None is off and draws nothing (0 still draws, as v0.8.7)."""

    network: float | None = None  # --network_dropout: F.dropout on the rank-space activation after lora_down
    rank: float | None = None  # rank_dropout: a (batch, rank) mask, the output scaled by 1 / (1 - p)
    module: float | None = None  # module_dropout: skip the LoRA for this forward

    @property
    def active(self) -> bool:
        return (self.network, self.rank, self.module) != (None, None, None)


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every PEFT LoRA layer (Linear, Conv2d) of `model` that holds lora-sweep's adapter, in `named_modules` order."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def install_dropouts(models: Sequence[torch.nn.Module], dropouts: Dropouts) -> int:
    """Give every LoRA layer of `models` kohya's forward (`kohya_forward`), as v0.8.7 patches the original module's
    forward; returns how many. With every dropout off nothing is installed: PEFT's own forward runs, bit for bit."""
    if not dropouts.active:
        return 0
    layers = [layer for model in models for layer in lora_layers(model)]
    for layer in layers:
        layer.forward = functools.partial(kohya_forward, layer, dropouts)
    return len(layers)


def kohya_forward(layer, dropouts: Dropouts, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """v0.8.7's `LoRAModule.forward` on a PEFT LoRA layer in training mode; PEFT's forward otherwise (eval, merged).

    y = base(x) + (up(rank_mask * dropout(down(x))) * multiplier) * scale', scale' = alpha/r, or (alpha/r) *
    (1 / (1 - rank_dropout)) with a rank mask. Draws per call: module (one `torch.rand(1)`, torch's CPU generator),
    network (F.dropout, the activation's device), rank (`torch.rand((B, r))`, the activation's device).
    """
    if not layer.training or layer.merged or layer.disable_adapters:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    if dropouts.module is not None and torch.rand(1) < dropouts.module:
        return result  # skipped: its parameters get no gradient (None) from this forward
    lora_a, lora_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    lx = lora_a(layer._cast_input_dtype(x, lora_a.weight.dtype))
    if dropouts.network is not None:
        lx = F.dropout(lx, p=dropouts.network)
    # alpha/r (PEFT's scaling before set_lora_multiplier folds the multiplier in) and that multiplier, kept apart
    scale = layer.__dict__.get("_lora_sweep_scaling", layer.scaling)[ADAPTER]
    multiplier = layer.__dict__.get("_lora_sweep_multiplier", 1.0)
    if dropouts.rank is not None:
        lx = lx * rank_mask(lx, layer.r[ADAPTER], dropouts.rank)
        scale = scale * (1.0 / (1.0 - dropouts.rank))  # the whole output, not the surviving ranks, is rescaled
    return (result + lora_b(lx) * multiplier * scale).to(result.dtype)


def rank_mask(lx: torch.Tensor, rank: int, p: float) -> torch.Tensor:
    """kohya's rank-dropout mask, `torch.rand((B, rank)) > p` on lx's device, shaped to broadcast over lx: (B, 1, r)
    for tokens (B, T, r), (B, r, 1, 1) for convs (B, r, h, w), (B, r) for 2-D activations."""
    mask = torch.rand((lx.size(0), rank), device=lx.device) > p
    if lx.dim() == 3:
        return mask.unsqueeze(1)
    if lx.dim() == 4:
        return mask.unsqueeze(-1).unsqueeze(-1)
    return mask


@dataclass(frozen=True)
class MaxNormResult:
    """What one max-norm pass returns (v0.8.7's tuple): modules rescaled, mean and max of the norms after it."""

    keys_scaled: int
    average_key_norm: float
    max_key_norm: float

    def metrics(self) -> dict[str, float]:
        """Under kohya's tracker names."""
        return {"max_norm/keys_scaled": self.keys_scaled, "max_norm/average_key_norm": self.average_key_norm,
                "max_norm/max_key_norm": self.max_key_norm}


def delta_weight(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up·down as a weight of the original module: (out, in) for a Linear, (out, in, k, k) for a conv (a k×k down
    composed with the 1×1 up as `conv2d(down.permute(1,0,2,3), up).permute(1,0,2,3)`), without alpha/r."""
    if down.dim() == 2:
        return up @ down
    if down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
        return (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


@torch.no_grad()
def apply_max_norm_regularization(layers: Sequence[torch.nn.Module], max_norm: float) -> MaxNormResult:
    """Scale each layer's LoRA so that ||(alpha/r)·ΔW||_F <= max_norm, as v0.8.7 (docs/kohya-reference.md §8).

    Per layer, in the order given: norm = ||ΔW·alpha/r|| clamped below at max_norm/2, ratio = min(norm, max_norm) /
    norm on the CPU; if ratio != 1 both up and down are multiplied in place by sqrt(ratio). alpha is the float32 value
    the layer's file records (`lora_alpha`), computed in the weights' dtype on their device. The optimizer state is
    untouched.
    """
    keys_scaled, norms = 0, []
    for layer in layers:
        down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        # v0.8.7's alpha buffer: a float32 scalar, cast with the network to the weights' dtype
        alpha = torch.tensor(float(layer.lora_alpha[ADAPTER])).to(down.device, down.dtype)
        updown = delta_weight(down, up)
        updown *= alpha / down.shape[0]
        norm = updown.norm().clamp(min=max_norm / 2)
        desired = torch.clamp(norm, max=max_norm)
        ratio = desired.cpu() / norm.cpu()
        sqrt_ratio = ratio**0.5
        if ratio != 1:
            keys_scaled += 1
            up *= sqrt_ratio
            down *= sqrt_ratio
        norms.append((updown.norm() * ratio).item())
    return MaxNormResult(keys_scaled, sum(norms) / len(norms), max(norms))


# kohya's child order inside SGM blocks (library/sdxl_original_unet.py) where it differs from diffusers' order
_SGM_ORDER = {
    "input_blocks": 0, "middle_block": 1, "output_blocks": 2,
    "in_layers": 0, "emb_layers": 1, "out_layers": 2, "skip_connection": 3,
    "proj_in": 0, "transformer_blocks": 1, "proj_out": 2,
    "attn1": 0, "ff": 1, "attn2": 2,
    "to_q": 0, "to_k": 1, "to_v": 2, "to_out": 3,
}


def sgm_position(sgm_path: str) -> tuple[int, ...]:
    """A sort key giving kohya's module order for SGM paths (`input_blocks.4.1.transformer_blocks.0.ff.net.2`)."""
    return tuple(int(part) if part.isdigit() else _SGM_ORDER.get(part, 0) for part in sgm_path.split("."))


def kohya_ordered_layers(unet: torch.nn.Module | None,
                         text_encoders: Sequence[torch.nn.Module] = ()) -> list[torch.nn.Module]:
    """The trained LoRA layers in v0.8.7's state_dict order: text encoder 1, text encoder 2 (their module order),
    then the U-Net in SGM order (input, middle, output blocks; attn1, ff, attn2 in a transformer block)."""
    layers = [layer for encoder in text_encoders for layer in lora_layers(encoder)]
    if unet is not None:
        lpb = unet.config.layers_per_block
        ours = set(lora_layers(unet))
        named = [(name, m) for name, m in unet.named_modules() if m in ours]
        up_attention = up_blocks_with_attention(unet)
        named.sort(key=lambda item: sgm_position(sgm_unet_name(item[0], lpb, up_attention)))
        layers += [m for _, m in named]
    return [layer for layer in layers if layer.lora_A[ADAPTER].weight.requires_grad]


def max_norm_regularizer(max_norm: float | None, unet: torch.nn.Module | None,
                         text_encoders: Sequence[torch.nn.Module] = ()) -> Callable[[], MaxNormResult] | None:
    """network.scale_weight_norms as a call to make after every micro-batch; None when it is off (null or 0)."""
    if not max_norm:
        return None
    layers = kohya_ordered_layers(unet, text_encoders)
    return functools.partial(apply_max_norm_regularization, layers, max_norm)
