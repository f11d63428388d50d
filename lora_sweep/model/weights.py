"""Read a diffusers component's safetensors weights straight into another dtype, without a second full copy.

diffusers' `from_pretrained(dtype=...)` keeps the read file pages mapped until the last tensor is converted: about
twice the U-Net resident (10 GiB for SDXL fp16 -> bf16). Reading in slices of about 256 MB, each through its own
mapping released before the next, keeps the peak at the converted model plus one slice. Also what `model.path`
accepts (`ACCEPTS`) and a header read without data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from lora_sweep.errors import UserError

SLICE_BYTES = 256 * 2**20
WEIGHTS_NAME = "diffusion_pytorch_model"
FOLDER_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
ACCEPTS = ("model.path accepts a diffusers SDXL folder (model_index.json plus the sub-folders "
           + ", ".join(f"{p}/" for p in FOLDER_PARTS) + ") or a single SDXL .safetensors checkpoint file")


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (tensor names, dtypes, shapes, __metadata__) without reading data."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"header length {length}")
            return json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as error:
        raise UserError(f"model.path={str(path)!r} is not a readable .safetensors file ({error}); {ACCEPTS}.") from None


def weight_files(folder: Path, variant: str | None = None) -> list[Path] | None:
    """The safetensors file(s) diffusers would read from a component folder for `variant` (single file or an index's
    shards); None if there are none."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    single = folder / f"{WEIGHTS_NAME}{suffix}"
    if single.is_file():
        return [single]
    index = folder / f"{WEIGHTS_NAME}{suffix}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / shard for shard in shards]
        return files if all(f.is_file() for f in files) else None
    return None


def read_cast_state_dict(files: list[Path], dtype: Any) -> dict[str, Any]:
    """Every tensor of `files`, floating ones converted to `dtype`, read in file order in slices of about SLICE_BYTES,
    each mapping closed before the next. Peak: the result plus one slice."""
    from safetensors import safe_open

    state: dict[str, Any] = {}
    for file in files:
        header = read_safetensors_header(file)
        entries = sorted((info["data_offsets"], key) for key, info in header.items() if key != "__metadata__")
        slices: list[list[str]] = [[]]
        size = 0
        for (begin, end), key in entries:
            if size >= SLICE_BYTES:
                slices.append([])
                size = 0
            slices[-1].append(key)
            size += end - begin
        for keys in slices:
            with safe_open(str(file), framework="pt") as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone()
    return state


def load_cast(cls: Any, folder: Path, dtype: Any, variant: str | None = None) -> Any | None:
    """A diffusers model class from `folder`, built without weights (as from_pretrained), its tensors read into `dtype`
    by `read_cast_state_dict`, in eval mode; None when the folder has no safetensors weights."""
    from accelerate import init_empty_weights
    from diffusers.models.modeling_utils import no_init_weights

    files = weight_files(folder, variant)
    if files is None:
        return None
    with no_init_weights(), init_empty_weights():
        model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(read_cast_state_dict(files, dtype), strict=True, assign=True)
    model.register_to_config(_name_or_path=str(folder))
    return model.eval()
