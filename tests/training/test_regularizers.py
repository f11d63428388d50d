"""kohya's dropouts and max-norm in a real training of the tiny SDXL (U-Net and text encoders), with accumulation:
max-norm runs after every micro-batch, as v0.8.7, and logs kohya's three metrics at each optimizer step; the file
records both settings as v0.8.7 does."""

from __future__ import annotations

import math

import torch
from conftest import RecordingSink, compose_config
from safetensors import safe_open
from safetensors.torch import load_file

from lora_sweep.training import train as train_module
from lora_sweep.training.train import train

MAX_NORM = 3e-4  # below some modules' norms after one update at the default lr (about 2e-4 mean, 7e-4 max)


def test_dropouts_and_max_norm_train_on_every_micro_batch(tmp_path, monkeypatch):
    calls = []
    real = train_module.max_norm_regularizer

    def counted(*args):  # the real max-norm, counted
        apply = real(*args)
        return lambda: calls.append(1) or apply()

    monkeypatch.setattr(train_module, "max_norm_regularizer", counted)
    cfg = compose_config("train.max_steps=2", "train.grad_accum=2", "train.batch_size=1", "data.resolution=64",
                         "network.train_text_encoder=true", "network.dropout=0.1", "network.rank_dropout=0.2",
                         "network.module_dropout=0.1", f"network.scale_weight_norms={MAX_NORM}", "network.conv_dim=2",
                         "sampling.prompts=[]", "validation.fit_images=0", "train.save_every=0")
    sink = RecordingSink()
    result = train(cfg, output_dir=tmp_path / "out", sink=sink)
    assert all(math.isfinite(sink.logged[f"train/loss@{step}"]) for step in (1, 2))
    assert len(calls) == sink.logged["train/images_seen@2"] == 4  # 2 updates x 2 micro-batches of one image
    for step in (1, 2):
        assert sink.logged[f"max_norm/keys_scaled@{step}"] > 0
        assert sink.logged[f"max_norm/max_key_norm@{step}"] <= MAX_NORM * (1 + 1e-5)
    with safe_open(str(result.files["kohya"]), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dropout"], meta["ss_scale_weight_norms"]) == ("0.1", "0.0003")  # str(float), as v0.8.7
    tensors = load_file(result.files["kohya"])
    modules = [k.removesuffix(".alpha") for k in tensors if k.endswith(".alpha")]
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    for m in modules:
        up, down = tensors[f"{m}.lora_up.weight"], tensors[f"{m}.lora_down.weight"]
        norm = torch.linalg.norm(delta_w(up, down) * (tensors[f"{m}.alpha"] / down.shape[0]))
        assert norm <= MAX_NORM * (1 + 1e-5), m
    assert any(tensors[f"{m}.lora_down.weight"].shape[-1] == 3 for m in modules)  # LoCon's 3x3 convs are held too


def delta_w(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """kohya's ΔW = up·down of a Linear, 1x1 or 3x3 conv module (reference §5.9)."""
    if down.dim() == 2:
        return up @ down
    if down.shape[-1] == 1:
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
