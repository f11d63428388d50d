"""The golden run: v53 at demo scale, re-recorded when issue 33 made the initialisation, latent draws, resize, data
order, text attention and default U-Net attention v0.8.7's. Every option at its default must reproduce it bit for
bit: the loss of every step and the LoRA's tensors."""

from __future__ import annotations

import hashlib

from conftest import RecordingSink, compose_config
from safetensors.torch import load_file

from lora_sweep.training.train import train

# float.hex() of train/loss at steps 1-8, and sha256 over the kohya file's (sorted name, tensor bytes)
GOLDEN_LOSSES = ["0x1.1d0ed00000000p+0", "0x1.0bf4b20000000p+0", "0x1.dd37620000000p-1", "0x1.2d55ea0000000p+0",
                 "0x1.c7bece0000000p-1", "0x1.a6a3520000000p-1", "0x1.c428940000000p-1", "0x1.efe9d40000000p-1"]
GOLDEN_TENSORS = "5b88ce298e14ca27842c75e704038838b484fc37eca62e1f204e473408a94da1"
# the demo's scale when the run was recorded: 8 steps, D-Adaptation's own start and growth
RECORDED_SCALE = ("train.max_steps=8", "optimizer.args.d0=1e-6", "optimizer.args.growth_rate=inf")


def test_v53_at_demo_scale_reproduces_the_golden_run(tmp_path):
    cfg = compose_config("experiment=v53", "preset=demo", *RECORDED_SCALE, "sampling.prompts=[]",
                         "validation.fit_images=0")
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
