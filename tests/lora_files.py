"""What a LoRA file should do to a model, computed without lora-sweep's code: kohya's merge W + alpha/r * up @ down,
applied by kohya name the way ComfyUI and A1111 apply it (the U-Net in the SGM layout, CLIP named from
`text_model.`), and the weights a consumer's loader actually produced, by the same names. All on the tiny SDXL."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sgm_checkpoint import unet_to_sgm

from lora_sweep.model.loading import tiny_model_dir

KOHYA_PREFIXES = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
LIBRARY_LOGGERS = ("diffusers", "peft", "transformers")


def tiny_pipe():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir()))


@functools.cache
def base_weights() -> dict[str, torch.Tensor]:
    """The tiny SDXL's own weights by kohya name (read once; not to be changed in place)."""
    return kohya_named_weights(tiny_pipe())


def load_with_diffusers(file: Path) -> tuple[dict, list[str]]:
    """`pipe.load_lora_weights(file)` + `fuse_lora()` on the tiny SDXL: its weights by kohya name, and what the
    libraries warned while loading."""
    pipe = tiny_pipe()
    with library_warnings(*LIBRARY_LOGGERS) as heard:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        pipe.fuse_lora()
    return kohya_named_weights(pipe), heard


def assert_loads_as_kohya_merge(file: Path, kohya_file: Path, load=load_with_diffusers) -> dict[str, float]:
    """`load(file)` gives every weight of the tiny SDXL the merge of `kohya_file`, warning nothing; returns the
    strength of each module it changed (all 1.0 within float error)."""
    from safetensors.torch import load_file

    base = base_weights()
    expected = kohya_merge(load_file(str(kohya_file)), base)
    loaded, heard = load(file)
    # diffusers notes a part the file has no LoRA for; a part missing by mistake fails the merge check below
    heard = [line for line in heard if "No LoRA keys associated to" not in line]
    assert heard == [], (file.name, load.__name__, heard)
    for name in base:
        torch.testing.assert_close(loaded[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    found = strengths(loaded, base, expected)
    assert found and all(s == pytest.approx(1.0, rel=1e-3) for s in found.values())
    return found


def kohya_named_weights(pipe) -> dict[str, torch.Tensor]:
    """Every 2-D+ weight of the pipeline's U-Net and text encoders by kohya module name
    (`lora_unet_input_blocks_4_1_proj_in`, `lora_te1_text_model_encoder_layers_0_mlp_fc1`), LoRA layers merged in
    first (PEFT's merge, W + scaling * B @ A, for any layer not fused yet)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for prefix, part in KOHYA_PREFIXES.items():
        model = getattr(pipe, part)
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer) and not layer.merged:
                layer.merge()
        state = unet_to_sgm(model) if prefix == "lora_unet" else dict(model.state_dict())
        for key, value in state.items():
            if ".lora_" in key or not key.endswith(".weight") or value.ndim < 2:
                continue
            path = key.replace(".base_layer.", ".").removesuffix(".weight")
            if prefix != "lora_unet" and not path.startswith("text_model."):
                path = f"text_model.{path}"
            out[f"{prefix}_{path.replace('.', '_')}"] = value.detach().clone().float()
    return out


def kohya_merge(kohya: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base` with every module of a kohya LoRA state dict merged in: W + alpha/r * up @ down, r = down's rows."""
    modules = {key.rsplit(".", 2)[0] for key in kohya if key.endswith(".lora_down.weight")}
    assert modules <= set(base), f"kohya modules with no weight: {sorted(modules - set(base))[:3]}"
    merged = dict(base)
    for name in modules:
        down, up = kohya[f"{name}.lora_down.weight"].float(), kohya[f"{name}.lora_up.weight"].float()
        merged[name] = base[name] + float(kohya[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    return merged


def strengths(loaded: dict, base: dict, expected: dict) -> dict[str, float]:
    """Per changed module: the loaded delta projected on the expected one (1.0 = the trained strength)."""
    out = {}
    for name in base:
        want = expected[name] - base[name]
        if want.abs().sum() > 0:
            out[name] = float(((loaded[name] - base[name]) * want).sum() / (want * want).sum())
    return out


@contextlib.contextmanager
def library_warnings(*loggers: str) -> Iterator[list[str]]:
    """Collect Python warnings and the WARNING records of `loggers` (diffusers' and transformers' loggers do not
    propagate to the root logger) raised inside the block."""
    heard: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            heard.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(logging.WARNING)
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield heard
        heard.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        for name in loggers:
            logging.getLogger(name).removeHandler(handler)
