"""SDXL base's real architecture with random weights, as an fp16 diffusers folder, for `make bench-sdxl`.

No SDXL weights can be downloaded where lora-sweep is developed, yet memory, load time and the per-step cost of
1,444 LoRA tensors only show at SDXL's real size (2.567 B UNet parameters, CLIP ViT-L 123 M, OpenCLIP bigG 695 M).
This builds that model from the configs bundled in `lora_sweep/assets/sdxl_base` (the folder `load_sdxl` reads for
single files: configs plus the real 49,408-token CLIP vocabulary), draws every weight with its module's own
initialiser under a fixed seed, and saves it the way SDXL's fp16 release ships: fp16 safetensors, one file per
component. It is built once into `<cache root>/models/sdxl-base-random-fp16-<hash of the assets>` (about 6.9 GB of
disk, about a minute, peak memory about twice the UNet's 4.8 GiB while it is serialised) and reused afterwards.

    python -m benchmarks.sdxl_model [--cache-dir DIR]      # prints the folder, building it if needed
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sweep.model.loading import build_folder_once, sdxl_base_config_dir  # noqa: E402
from lora_sweep.model.tiny_sdxl import SDXL_BASE_ASSETS  # noqa: E402

RECIPE = "sdxl-base-random-fp16-v1"  # bump when the build below changes what it writes
COMPONENTS = ("text_encoder", "text_encoder_2", "vae", "unet")


def random_sdxl_dir(cache_root: Path | None = None, seed: int = 0) -> Path:
    """The random-weight SDXL-base diffusers folder (fp16 safetensors), built on first use; returns its path."""
    from lora_sweep.paths import default_cache_dir

    root = Path(cache_root or default_cache_dir())
    digest = hashlib.sha256(f"{RECIPE}|seed={seed}".encode())
    for file in sorted(SDXL_BASE_ASSETS.rglob("*.json")):
        digest.update(file.relative_to(SDXL_BASE_ASSETS).as_posix().encode() + file.read_bytes())
    final = root / "models" / f"{RECIPE}-{digest.hexdigest()[:12]}"
    return build_folder_once(final, lambda staging: _build(staging, root, seed))


def _build(staging: Path, cache_root: Path, seed: int) -> None:
    configs = sdxl_base_config_dir(cache_root)  # configs + tokenizers, no weights
    shutil.copytree(configs, staging, dirs_exist_ok=True)
    for index, name in enumerate(COMPONENTS):  # one component in memory at a time
        model = _random_component(configs / name, name, seed + index)
        model.save_pretrained(staging / name, safe_serialization=True)
        del model
        gc.collect()
        print(f"  {name}: written", flush=True)


def _random_component(config_dir: Path, name: str, seed: int):
    """One component built from its config directly in fp16 (no fp32 copy), weights from its own initialisers."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16)
        try:
            if name == "unet":
                from diffusers import UNet2DConditionModel

                return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir))
            if name == "vae":
                from diffusers import AutoencoderKL

                return AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir))
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
            return cls(CLIPTextConfig.from_pretrained(config_dir)).to(torch.float16)
        finally:
            torch.set_default_dtype(previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default: lora-sweep's cache)")
    args = parser.parse_args(argv)
    print(random_sdxl_dir(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
