"""The network's regularisers as sd-scripts v0.8.7's networks/lora.py applies them, on PEFT's LoRA layers: kohya's
three dropouts (`LoRAModule.forward`). docs/kohya-reference.md §8 states them.

Dropouts act only in training mode: evaluation and sampling put the layers in eval mode (unlike v0.8.7, §11).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_sweep.model.network import ADAPTER


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
