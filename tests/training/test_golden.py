"""The golden run: v53 at demo scale, recorded before issues 25-28 added kohya's dataset, text, network and schedule
options. Every option at its default must reproduce it bit for bit: the loss of every step and the LoRA's tensors."""

from __future__ import annotations

import hashlib

from conftest import RecordingSink, compose_config
from safetensors.torch import load_file

from lora_sweep.training.train import train

# float.hex() of train/loss at steps 1-8, and sha256 over the kohya file's (sorted name, tensor bytes)
GOLDEN_LOSSES = ["0x1.e4cffc0000000p-1", "0x1.0735ca0000000p+0", "0x1.19ec040000000p+0", "0x1.db5f260000000p-1",
                 "0x1.39aeb80000000p+0", "0x1.17dbc00000000p+0", "0x1.33136a0000000p+0", "0x1.0098040000000p+0"]
GOLDEN_TENSORS = "91c1498fb962f72b81c8bb40927d4d5123f15b7459b0ed523a0f115d5e265067"


def test_v53_at_demo_scale_reproduces_the_golden_run(tmp_path):
    cfg = compose_config("experiment=v53", "preset=demo", "sampling.prompts=[]", "validation.fit_images=0")
    sink = RecordingSink()
    result = train(cfg, output_dir=tmp_path / "out", sink=sink)
    losses = [float(sink.logged[f"train/loss@{step}"]).hex() for step in range(1, cfg.train.max_steps + 1)]
    tensors = load_file(result.files["kohya"])
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    assert losses == GOLDEN_LOSSES
    assert (len(tensors), digest.hexdigest()) == (396, GOLDEN_TENSORS)
