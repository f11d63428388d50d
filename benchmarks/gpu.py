"""`make bench-gpu`: lora-sweep's training loop on SDXL base at 1024 px on a CUDA GPU: images/s, MFU, memory.

    python -m benchmarks.gpu [--precisions bf16,fp16,fp8] [--batches 1,4] [--checkpointing off,on] ...
    python -m benchmarks.gpu --toy --device cpu    # the same code paths on the tiny model at 64 px, on the CPU

One row per lora-sweep config (measure.trainer_overhead, beside the bare loop where diffusers' examples have the
precision), each from an empty latent/text cache; BENCHMARKS.md says what each column measures. A row that fails
records its error; rows starting after `--budget-s` are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bare_loop import KOHYA_UNET_TARGETS
from benchmarks.measure import ROOT, trainer_overhead
from benchmarks.report import fmt, load_average, machine_info, publish, table, verdict

# Dense bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("B200", 2250.0),
               ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.2))
# kohya's SDXL LoRA with --fp8_base at batch 1 (sd-scripts PR #1057): 4.4 GB with cached latents and text-encoder
# outputs, about 6 GB training the text encoders too. Target: lora-sweep's fp8 training peak within 10 %.
KOHYA_FP8_GB = {"": 4.4, "te": 6.0}
BARE_PRECISIONS = ("fp32", "bf16", "fp16")  # diffusers' examples have no fp8 base weights


def peak_tflops(device_name: str) -> float | None:
    return next((value for key, value in PEAK_TFLOPS if key in device_name), None)


def count_flops(unet_config: dict, latent_side: int, *, rank: int, checkpointing: bool) -> dict[str, float]:
    """FLOPs of one image's forward and LoRA training step (forward + backward, and the recomputed forward with
    checkpointing), counted on the meta device: no memory, any CPU."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=KOHYA_UNET_TARGETS))
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    latents = torch.zeros(1, 4, latent_side, latent_side, device="meta")
    context = torch.zeros(1, 77, unet_config["cross_attention_dim"], device="meta")
    extra = {"text_embeds": torch.zeros(1, pooled, device="meta"), "time_ids": torch.zeros(1, 6, device="meta")}
    with FlopCounterMode(display=False) as counter:
        pred = unet(latents, torch.zeros(1, dtype=torch.long, device="meta"), context, added_cond_kwargs=extra).sample
        forward = counter.get_total_flops()
        pred.float().square().mean().backward()
    return {"forward": float(forward), "train": float(counter.get_total_flops())}


def matrix(args) -> list[dict]:
    rows = [{"precision": p, "batch": b, "checkpointing": c, "extra": ""}
            for p in args.precisions for b in args.batches for c in args.checkpointing]
    if args.te:
        rows.append({"precision": "fp8", "batch": 1, "checkpointing": True, "extra": "te"})
    if args.fused:
        rows += [{"precision": "bf16", "batch": b, "checkpointing": False, "extra": "fused"} for b in args.batches]
    if args.switches:
        rows += [{"precision": "bf16", "batch": b, "checkpointing": False, "extra": extra}
                 for extra in ("compile", "full_bf16") for b in args.batches]
    return rows


EXTRA = {"": [], "te": ["network.train_text_encoder=true"], "fused": ["+optimizer.args.fused=true"],
         "compile": ["train.torch_compile=true"], "full_bf16": ["precision.full_bf16=true"]}


def run_row(row: dict, index: int, args, model: Path, resolution: int, work: Path) -> dict:
    overrides = ["model=sdxl", f"model.path={model}", f"data.resolution={resolution}", f"train.device={args.device}",
                 f"data.cache_dir={work / f'cache-{index}'}", f"precision={row['precision']}",
                 f"train.batch_size={row['batch']}", f"train.gradient_checkpointing={row['checkpointing']}",
                 f"network.rank={args.rank}", f"network.alpha={args.rank}", *EXTRA[row["extra"]]]
    bare = row["precision"] in BARE_PRECISIONS and row["extra"] != "te"
    print(f"  {row['precision']:<5} batch {row['batch']} ckpt {row['checkpointing']!s:<5} {row['extra']:<5}", end="",
          flush=True)
    try:
        result = trainer_overhead(overrides, work / f"row-{index}", warmup=args.warmup, steps=args.steps,
                                  reps=args.reps, bare=bare)
        print(f" {row['batch'] / result['lora_sweep_step_s']:.2f} img/s", flush=True)
        return {**row, **result}
    except Exception as exc:  # out of memory, a precision the stack lacks: recorded, the matrix goes on
        print(f" {type(exc).__name__}", flush=True)
        return {**row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def render(r: dict) -> list[str]:
    flops, peak = r["flops_per_image"], r["peak_tflops"]
    model = "the tiny model at 64 px (`--toy`: a code-path check, not a figure)" if r["toy"] else \
        "SDXL base (random weights), 1024 x 1024, bundled photos centre-cropped"
    lines = [f"Model: {model}; LoRA rank {r['rank']} on kohya's "
             f"targets, AdamW; {r['warmup']} warm-up steps, then {r['reps']} repetitions x {r['steps']} steps, each "
             "reading its loss on the host.",
             f"FLOPs per image: forward {flops['forward'] / 1e12:.3f} TFLOP, training step "
             f"{flops['train'] / 1e12:.3f} TFLOP, with gradient checkpointing {flops['train_gc'] / 1e12:.3f} TFLOP; "
             f"peak {fmt(peak, '.1f')} TFLOP/s dense bf16. Memory: GiB of `max_memory_allocated`.", ""]
    rows = []
    for row in r["rows"]:
        setup, train = (row[k] / 2**30 if row.get(k) else None for k in ("setup_peak_bytes", "train_peak_bytes"))
        ips = row["batch"] / row["lora_sweep_step_s"] if row.get("lora_sweep_step_s") else None
        mfu = ips * flops["train"] / (peak * 1e12) if ips and peak and row["extra"] != "te" else None
        hfu = ips * flops["train_gc"] / (peak * 1e12) if mfu and row["checkpointing"] else None
        kohya = KOHYA_FP8_GB.get(row["extra"]) if (row["precision"], row["batch"], row["checkpointing"]) == (
            "fp8", 1, True) else None
        rows.append([row["precision"], row["batch"], "on" if row["checkpointing"] else "off", row["extra"] or "-",
                     fmt(ips), fmt(row.get("ratio"), ".3f", "x"), fmt(mfu and 100 * mfu, ".1f", " %"),
                     fmt(hfu and 100 * hfu, ".1f", " %"), fmt(setup), fmt(train),
                     verdict(None if setup is None or train is None else setup <= train),
                     "-" if kohya is None else f"{kohya}: {verdict(train and train * 2**30 <= 1.1e9 * kohya)}",
                     row.get("error") or ""])
    return lines + table(["precision", "batch", "ckpt", "extra", "img/s", "lora-sweep / bare", "MFU", "HFU",
                          "set-up peak", "training peak", "set-up <= training", "kohya GB (within 10 %)", "note"],
                         rows) + ["", f"Total {r['seconds']:.0f} s. extra: te = text-encoder LoRA (no bare loop: "
                                  "diffusers' examples train the UNet only), fused = `optimizer.args.fused=true`, "
                                  "compile = `train.torch_compile=true` (inductor; its warm-up steps compile), "
                                  "full_bf16 = "
                                  "`precision.full_bf16=true` (LoRA, grads and AdamW state in bf16)."]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    split = lambda text: [x for x in text.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--toy", action="store_true", help="lora-sweep's tiny model at 64 px instead of SDXL base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precisions", type=split, default="bf16,fp16,fp8")
    p.add_argument("--batches", type=lambda t: [int(b) for b in split(t)], default="1,4")
    p.add_argument("--checkpointing", type=lambda t: [c == "on" for c in split(t)], default="off,on")
    p.add_argument("--no-te", dest="te", action="store_false", help="leave out the fp8 text-encoder LoRA row")
    p.add_argument("--no-fused", dest="fused", action="store_false", help="leave out the fused AdamW rows")
    p.add_argument("--no-switches", dest="switches", action="store_false",
                   help="leave out the torch.compile (inductor) and full_bf16 rows")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="steps per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=600.0, help="rows starting after this are skipped")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gpu.json on CUDA")
    p.add_argument("--markdown", default=None, help="default: BENCHMARKS.md on CUDA, none otherwise; '' for none")
    args = p.parse_args(argv)
    from benchmarks.sdxl import random_sdxl_dir
    from lora_sweep.model.loading import tiny_model_dir
    from lora_sweep.paths import default_cache_dir

    cuda = torch.device(args.device).type == "cuda"
    info = machine_info()
    if cuda:
        props = torch.cuda.get_device_properties(torch.device(args.device))
        info["gpu"] = f"{props.name}, CUDA {torch.version.cuda}, {props.total_memory / 2**30:.0f} GiB"
    model = tiny_model_dir() if args.toy else random_sdxl_dir(default_cache_dir())
    resolution = 64 if args.toy else 1024
    unet_config = json.loads((model / "unet" / "config.json").read_text())
    flops = count_flops(unet_config, resolution // 8, rank=args.rank, checkpointing=False)
    flops["train_gc"] = count_flops(unet_config, resolution // 8, rank=args.rank, checkpointing=True)["train"]
    results = {"machine": info, "toy": args.toy, "flops_per_image": flops, "rows": [],
               "peak_tflops": args.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if cuda else None),
               **{k: getattr(args, k) for k in ("rank", "warmup", "steps", "reps", "device")}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-sweep-bench-gpu-") as work:
        for index, row in enumerate(matrix(args)):
            over = time.perf_counter() - started > args.budget_s
            results["rows"].append({**row, "error": f"skipped: over the {args.budget_s:.0f} s budget"} if over
                                   else run_row(row, index, args, model, resolution, Path(work)))
    results["seconds"], results["machine"]["load_average_end"] = time.perf_counter() - started, load_average()
    out = args.out or (ROOT / "benchmarks" / "results" / "gpu.json" if cuda else None)
    markdown = args.markdown if args.markdown is not None else (str(ROOT / "BENCHMARKS.md") if cuda else "")
    publish("gpu-bench", "GPU figures (`make bench-gpu`)", results, render(results), out=out, markdown=markdown or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
