"""`make bench-sdxl`: lora-sweep on SDXL base's real architecture with random weights, on the CPU: memory, load,
the step against the bare loop, and the LoRA files kohya and diffusers read (BENCHMARKS.md says what each measures).

    python -m benchmarks.sdxl [--cache-dir DIR] [--cases bf16,fp8_te] [--skip diffusers,step] [--toy] ...

Each job runs `sweep.py` in its own process, probed from the inside (`python -m benchmarks.sdxl job RECORD
OVERRIDES...`). `--toy` takes the tiny model at 64 px: the same code paths in a minute.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import logging
import os
import re
import resource
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.measure import ROOT, after_build_session, median, trainer_overhead
from benchmarks.report import fmt, load_average, machine_info, publish, table, verdict

CASES = {"bf16": ["precision=bf16"], "fp8_te": ["precision=fp8", "network.train_text_encoder=true"]}
LABELS = {"bf16": "`precision=bf16`, UNet LoRA", "fp8_te": "`precision=fp8`, UNet + text-encoder LoRA"}
JOB = ["model=sdxl", "train.max_steps=2", "train.batch_size=1", "sweep.skip_finished=false", "train.resume=never"]
RSS_TARGET_GIB = {"bf16": 9.2, "fp8_te": 11.0}  # issue 16: 60 % of the peaks measured before its fix
STEP_TARGET, KOHYA_UNET_MODULES, KOHYA_TE_MODULES = 1.10, 722, 264
SGM_UNET = re.compile(r"lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_")
RECIPE = "sdxl-base-random-fp16-v1"  # bump when random_sdxl_dir's build changes what it writes
GIB = 2**30


def random_sdxl_dir(cache_root: Path, seed: int = 0) -> Path:
    """SDXL base's architecture with random weights (each module's own initialiser, fixed seed), saved the way the
    fp16 release ships (fp16 safetensors, one folder per component); built once, one component in memory at a time."""
    import torch

    from lora_sweep.model.loading import build_folder_once, sdxl_base_config_dir
    from lora_sweep.model.tiny_sdxl import SDXL_BASE_ASSETS

    digest = hashlib.sha256(f"{RECIPE}|seed={seed}".encode())
    for file in sorted(SDXL_BASE_ASSETS.rglob("*.json")):
        digest.update(file.relative_to(SDXL_BASE_ASSETS).as_posix().encode() + file.read_bytes())

    def build(staging: Path) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        configs = sdxl_base_config_dir(cache_root)  # configs and tokenizers, no weights
        shutil.copytree(configs, staging, dirs_exist_ok=True)
        for index, name in enumerate(("text_encoder", "text_encoder_2", "vae", "unet")):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + index)
                torch.set_default_dtype(torch.float16)  # built in fp16 directly: no fp32 copy
                try:
                    if name in ("unet", "vae"):
                        cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
                        model = cls.from_config(cls.load_config(configs / name))
                    else:
                        cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
                        model = cls(CLIPTextConfig.from_pretrained(configs / name)).to(torch.float16)
                finally:
                    torch.set_default_dtype(torch.float32)
            model.save_pretrained(staging / name, safe_serialization=True)
            del model
            gc.collect()

    return build_folder_once(Path(cache_root) / "models" / f"{RECIPE}-{digest.hexdigest()[:12]}", build)


def _rss_gib() -> dict[str, float]:
    import psutil

    return {"VmHWM": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "VmRSS": psutil.Process().memory_info().rss / GIB}


def job_main(argv: list[str]) -> int:
    """`job RECORD OVERRIDES...`: sweep.py's job in this process, as a user's command runs it, with the model load,
    the set-up and every step timed through lora-sweep's own functions; one JSON record, the job's exit status."""
    from lora_sweep.model import loading

    record_path, overrides = Path(argv[0]), argv[1:]
    record: dict = {"load_s": [], "marks": {}, "step_times": []}
    started = time.perf_counter()

    def mark(name: str) -> None:
        record["marks"][name] = {"t": time.perf_counter() - started, **_rss_gib()}

    load = loading.load_sdxl

    def timed_load(*args, **kwargs):
        t = time.perf_counter()
        parts = load(*args, **kwargs)
        record["load_s"].append(time.perf_counter() - t)
        mark("after_load")
        return parts

    def ready(s, seconds: float) -> None:
        record.update(setup_s=seconds, kohya_file=str(s.output_dir / f"{s.cfg.train.output_name}.safetensors"))
        mark("after_setup")
        progress = s.sink.progress

        def timed_progress(step, max_steps, loss, speed):
            record["step_times"].append((int(step), time.perf_counter(), loss))
            return progress(step, max_steps, loss, speed)

        s.sink.progress = timed_progress

    loading.load_sdxl = timed_load
    sys.argv, code = [str(ROOT / "sweep.py"), *overrides], 0
    try:
        with after_build_session(ready):
            runpy.run_path(str(ROOT / "sweep.py"), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    times = [t for _, t, _ in record["step_times"]]
    record.update(step_s=[b - a for a, b in itertools.pairwise(times)], peak_rss_gib=_rss_gib()["VmHWM"],
                  final_loss=record["step_times"][-1][2] if times else None, exit_code=code,
                  wall_s=time.perf_counter() - started)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return code


def wait_for_memory(need_gib: float, timeout_s: float = 3600.0) -> None:
    """Block until that much RAM is available (another job on a shared machine may hold it)."""
    import psutil

    started = time.perf_counter()
    while (free := psutil.virtual_memory().available / GIB) < need_gib:
        if time.perf_counter() - started > timeout_s:
            raise SystemExit(f"only {free:.1f} GiB available after {timeout_s:.0f} s; {need_gib:.0f} GiB needed")
        print(f"  waiting for {need_gib:.0f} GiB of free memory ({free:.1f} GiB available) ...", flush=True)
        time.sleep(30)


def warm_page_cache(folder: Path) -> None:
    """Read the model's files once (into the page cache, not this process), so a job's load measures loading."""
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb", buffering=0) as f:
            while f.read(64 * 2**20):
                pass


def kohya_modules(lora_file: Path) -> dict:
    """Module counts of a kohya LoRA file (from its keys), and the UNet names not in kohya's SGM layout."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        keys = list(f.keys())
    modules = sorted({k.removesuffix(".lora_down.weight") for k in keys if k.endswith(".lora_down.weight")})
    unet = [m for m in modules if m.startswith("lora_unet_")]
    complete = all(f"{m}.{leaf}" in keys for m in modules for leaf in ("lora_up.weight", "alpha"))
    return {"unet": len(unet), "te": sum(m.startswith(("lora_te1_", "lora_te2_")) for m in modules),
            "keys": len(keys), "not_sgm": [m for m in unet if not SGM_UNET.match(m)][:5],
            "up_and_alpha_for_each": complete}


def diffusers_check(model: Path, lora_file: Path) -> dict:
    """diffusers' own `load_lora_weights` of a kohya file into the real pipeline: the modules that got a LoRA and
    every warning diffusers, peft or transformers logged about unexpected, missing or unused keys."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage()[:300])
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model), dtype=torch.float16, local_files_only=True)
    for name in ("diffusers", "peft", "transformers"):
        logging.getLogger(name).addHandler(handler)
    try:
        pipe.load_lora_weights(str(lora_file))
    finally:
        for name in ("diffusers", "peft", "transformers"):
            logging.getLogger(name).removeHandler(handler)

    def wrapped(module) -> int:
        return sum(1 for _, m in module.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)

    key_problem = re.compile(r"unexpected keys|missing (adapter )?keys|not (been )?(loaded|used|renamed)", re.I)
    return {"unet": wrapped(pipe.unet), "te": wrapped(pipe.text_encoder) + wrapped(pipe.text_encoder_2),
            "warnings": [w for w in warnings if key_problem.search(w)]}


def _modules(m: dict | None) -> str:
    return "-" if not m else f"{m['unet']} / {m['te']}" + (" (non-SGM names!)" if m.get("not_sgm") else "")


def render(r: dict) -> list[str]:
    cases, step, dd = r.get("cases", {}), r.get("step") or {}, r.get("diffusers") or {}
    lines = [f"Model: SDXL base built from `lora_sweep/assets/sdxl_base` with random weights, fp16 diffusers folder"
             f"{' (`--toy`: the tiny model instead, a code-path check)' if r.get('toy') else ''}; jobs: `sweep.py "
             f"{' '.join(JOB[:3])} data.resolution={r.get('resolution', 128)}` on the bundled photos, one at a time, "
             "the first on an empty latent/text cache.", ""]
    rows = []
    for case, c in cases.items():
        rss, target = c.get("peak_rss_gib"), RSS_TARGET_GIB.get(case)
        rows.append([f"peak RSS, {LABELS[case]}", fmt(rss, ".2f", " GiB"), f"<= {target} GiB",
                     verdict(None if rss is None else rss <= target)])
    for case, c in cases.items():
        rows.append([f"model load / set-up / s per step (steps 1, 2), {LABELS[case]}",
                     f"{fmt(median(c.get('load_s') or []), '.1f')} s / {fmt(c.get('setup_s'), '.1f')} s / "
                     + ", ".join(f"{x:.1f}" for x in c.get("step_s") or []) + " s", "reported", "-"])
    if step.get("ratio") is not None:
        rows.append(["lora-sweep step / bare diffusers + peft loop (fp32, batch 1, clipping in both)",
                     f"{step['ratio']:.3f}x [{step['ratio_min']:.2f}-{step['ratio_max']:.2f}] "
                     f"({step['lora_sweep_step_s']:.2f} vs {step['bare_step_s']:.2f} s)", f"<= {STEP_TARGET}x",
                     verdict(step["ratio"] <= STEP_TARGET)])
    te = cases.get("fp8_te", {}).get("modules") or {}
    rows.append(["LoRA modules in the kohya files (UNet / text encoders), SGM names",
                 " ; ".join(_modules(c.get("modules")) for c in cases.values()), "722 / 264",
                 verdict(None if not te else (te["unet"], te["te"]) == (KOHYA_UNET_MODULES, KOHYA_TE_MODULES)
                         and not te["not_sgm"])])
    if dd:
        rows.append(["diffusers `load_lora_weights` of the fp8_te kohya file",
                     f"{dd['unet']} / {dd['te']} modules, {len(dd['warnings'])} key warnings",
                     "722 / 264, no key warning",
                     verdict((dd["unet"], dd["te"]) == (KOHYA_UNET_MODULES, KOHYA_TE_MODULES) and not dd["warnings"])])
    lines += table(["measured (one job, CPU)", "result", "target", "status"], rows) + [""]
    for case, c in cases.items():
        marks = c.get("marks") or {}
        load, setup = marks.get("after_load", {}), marks.get("after_setup", {})
        lines.append(f"- {LABELS[case]}: job {fmt(c.get('wall_s'), '.0f')} s, final loss "
                     f"{fmt(c.get('final_loss'), '.4f')}; peak RSS after load {fmt(load.get('VmHWM'), '.2f')} GiB "
                     f"(resident {fmt(load.get('VmRSS'), '.2f')}), after set-up {fmt(setup.get('VmHWM'), '.2f')} GiB "
                     f"(resident {fmt(setup.get('VmRSS'), '.2f')}).{' Error: ' + c['error'] if c.get('error') else ''}")
    if step.get("reps"):
        lines.append(f"- Step figure: {step['reps']} repetitions x {step['steps']} steps after {step['warmup']} "
                     f"warm-up steps, {step.get('lora_tensors')} LoRA tensors, {step.get('threads')} torch threads; "
                     f"ratio of each side's fastest repetition {fmt(step.get('ratio_of_fastest'), '.3f')}x.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root for the model (default: lora-sweep's)")
    parser.add_argument("--cases", default="bf16,fp8_te")
    parser.add_argument("--skip", default="", help="comma-separated: diffusers, step")
    parser.add_argument("--toy", action="store_true", help="the tiny model at 64 px: a code-path check in a minute")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/sdxl.json (none with --toy)")
    parser.add_argument("--markdown", default=None, help="default: BENCHMARKS.md (none with --toy); '' for none")
    parser.add_argument("--min-free-gib", type=float, default=12.0, help="RAM to wait for before each job")
    parser.add_argument("--step-reps", type=int, default=5, help="repetitions of the step figure")
    args = parser.parse_args(argv)
    from lora_sweep.model.loading import tiny_model_dir
    from lora_sweep.paths import default_cache_dir

    cache = Path(args.cache_dir or default_cache_dir()).resolve()
    out = args.out or (None if args.toy else ROOT / "benchmarks" / "results" / "sdxl.json")
    markdown = args.markdown if args.markdown is not None else ("" if args.toy else str(ROOT / "BENCHMARKS.md"))
    resolution, need_gib = (64, 0.0) if args.toy else (128, args.min_free_gib)
    results: dict = {"machine": machine_info(), "toy": args.toy, "resolution": resolution, "cases": {}}
    started = time.perf_counter()
    model = tiny_model_dir(cache) if args.toy else random_sdxl_dir(cache)
    work = cache / "bench-sdxl"
    shutil.rmtree(work, ignore_errors=True)  # a fresh MLflow store (a FINISHED config would be skipped) and cache
    (work / "cache").mkdir(parents=True)
    (work / "cache" / "models").symlink_to(cache / "models", target_is_directory=True)
    env = {**os.environ, "LORA_SWEEP_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "TOKENIZERS_PARALLELISM": "false"}
    kohya_files: dict[str, Path] = {}
    for case in [c for c in args.cases.split(",") if c]:
        print(f"job {case} ...", flush=True)
        wait_for_memory(need_gib)
        warm_page_cache(model)
        record = work / f"job-{case}.json"
        with open(work / f"job-{case}.log", "w") as log:
            code = subprocess.run([sys.executable, "-m", "benchmarks.sdxl", "job", str(record), *JOB,
                                   f"model.path={model}", f"data.resolution={resolution}", *CASES[case],
                                   f"hydra.run.dir={work / case}"], env=env, cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT).returncode
        c = json.loads(record.read_text()) if record.exists() else {}
        kohya = kohya_files[case] = Path(c.pop("kohya_file", work / "missing"))
        c.update(modules=kohya_modules(kohya) if kohya.exists() else None,
                 error=None if code == 0 else f"exit {code}; see the job's log")
        results["cases"][case] = c
    te_file = kohya_files.get("fp8_te")
    if "diffusers" not in args.skip and te_file and te_file.exists():
        print("diffusers loads the kohya file ...", flush=True)
        results["diffusers"] = diffusers_check(model, te_file)
        gc.collect()
    if "step" not in args.skip:
        print("step against the bare loop (fp32) ...", flush=True)
        wait_for_memory(max(16.0, need_gib) if not args.toy else 0.0)  # fp32: one 9.6 GiB UNet + encoders
        os.environ["LORA_SWEEP_CACHE_DIR"] = str(work / "cache")
        results["step"] = trainer_overhead(["model=sdxl", f"model.path={model}", f"data.resolution={resolution}",
                                            "train.batch_size=1", "precision=fp32"], work / "step", warmup=2,
                                           steps=3, reps=args.step_reps)
    results["seconds"], results["machine"]["load_average_end"] = time.perf_counter() - started, load_average()
    publish("sdxl-bench", "Real SDXL-base architecture (`make bench-sdxl`)", results, render(results), out=out,
            markdown=markdown or None)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["job"]:
        sys.exit(job_main(sys.argv[2:]))
    sys.exit(main())
