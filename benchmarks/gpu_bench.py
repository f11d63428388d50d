"""`make bench-gpu`: SDXL-base LoRA training speed, memory and MFU on a CUDA GPU, lora-sweep vs a bare loop.

    python benchmarks/gpu_bench.py --out benchmarks/results/gpu.json      # about 5-8 minutes on an H100
    python benchmarks/gpu_bench.py --toy --device cpu --out /tmp/gpu.json  # the same logic on the tiny UNet, CPU

The UNet is SDXL base's (2.567 B params, random weights: nothing to download) at 1024 x 1024 (128 x 128 latents,
cached-latent training: no VAE, no text encoders), LoRA rank 16 on kohya's targets, AdamW, SDPA attention.
Matrix: precision (bf16, fp16, fp8 base with bf16 compute) x batch (1, 4) x gradient checkpointing (off, on), for
lora-sweep's step; the bare diffusers + peft loop for bf16 and fp16 (diffusers has no fp8-base training); then,
on lora-sweep bf16 without checkpointing, the cost of train()'s per-step NaN checks and the speed options, each
alone on top of the baseline: TF32, fused AdamW, channels-last, CUDA graphs, torch.compile of the repeated
transformer blocks (gpu_options.py); then lora-sweep's real set-up per precision (load, caching, casts: its GPU peak
next to the training peak, and kohya's published fp8 figures; gpu_setup.py). Each configuration starts from the
same LoRA values and seed, so its first loss is comparable with its baseline's ("same result" check).
MFU = images/s x model FLOPs per image (counted with torch.utils.flop_counter, recomputation not counted) / peak;
HFU counts the recomputed forward of gradient checkpointing too.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import ROOT  # noqa: E402
from benchmarks.gpu_options import OPTIONS, set_tf32  # noqa: E402
from benchmarks.report import machine_info, update_markdown, write_json  # noqa: E402

BARE_PRECISIONS = ("fp32", "bf16", "fp16")


class Bench:
    """Runs configurations one by one, records a row each (an error becomes the row's `error`), keeps the budget."""

    def __init__(self, args, config: dict, flops: dict, peak: float | None) -> None:
        from benchmarks.gpu_model import shape_for

        self.args, self.config, self.flops, self.peak = args, config, flops, peak
        self.shape, self.device = shape_for(config), torch.device(args.device)
        self.rows: list[dict] = []
        self.started = time.perf_counter()
        self.lora: dict | None = None

    def free(self) -> None:
        """Drop what the previous configuration left (its UNet, optimizer, graphs) before the next build."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.args.budget_s

    def row(self, impl: str, precision: str, batch: int, ckpt: bool, option: str, run) -> dict:
        from benchmarks.gpu_steps import measure

        row = {"impl": impl, "precision": precision, "batch": batch, "gradient_checkpointing": ckpt,
               "option": option, "error": None}
        print(f"  {impl:<10} {precision:<8} batch {batch} ckpt {'on ' if ckpt else 'off'} {option:<13}", end="",
              flush=True)
        if self.over_budget():
            row["error"] = f"skipped: over the {self.args.budget_s:.0f} s budget"
        else:
            try:
                step = run()
                row.update(measure(step, self.device, warmup=self.args.warmup, steps=self.args.steps))
            except Exception as exc:  # OOM, an option the stack lacks, ...: recorded, the matrix goes on
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            finally:
                self.free()
        if row.get("step_s"):
            row["images_per_s"] = batch / row["step_s"]
            train, train_ckpt = self.flops.get("train"), self.flops.get("train_gc" if ckpt else "train")
            if self.peak and train:
                row["mfu"] = row["images_per_s"] * train / (self.peak * 1e12)
                row["hfu"] = row["images_per_s"] * train_ckpt / (self.peak * 1e12)
        print(f" {row['images_per_s']:8.2f} img/s" if row.get("images_per_s") else f" {row['error']}", flush=True)
        self.rows.append(row)
        return row

    def lora_sweep_matrix(self, precision: str, options: bool = False) -> None:
        """The baselines of one precision (options=False), or the speed options on top of its baseline."""
        from benchmarks.gpu_model import build_unet
        from benchmarks.gpu_steps import load_lora_state, lora_state, lora_sweep_step, lora_sweep_unet, make_session

        self.free()
        unet = build_unet(self.config, self.device)
        policy, params = lora_sweep_unet(unet, precision, self.args.rank, self.device)
        self.lora = self.lora or lora_state(unet)

        def session(batch: int, ckpt: bool, optimizer_args: dict | None = None):
            load_lora_state(unet, self.lora)
            return make_session(unet, policy, params, self.shape, batch=batch, gradient_checkpointing=ckpt,
                                optimizer_args=optimizer_args or {}, rank=self.args.rank, device=self.device)

        if options:
            for option in self.args.options:
                for batch in self.args.batches:
                    self.option_row(option, unet, policy, session, batch)
        else:
            for ckpt in self.args.checkpointing:
                for batch in self.args.batches:
                    self.row("lora-sweep", precision, batch, ckpt, "baseline",
                             lambda batch=batch, ckpt=ckpt: lora_sweep_step(session(batch, ckpt)))

    def option_row(self, option: str, unet, policy, session, batch: int) -> None:
        from benchmarks.gpu_options import option_step, undo_option

        try:
            self.row("lora-sweep", policy.name, batch, False, option,
                     lambda: option_step(option, unet, session, batch, self.lora))
        finally:
            undo_option(option, unet)

    def bare_matrix(self, precision: str) -> None:
        from benchmarks.gpu_model import build_unet
        from benchmarks.gpu_steps import bare_batch, bare_loop, bare_step, load_lora_state, lora_state

        self.free()
        loop = bare_loop(build_unet(self.config, self.device), precision, self.args.rank)
        self.lora = self.lora or lora_state(loop.unet)
        dtype = next(p.dtype for n, p in loop.unet.named_parameters() if "lora_" not in n)
        for ckpt in self.args.checkpointing:
            if ckpt:
                loop.unet.enable_gradient_checkpointing()
            else:
                loop.unet.disable_gradient_checkpointing()
            for batch in self.args.batches:
                def run(batch=batch):
                    load_lora_state(loop.unet, self.lora)
                    loop.optimizer.state.clear()
                    return bare_step(loop, bare_batch(self.shape, batch, self.device, dtype))
                self.row("bare", precision, batch, ckpt, "baseline", run)


def compare_to_baseline(rows: list[dict]) -> None:
    """Relative differences of each row's seeded losses from its lora-sweep baseline's (same precision, batch,
    checkpointing): of the first loss (same forward?) and the largest over the common steps (same updates?)."""
    base = {(r["precision"], r["batch"], r["gradient_checkpointing"]): r.get("losses") for r in rows
            if r["impl"] == "lora-sweep" and r["option"] == "baseline"}
    for r in rows:
        ref = base.get((r["precision"], r["batch"], r["gradient_checkpointing"]))
        if ref and r.get("losses"):
            diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], ref, strict=True)]
            r["first_loss_rel_diff"], r["loss_rel_diff_max"] = diffs[0], max(diffs)


def _setup_model(toy: bool) -> Path:
    """The model the set-up cases load: the tiny SDXL (--toy), else SDXL base with random fp16 weights (~6.9 GB of
    disk, built once into lora-sweep's cache by benchmarks/sdxl_model.py)."""
    if toy:
        from lora_sweep.model.loading import tiny_model_dir

        return tiny_model_dir()
    from benchmarks.sdxl_model import random_sdxl_dir

    return random_sdxl_dir()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    p.add_argument("--markdown", default=None, help="file whose gpu-bench block to rewrite (default BENCHMARKS.md "
                   "on CUDA, none otherwise; '' for none)")
    p.add_argument("--toy", action="store_true", help="lora-sweep's tiny UNet at 64 px instead of SDXL base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precisions", default="bf16,fp16,fp8_bf16")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"subset of {','.join(OPTIONS)}, or ''")
    p.add_argument("--options-precision", default="bf16")
    p.add_argument("--bare", default="bf16,fp16", help="precisions for the bare loop, or ''")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=480.0, help="configurations after this are skipped")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--setup", default="bf16,fp16,fp8,fp8_te", help="set-up vs training memory cases "
                   "(gpu_setup.CASES), or ''")
    p.add_argument("--setup-model", type=Path, default=None, help="SDXL folder for them (default: the random fp16 "
                   "SDXL base built once into the cache; the tiny model with --toy)")
    p.add_argument("--setup-steps", type=int, default=3)
    args = p.parse_args(argv)
    split = lambda text: [x for x in text.split(",") if x.strip()]  # noqa: E731
    args.precisions, args.bare, args.options = split(args.precisions), split(args.bare), split(args.options)
    args.setup = split(args.setup)
    args.batches = [int(b) for b in split(args.batches)]
    args.checkpointing = [c == "on" for c in split(args.checkpointing)]
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks.gpu_markdown import render
    from benchmarks.gpu_model import count_flops, peak_tflops, unet_config

    args = parse_args(argv)
    info = machine_info()
    cuda = torch.device(args.device).type == "cuda"
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if cuda else None
    if cuda:
        memory = torch.cuda.get_device_properties(torch.device(args.device)).total_memory / 2**30
        info["gpu"] = f"{gpu}, CUDA {torch.version.cuda}, {memory:.0f} GiB"
    peak = args.peak_tflops or (peak_tflops(gpu) if gpu else None)
    config = unet_config(args.toy)
    print(f"counting FLOPs ({'tiny' if args.toy else 'SDXL base'} UNet, meta device) ...", flush=True)
    counted = count_flops(config, rank=args.rank, gradient_checkpointing=False)
    flops = {"forward": counted["forward"], "train": counted["train"],
             "train_gc": count_flops(config, rank=args.rank, gradient_checkpointing=True)["train"]}
    set_tf32(on=False)  # the baseline: torch's defaults
    bench = Bench(args, config, flops, peak)
    print(f"device {gpu or args.device}; peak {peak} TFLOP/s; train step {flops['train'] / 1e12:.3f} TFLOP/image",
          flush=True)
    for precision in args.precisions:  # baselines first, so a slow option cannot crowd them out of the budget
        bench.lora_sweep_matrix(precision)
    setup = []
    if args.setup:  # lora-sweep's real set-up: set-up peak vs training peak per precision
        import tempfile

        from benchmarks.gpu_setup import setup_rows

        bench.free()
        model = args.setup_model or _setup_model(args.toy)
        with tempfile.TemporaryDirectory(prefix="gpu-setup-") as work:
            setup = setup_rows(model, args.device, cases=args.setup, resolution=64 if args.toy else 1024,
                               steps=args.setup_steps, workdir=Path(work))
        bench.free()
    for precision in args.bare:
        if precision in BARE_PRECISIONS:
            bench.bare_matrix(precision)
    if args.options:
        bench.lora_sweep_matrix(args.options_precision, options=True)
    compare_to_baseline(bench.rows)
    results = {"machine": info, "toy": args.toy, "device": args.device, "peak_tflops": peak, "flops_per_image": flops,
               "params": {k: v for k, v in vars(args).items() if k not in ("out", "markdown")},
               "seconds": time.perf_counter() - bench.started, "rows": bench.rows, "setup": setup}
    write_json(args.out, results)
    body = render(results)
    print(body)
    markdown = args.markdown if args.markdown is not None else (str(ROOT / "BENCHMARKS.md") if cuda else "")
    if markdown:
        update_markdown(Path(markdown), "gpu-bench", body)
    print(f"wrote {args.out}" + (f" and the gpu-bench block of {markdown}" if markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
