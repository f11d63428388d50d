"""The switches' trainings on a CUDA device (the CPU trains full fp16 in test_metadata_keys.py; compiling takes
minutes there): full fp16 with CUDA's kernels and a compiled U-Net, each a 2-step training of the tiny model.
Skipped without one; on the GPU machine: `pytest tests/training/test_switches_cuda.py` (about a minute)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RecordingSink, compose_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _train(tmp_path, *overrides: str) -> tuple[list[float], dict]:
    from safetensors.torch import load_file

    from lora_sweep.training.train import train

    cfg = compose_config("train.max_steps=2", "train.batch_size=2", "train.device=cuda", "sampling.prompts=[]",
                         "validation.fit_images=0", *overrides)
    sink = RecordingSink()
    result = train(cfg, output_dir=tmp_path / "out", sink=sink)
    return [float(sink.logged[f"train/loss@{s}"]) for s in (1, 2)], load_file(result.files["kohya"])


def test_full_fp16_trains_an_fp16_lora(tmp_path):
    losses, tensors = _train(tmp_path, "precision=fp16", "precision.full_fp16=true", "optimizer.args.eps=1e-4")
    assert all(math.isfinite(loss) for loss in losses)
    assert {t.dtype for t in tensors.values()} == {torch.float16}  # saved in the training dtype, as v0.8.7


def test_a_compiled_unet_trains_as_the_eager_one(tmp_path):
    eager, _ = _train(tmp_path / "eager")
    compiled, _ = _train(tmp_path / "compiled", "train.torch_compile=true")  # inductor, v0.8.7's default
    assert compiled == pytest.approx(eager, rel=1e-3)
