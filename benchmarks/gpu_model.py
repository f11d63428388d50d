"""The model of the GPU benchmark: SDXL-base's UNet with random weights (no download), its inputs and its FLOPs.

The UNet is built from the public config bundled in lora_sweep/assets (2.567 B parameters) on the meta device,
then materialised on the target device and initialised by each module's own `reset_parameters` under a fixed seed,
so two builds are identical and no 10 GB of host memory is touched. Speed does not depend on the values; only
fp16's loss scaler would notice infinities, which the benchmark reports through the loss it records.
FLOPs are counted once with torch.utils.flop_counter on a meta-device copy (no memory, runs on any CPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from benchmarks.common import ROOT

SDXL_UNET_CONFIG = ROOT / "lora_sweep" / "assets" / "sdxl_base" / "unet" / "config.json"
# Dense bf16/fp16 tensor-core peaks (TFLOP/s, FP32 accumulate), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
               ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 6000 Ada", 364.2), ("A6000", 154.8))


@dataclass(frozen=True)
class Shape:
    """What one training image is: latent side (1024 px -> 128), text context and pooled widths."""

    latent_hw: int
    cross_dim: int
    pooled_dim: int
    tokens: int = 77

    @property
    def pixels(self) -> int:
        return self.latent_hw * 8


def unet_config(toy: bool) -> dict:
    """SDXL base's UNet config, or lora-sweep's tiny SDXL's (`--toy`: checks the logic on a CPU in seconds)."""
    if toy:
        from lora_sweep.model.tiny_sdxl import tiny_unet_config

        return dict(tiny_unet_config())
    return {k: v for k, v in json.loads(SDXL_UNET_CONFIG.read_text()).items() if not k.startswith("_")}


def shape_for(config: dict) -> Shape:
    """Inputs at the model's native size: latent side = sample_size; pooled = add-embedding input - 6 time ids."""
    pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
    return Shape(latent_hw=int(config["sample_size"]), cross_dim=int(config["cross_attention_dim"]), pooled_dim=pooled)


def build_unet(config: dict, device: str | torch.device, seed: int = 0):
    """UNet2DConditionModel(config) in fp32 on `device`, every tensor initialised by its module's reset_parameters."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet.to_empty(device=device)
    initialised: set[int] = set()
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        for module in unet.modules():
            if hasattr(module, "reset_parameters") and module is not unet:
                module.reset_parameters()
                initialised.update(id(p) for p in module.parameters(recurse=False))
        with torch.no_grad():
            for tensor in [*unet.parameters(), *unet.buffers()]:
                if id(tensor) not in initialised:  # nothing in SDXL's UNet today; kept safe for other configs
                    tensor.normal_(0.0, 0.02)
    return unet.eval()


def synthetic_batch(shape: Shape, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """CPU tensors standing for cached latents (unscaled, like the VAE's), text context, pooled text and time ids."""
    g = torch.Generator().manual_seed(seed)
    side = shape.pixels
    return {
        "latents": torch.randn(batch, 4, shape.latent_hw, shape.latent_hw, generator=g) / 0.13025,
        "context": torch.randn(batch, shape.tokens, shape.cross_dim, generator=g),
        "pooled": torch.randn(batch, shape.pooled_dim, generator=g),
        "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=torch.float32),
    }


def count_flops(config: dict, *, rank: int, gradient_checkpointing: bool) -> dict[str, float]:
    """FLOPs of one LoRA training step per image (forward, and forward + backward) at the native size, counted on
    the meta device at batch 1 (FLOPs are linear in the batch). With checkpointing the recomputed forwards count."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from lora_sweep.model.network import UNET_TARGETS, add_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    add_lora(unet, rank=rank, alpha=float(rank), targets=UNET_TARGETS)
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    shape = shape_for(config)
    inputs = {k: v.to("meta") for k, v in synthetic_batch(shape, 1).items()}
    timesteps = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        pred = unet(inputs["latents"], timesteps, inputs["context"],
                    added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}).sample
        forward = counter.get_total_flops()
        pred.float().square().mean().backward()
        total = counter.get_total_flops()
    return {"forward": float(forward), "train": float(total)}


def peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None for a GPU not in the table (pass --peak-tflops then)."""
    for key, value in PEAK_TFLOPS:
        if key in device_name:
            return value
    return None
