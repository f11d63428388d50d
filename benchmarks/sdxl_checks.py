"""What `make bench-sdxl` checks in the LoRA files a real-architecture job wrote: kohya's module counts and names,
and that diffusers maps every key of the kohya file onto the real SDXL modules.

    python benchmarks/sdxl_checks.py --model DIR --lora FILE --record OUT.json   # the diffusers check, ~7 GiB RAM

kohya's networks/lora.py on SDXL base wraps 722 UNet modules (every Linear of the 70 transformer blocks' attention
and feed-forward, plus proj_in/proj_out of the 11 Transformer2DModels) and 264 text-encoder modules (q/k/v/out of
attention and fc1/fc2 of 12 CLIP-L and 32 OpenCLIP-bigG layers: 6 x 44), named in the SGM layout
(`lora_unet_input_blocks_4_1_...`, `lora_te1_text_model_encoder_layers_0_...`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

KOHYA_UNET_MODULES, KOHYA_TE_MODULES = 722, 264
SGM_UNET = re.compile(r"lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_")


def kohya_modules(lora_file: Path) -> dict:
    """Module counts of a kohya LoRA file (from its keys), and which UNet names are not in kohya's SGM layout."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        keys = list(f.keys())
    modules = sorted({k.rsplit(".lora_down.weight", 1)[0] for k in keys if k.endswith(".lora_down.weight")})
    unet = [m for m in modules if m.startswith("lora_unet_")]
    te1 = [m for m in modules if m.startswith("lora_te1_")]
    te2 = [m for m in modules if m.startswith("lora_te2_")]
    complete = all(f"{m}.{leaf}" in keys for m in modules for leaf in ("lora_up.weight", "alpha"))
    return {"unet": len(unet), "te1": len(te1), "te2": len(te2), "te": len(te1) + len(te2), "keys": len(keys),
            "not_sgm": [m for m in unet if not SGM_UNET.match(m)][:5], "up_and_alpha_for_each": complete}


def diffusers_check(model: Path, lora_file: Path) -> dict:
    """Load the real pipeline (fp16) and the kohya file with diffusers' own `load_lora_weights`; count the modules
    that got a LoRA and collect every warning diffusers or peft logged (unexpected or missing keys show there)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage()[:300])

    handler = Collect()
    for name in ("diffusers", "peft", "transformers"):
        logging.getLogger(name).addHandler(handler)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model), dtype=torch.float16, local_files_only=True)
    records.clear()  # only what loading the LoRA says
    pipe.load_lora_weights(str(lora_file))

    def wrapped(module) -> int:
        return sum(1 for _, m in module.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)

    return {"unet": wrapped(pipe.unet), "te1": wrapped(pipe.text_encoder), "te2": wrapped(pipe.text_encoder_2),
            "adapters": {k: list(v) for k, v in pipe.get_list_adapters().items()},
            "warnings": [w for w in records if re.search(r"unexpected|missing|not (been )?(loaded|used|renamed)", w,
                                                         re.IGNORECASE)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--lora", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args(argv)
    result = {"file": kohya_modules(args.lora), "diffusers": diffusers_check(args.model, args.lora)}
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
