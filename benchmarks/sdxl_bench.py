"""`make bench-sdxl`: lora-sweep on SDXL base's real architecture (random weights): memory, load, steps, LoRA files.

    python benchmarks/sdxl_bench.py [--cache-dir DIR] [--root REPO] [--cases bf16,fp8_te] [--out JSON]
                                    [--before JSON] [--markdown BENCHMARKS.md | --markdown ''] [--resume]

1. Builds SDXL base from the bundled configs with random weights, as an fp16 diffusers folder, once, in the cache
   (benchmarks/sdxl_model.py: ~6.9 GB of disk, about a minute).
2. Runs `python sweep.py model=sdxl data.resolution=128 train.max_steps=2 train.batch_size=1` on the bundled photos
   for each case, one job at a time, each in its own process probed from the inside (benchmarks/sdxl_job.py):
   `bf16` (precision=bf16, UNet LoRA) and `fp8_te` (precision=fp8 with text-encoder LoRA). Per job: model load
   seconds, set-up seconds, peak RSS (VmHWM), seconds of each of the two steps; the job's kohya file: LoRA module
   counts (kohya: 722 UNet, 264 text encoders) and SGM names. The first job fills an empty latent/text cache.
   Before them, the bf16 job's model load alone in three fresh processes (`--load-reps`), for a steadier figure.
3. Loads the fp8_te job's kohya file into the real pipeline with diffusers' `load_lora_weights` and counts the
   modules that got a LoRA (benchmarks/sdxl_checks.py).
4. Times lora-sweep's step against the bare diffusers + peft loop on the same real UNet (fp32, 128 px, batch 1,
   clipping in both; benchmarks/sdxl_step.py), interleaved repetitions, median ratio.
Writes the JSON and the `sdxl-bench` block of BENCHMARKS.md (with `--before`, a before column from a run of this
script on an older checkout: `--root <that checkout> --markdown ''`). Jobs need up to ~19 GiB of RAM before the
fix and ~10 after: each waits until that much is available (`--min-free-gib`), since a CPU machine is often shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT  # noqa: E402
from benchmarks.report import load_average, machine_info, update_markdown, write_json  # noqa: E402

CASES = {"bf16": ["precision=bf16"], "fp8_te": ["precision=fp8", "network.train_text_encoder=true"]}
JOB = ["model=sdxl", "data.resolution=128", "train.max_steps=2", "train.batch_size=1",
       "sweep.skip_finished=false", "train.resume=never"]  # every job runs from scratch, even on --resume
GIB = 2**30


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("inf")


def wait_for_memory(need_gib: float, timeout_s: float) -> float:
    """Block until MemAvailable >= need_gib (another job on a shared machine may hold it); returns seconds waited."""
    started = time.perf_counter()
    while available_gib() < need_gib:
        if time.perf_counter() - started > timeout_s:
            raise SystemExit(f"only {available_gib():.1f} GiB available after {timeout_s:.0f} s; "
                             f"{need_gib:.0f} GiB needed (--min-free-gib)")
        print(f"  waiting for {need_gib:.0f} GiB of free memory ({available_gib():.1f} GiB available) ...",
              flush=True)
        time.sleep(30)
    return time.perf_counter() - started


def warm_page_cache(folder: Path) -> float:
    """Read every file of the model once (plain reads: page cache, not this process's memory), so that each job's
    load time measures loading, not the disk; returns the seconds it took."""
    started = time.perf_counter()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb", buffering=0) as f:
            while f.read(64 * 2**20):
                pass
    return time.perf_counter() - started


def reusable(record: Path, resume: bool) -> bool:
    return resume and record.exists() and json.loads(record.read_text()).get("exit_code", 0) == 0


def run_logged(cmd: list[str], env: dict, log: Path) -> int:
    print("  $ " + " ".join(cmd[1:]), flush=True)
    with open(log, "w") as out:
        return subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def job_case(case: str, args, model: Path, work: Path, env: dict) -> dict:
    """One sweep.py job of `case`, probed; its record plus the module counts of the kohya file it wrote."""
    from benchmarks.sdxl_checks import kohya_modules

    record_path = work / f"job-{case}.json"
    if not reusable(record_path, args.resume):
        waited = wait_for_memory(args.min_free_gib, args.wait_s)
        warm_s = warm_page_cache(model)
        print(f"  model files read into the page cache in {warm_s:.1f} s", flush=True)
        overrides = [*JOB, f"model.path={model}", *CASES[case], f"hydra.run.dir={work / f'out-{case}'}"]
        code = run_logged([sys.executable, str(ROOT / "benchmarks" / "sdxl_job.py"), "--record", str(record_path),
                           "--root", str(args.root), "--", *overrides], env, work / f"job-{case}.log")
        if code != 0 or not record_path.exists():
            return {"case": case, "error": f"exit {code}; see {work / f'job-{case}.log'}", "waited_s": waited}
    record = json.loads(record_path.read_text())
    kohya = Path(record["output_dir"]) / "lora.safetensors"
    record["case"], record["overrides"] = case, CASES[case]
    record["modules"] = kohya_modules(kohya) if kohya.exists() else None
    record["kohya_file"] = str(kohya)
    return record


def load_probes(args, model: Path, work: Path, env: dict) -> dict:
    """The bf16 job's model load alone, in `args.load_reps` fresh processes (page cache warm): a steadier load
    figure than one job's, on a machine whose other work comes and goes."""
    times = []
    for rep in range(args.load_reps):
        record = work / f"load-{rep}.json"
        if not reusable(record, args.resume):
            wait_for_memory(args.min_free_gib, args.wait_s)
            warm_page_cache(model)
            overrides = [*JOB, f"model.path={model}", *CASES["bf16"], f"hydra.run.dir={work / f'load-{rep}'}"]
            run_logged([sys.executable, str(ROOT / "benchmarks" / "sdxl_job.py"), "--record", str(record),
                        "--root", str(args.root), "--stop-after-load", "--", *overrides], env, work / f"load-{rep}.log")
        loads = json.loads(record.read_text()).get("load_s") if record.exists() else None
        if loads:
            times.append(loads[0])
    from benchmarks.common import median

    return {"load_s": times, "median_s": median(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root for the model (default: lora-sweep's)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    parser.add_argument("--cases", default="bf16,fp8_te")
    parser.add_argument("--skip", default="", help="comma-separated: diffusers, step")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sdxl.json")
    parser.add_argument("--before", type=Path, default=ROOT / "benchmarks" / "results" / "sdxl-before.json",
                        help="a result of this script on the code before, for the before column (if it exists)")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="'' to leave BENCHMARKS.md alone")
    parser.add_argument("--workdir", type=Path, default=None, help="default: <cache>/bench-sdxl/<root name>")
    parser.add_argument("--resume", action="store_true", help="reuse job records already in --workdir")
    parser.add_argument("--min-free-gib", type=float, default=12.0,
                        help="RAM to wait for before each job (19 for the code before the fix)")
    parser.add_argument("--wait-s", type=float, default=3600.0)
    parser.add_argument("--step-reps", type=int, default=5, help="repetitions of the step figure")
    parser.add_argument("--load-reps", type=int, default=3, help="load-only probes (0: none)")
    args = parser.parse_args(argv)
    args.root = args.root.resolve()
    skip = {s for s in args.skip.split(",") if s}

    from benchmarks.sdxl_model import random_sdxl_dir
    from lora_sweep.paths import default_cache_dir

    cache = Path(args.cache_dir or default_cache_dir()).resolve()
    commit = subprocess.run(["git", "-C", str(args.root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    results: dict = {"machine": machine_info(), "root": str(args.root), "root_commit": commit, "cases": {},
                     "seconds": {}}
    started = time.perf_counter()
    print(f"SDXL-base architecture benchmark of {args.root} (load average {load_average()})", flush=True)
    t = time.perf_counter()
    model = random_sdxl_dir(cache)
    results["model"], results["seconds"]["model_build"] = str(model), time.perf_counter() - t
    work = (args.workdir or cache / "bench-sdxl" / args.root.name).resolve()
    if not args.resume and work.exists():  # a fresh MLflow store (a FINISHED config would be skipped) and cache
        import shutil

        shutil.rmtree(work)
    job_cache = work / "cache"  # latents and texts start empty: the first job fills them
    job_cache.mkdir(parents=True, exist_ok=True)
    if not (job_cache / "models").exists():
        (job_cache / "models").symlink_to(cache / "models", target_is_directory=True)
    env = {**os.environ, "LORA_SWEEP_CACHE_DIR": str(job_cache), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(args.root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.load_reps:
        print(f"model load, {args.load_reps} fresh processes (the bf16 job's load, then exit) ...", flush=True)
        results["load"] = load_probes(args, model, work, env)
    for case in [c for c in args.cases.split(",") if c]:
        print(f"job {case} ...", flush=True)
        results["cases"][case] = job_case(case, args, model, work, env)
    te_case = results["cases"].get("fp8_te", {})
    if "diffusers" not in skip and te_case.get("kohya_file") and Path(te_case["kohya_file"]).exists():
        print("diffusers loads the kohya file ...", flush=True)
        record, code = work / "diffusers-check.json", 0
        if not reusable(record, args.resume):
            wait_for_memory(10.0, args.wait_s)
            code = run_logged([sys.executable, str(ROOT / "benchmarks" / "sdxl_checks.py"), "--model", str(model),
                               "--lora", te_case["kohya_file"], "--record", str(record)], env, work / "diffusers.log")
        results["diffusers"] = json.loads(record.read_text()) if code == 0 else {"error": f"exit {code}"}
    if "step" not in skip:
        print("step vs bare loop (fp32) ...", flush=True)
        record, code = work / "step.json", 0
        if not reusable(record, args.resume):
            wait_for_memory(max(16.0, args.min_free_gib), args.wait_s)  # fp32: one 9.6 GiB UNet + encoders
            code = run_logged([sys.executable, str(ROOT / "benchmarks" / "sdxl_step.py"), "--model", str(model),
                               "--record", str(record), "--root", str(args.root), "--workdir", str(work),
                               "--reps", str(args.step_reps)], env, work / "step.log")
        results["step"] = json.loads(record.read_text()) if code == 0 else {"error": f"exit {code}"}
    results["seconds"]["total"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = load_average()
    write_json(args.out, results)
    from benchmarks.sdxl_markdown import render

    before = json.loads(args.before.read_text()) if args.before and args.before.exists() and \
        args.before.resolve() != args.out.resolve() else None
    body = render(results, before)
    print(body)
    if args.markdown:
        update_markdown(Path(args.markdown), "sdxl-bench", body)
    print(f"\nwrote {args.out}" + (f" and the sdxl-bench block of {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
