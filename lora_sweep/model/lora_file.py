"""LoRA files as lora-sweep reads them: kohya's (`lora_unet_..._lora_down.weight`, `.lora_up.weight`, `.alpha`) and
diffusers/PEFT's (`unet.<module>.lora_A.weight`, `.lora_B.weight`, alphas in the `lora_adapter_metadata` header),
each module labelled `<kohya part>:<name in the file>`. The header alone (shapes) serves the pre-flight without torch;
docs/network.md describes how a starting file is used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_sweep.errors import UserError

# a PEFT / diffusers file's part prefix -> kohya's
PEFT_PARTS = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
KOHYA_PARTS = tuple(PEFT_PARTS.values())


@dataclass(frozen=True)
class FileModule:
    """One module of a LoRA file as its header shows it: the lora_down / lora_A key, the rank (that tensor's rows) and
    whether it is a kxk conv."""

    key: str
    rank: int
    kxk: bool


def lora_file_modules(path: str | Path) -> dict[str, FileModule]:
    """The modules of a kohya (`lora_unet_...lora_down.weight`) or diffusers/PEFT (`unet.<module>.lora_A.weight`) LoRA
    file by `<kohya part>:<name>` (name: kohya's for a kohya file, the diffusers module path for a PEFT file), read
    from the safetensors header alone (no torch). UserError when it is no safetensors file or holds no LoRA."""
    header = _safetensors_header(Path(path))
    found = {}
    for key, info in header.items():
        shape = tuple(info.get("shape", ())) if key != "__metadata__" else ()
        if not shape:  # __metadata__, alphas
            continue
        module = FileModule(key, shape[0], len(shape) == 4 and shape[2:] != (1, 1))
        if key.endswith(".lora_down.weight") and key.startswith(KOHYA_PARTS):
            name = key.removesuffix(".lora_down.weight")
            found[f"{name[:8] if name.startswith('lora_te') else 'lora_unet'}:{name}"] = module
        elif key.endswith(".lora_A.weight") and key.split(".", 1)[0] in PEFT_PARTS:
            part, name = key.removesuffix(".lora_A.weight").split(".", 1)
            found[f"{PEFT_PARTS[part]}:{name}"] = module
    if not found:
        raise UserError(f"network.network_weights: '{path}' holds no LoRA (no kohya `.lora_down.weight` key of "
                        "lora_unet / lora_te1 / lora_te2, no diffusers `unet.` / `text_encoder.` `.lora_A.weight` "
                        "key).")
    return found


def _safetensors_header(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= path.stat().st_size - 8:
                raise ValueError("bad header length")
            return json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"network.network_weights: '{path}' is not a readable .safetensors LoRA file ({exc}); "
                        "lora-sweep reads kohya and diffusers/PEFT .safetensors files.") from None


def _file_alpha(tensors: Mapping, config: dict | None, module: FileModule, label: str) -> float | None:
    """A module's alpha in its file: kohya's `.alpha` tensor (None when absent: each use decides, as v0.8.7 does), or
    the PEFT part's lora_alpha / alpha_pattern from diffusers' `lora_adapter_metadata` (the rank when absent, as
    diffusers reads it)."""
    if module.key.endswith(".lora_down.weight"):
        alpha = tensors.get(module.key.replace(".lora_down.weight", ".alpha"))
        return None if alpha is None else float(alpha)
    part = module.key.split(".", 1)[0]
    if config is None or f"{part}.lora_alpha" not in config:
        return float(module.rank)
    from peft.utils.other import get_pattern_key

    pattern = config.get(f"{part}.alpha_pattern") or {}
    return float(pattern.get(get_pattern_key(list(pattern), label.split(":", 1)[1]), config[f"{part}.lora_alpha"]))


def read_lora_file(path: str | Path) -> dict[str, tuple]:
    """Every module of the file by `lora_file_modules`' label -> (lora_down, lora_up, alpha), tensors fp32 on the CPU;
    alpha: `_file_alpha` (None: a kohya file without that `.alpha`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    modules = lora_file_modules(path)
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get("lora_adapter_metadata")
    config = json.loads(text) if text else None
    out = {}
    for label, module in modules.items():
        up_key = module.key.replace(".lora_down.", ".lora_up.").replace(".lora_A.", ".lora_B.")
        out[label] = (tensors[module.key].float(), tensors[up_key].float(), _file_alpha(tensors, config, module, label))
    return out
