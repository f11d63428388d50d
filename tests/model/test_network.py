"""The LoRA files lora-sweep writes load at the trained strength: diffusers' `load_lora_weights` (its PEFT file and
its kohya-key loader), and plain PEFT, each checked against kohya's merge W + alpha/r * up @ down computed from the
kohya file by tests/lora_files.py, for the U-Net and both text encoders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_files import (
    LIBRARY_LOGGERS,
    assert_loads_as_kohya_merge,
    base_weights,
    kohya_merge,
    kohya_named_weights,
    library_warnings,
    load_with_diffusers,
    strengths,
    tiny_pipe,
)

from lora_sweep.model.network import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_lora,
    kohya_state_dict,
    save_diffusers,
    save_kohya,
)

RANK = 4


def write_trained_files(folder: Path, alpha: float) -> tuple[Path, Path]:
    """The kohya and diffusers files of a rank-4 LoRA on the U-Net and both text encoders, up weights random (as
    after training; they start at zero), written by lora-sweep's writers."""
    pipe = tiny_pipe()
    parts = {"lora_unet": (pipe.unet, UNET_TARGETS), "lora_te1": (pipe.text_encoder, TEXT_ENCODER_TARGETS),
             "lora_te2": (pipe.text_encoder_2, TEXT_ENCODER_TARGETS)}
    generator = torch.Generator().manual_seed(0)
    for model, targets in parts.values():
        add_lora(model, rank=RANK, alpha=alpha, targets=targets)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = 0.1 * torch.randn(param.shape, generator=generator)
    state = kohya_state_dict({prefix: model for prefix, (model, _) in parts.items()},
                             layers_per_block=pipe.unet.config.layers_per_block)
    kohya_file = save_kohya(folder / "lora.safetensors", state, {"ss_network_alpha": str(alpha)})
    return kohya_file, save_diffusers(folder / "diffusers", pipe.unet, pipe.text_encoder, pipe.text_encoder_2)


def load_with_peft(file: Path) -> tuple[dict, list[str]]:
    """Plain PEFT, as docs/comparing.md shows: each part's LoraConfig from the file's `lora_adapter_metadata`,
    `inject_adapter_in_model`, `set_peft_model_state_dict`."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    pipe = tiny_pipe()
    with safe_open(str(file), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    weights = load_file(str(file))
    with library_warnings(*LIBRARY_LOGGERS) as heard:
        for part in ("unet", "text_encoder", "text_encoder_2"):
            prefix = f"{part}."
            model = getattr(pipe, part)
            config = LoraConfig(**{k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)})
            inject_adapter_in_model(config, model)
            result = set_peft_model_state_dict(
                model, {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
            assert not result.unexpected_keys
    return kohya_named_weights(pipe), heard


def without_metadata(file: Path, folder: Path) -> Path:
    """The same tensors with no `lora_adapter_metadata`, as lora-sweep wrote the diffusers file before."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    save_file(load_file(str(file)), str(folder / file.name), metadata={"format": "pt"})
    return folder / file.name


@pytest.mark.parametrize(("alpha", "strength_without_alpha"), [(1.0, 4.0), (2.0, 2.0)])
def test_every_lora_file_loads_at_the_trained_strength(tmp_path, alpha, strength_without_alpha):
    from safetensors.torch import load_file

    kohya_file, diffusers_file = write_trained_files(tmp_path, alpha)
    for file, load in ((diffusers_file, load_with_diffusers), (kohya_file, load_with_diffusers),
                       (diffusers_file, load_with_peft)):
        found = assert_loads_as_kohya_merge(file, kohya_file, load)
        assert len(found) == 132 + 18 + 18  # every targeted module of the tiny U-Net, TE1 and TE2
        assert {name.split("_", 2)[1] for name in found} == {"unet", "te1", "te2"}

    base = base_weights()
    old, _ = load_with_diffusers(without_metadata(diffusers_file, tmp_path / "old"))
    ratios = strengths(old, base, kohya_merge(load_file(str(kohya_file)), base))
    assert len(ratios) == 132 + 18 + 18
    assert min(ratios.values()) == pytest.approx(strength_without_alpha, rel=1e-4)  # rank/alpha: 4.000x, 2.000x
    assert max(ratios.values()) == pytest.approx(strength_without_alpha, rel=1e-4)


def test_the_saved_alpha_passes_through_the_training_dtype_first():
    """full_bf16 + save_precision float: v0.8.7 casts the alpha buffer to bf16 with the network, then to float32, so
    alpha 0.3 is stored as bf16(0.3) = 0.30078125; an fp32 network stores float32(0.3)."""
    model = torch.nn.Module()
    model.fc1 = torch.nn.Linear(8, 8)
    add_lora(model, rank=4, alpha=0.3, targets=["fc1"])
    key = "lora_te1_text_model_fc1.alpha"
    assert kohya_state_dict({"lora_te1": model}, layers_per_block=2)[key].item() == torch.tensor(0.3).item()
    model.to(torch.bfloat16)  # as precision.full_bf16 casts the LoRA
    saved = kohya_state_dict({"lora_te1": model}, layers_per_block=2, dtype=torch.float32)[key]
    assert saved.dtype == torch.float32 and saved.item() == 0.30078125
