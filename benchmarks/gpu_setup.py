"""GPU memory of lora-sweep's set-up (load, cache, cast, place) against its training peak, per precision: the part
of `make bench-gpu` that goes through lora-sweep's real set-up rather than a UNet built on the GPU.

For each case, `lora_sweep.training.train.train` runs on the SDXL folder (benchmarks/sdxl_model.py's random fp16
SDXL base, or the tiny model with --toy) at 1024 px (64 with --toy), batch 1, with gradient checkpointing (what
kohya's low-memory figures use), on the bundled photos, each case with an empty latent/text cache so the caching
is measured too. `torch.cuda.max_memory_allocated` is read after `build_session` (set-up peak: the VAE's fp32
encode, the text encoders, LoRA and casts) and again after the steps (training peak, reset in between).

kohya's published figures (sd-scripts PR #1057, `--fp8_base`, as quoted in issue 16): about 6 GB for SDXL LoRA with
fp8 base weights, 4.4 GB with cached latents and text-encoder outputs. Those are whole-process figures as a user
reads them (nvidia-smi: the CUDA context and the allocator's cache included), so lora-sweep's tensor peaks are shown
beside `torch.cuda.max_memory_reserved` as well.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch

CASES = {  # name -> (overrides, kohya's figure in GB it compares with)
    "bf16": (["precision=bf16"], None),
    "fp16": (["precision=fp16"], None),
    "fp8": (["precision=fp8"], 4.4),  # UNet LoRA, latents and text-encoder outputs cached
    "fp8_te": (["precision=fp8", "network.train_text_encoder=true"], 6.0),  # text encoders on the GPU in fp8
}


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def setup_row(case: str, model: Path, device: torch.device, *, resolution: int, steps: int, workdir: Path) -> dict:
    """One case: set-up peak, memory held after set-up, training peak (bytes; None off CUDA), seconds."""
    from benchmarks.common import NullSink, compose
    from lora_sweep.training import train as train_module

    overrides, kohya_gb = CASES[case]
    cache = workdir / f"cache-{case}"
    cache.mkdir(parents=True, exist_ok=True)
    cfg = compose("model=sdxl", f"model.path={model}", f"data.resolution={resolution}", "train.batch_size=1",
                  f"train.max_steps={steps}", f"train.device={device}", "train.gradient_checkpointing=true",
                  f"data.cache_dir={cache}", *overrides)
    row: dict = {"case": case, "overrides": overrides, "kohya_gb": kohya_gb, "error": None}
    build_session = train_module.build_session
    cuda = _cuda(device)

    def measured_build(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        s = build_session(*args, **kwargs)
        row["setup_s"] = time.perf_counter() - started
        if cuda:
            torch.cuda.synchronize(device)
            row["setup_peak_bytes"] = torch.cuda.max_memory_allocated(device)
            row["setup_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            row["after_setup_bytes"] = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        return s

    train_module.build_session = measured_build
    started = time.perf_counter()
    try:
        train_module.train(cfg, output_dir=workdir / f"out-{case}", sink=NullSink())
        if cuda:
            torch.cuda.synchronize(device)
            row["train_peak_bytes"] = torch.cuda.max_memory_allocated(device)
            row["train_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    except Exception as exc:  # OOM or a stack without the precision: recorded, the next case goes on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        train_module.build_session = build_session
        row["seconds"] = time.perf_counter() - started
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def setup_rows(model: Path, device: torch.device | str, *, cases: list[str], resolution: int, steps: int,
               workdir: Path) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(device)
    rows = []
    for case in cases:
        print(f"  set-up {case:<8}", end="", flush=True)
        row = setup_row(case, model, device, resolution=resolution, steps=steps, workdir=workdir)
        peaks = [row.get(k) for k in ("setup_peak_bytes", "train_peak_bytes")]
        print(row["error"] or (f"  set-up {peaks[0] / 2**30:.2f} GiB, training {peaks[1] / 2**30:.2f} GiB"
                               if all(peaks) else "  (no CUDA: no memory figures)"), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> list[str]:
    """The set-up vs training table of the gpu-bench block."""
    def gib(value) -> str:
        return "-" if value is None else f"{value / 2**30:.2f}"

    lines = ["", "Set-up (load, latent and text caching, LoRA, casts, placement) against training, through "
             "lora-sweep's own set-up (`benchmarks/gpu_setup.py`): batch 1, gradient checkpointing, empty cache per "
             "case; GiB of `max_memory_allocated` (reserved in brackets); kohya: sd-scripts PR #1057 (`--fp8_base`).",
             "", "| case | set-up peak | held after set-up | training peak | set-up <= training | kohya (GB) | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        setup, train = r.get("setup_peak_bytes"), r.get("train_peak_bytes")
        ok = "-" if setup is None or train is None else ("yes" if setup <= train else "**no**")
        reserved_setup, reserved_train = gib(r.get("setup_reserved_bytes")), gib(r.get("train_reserved_bytes"))
        lines.append(f"| {r['case']} ({', '.join(r['overrides'])}) | {gib(setup)} ({reserved_setup}) | "
                     f"{gib(r.get('after_setup_bytes'))} | {gib(train)} ({reserved_train}) | {ok} | "
                     f"{r['kohya_gb'] or '-'} | {r.get('error') or ''} |")
    return lines
