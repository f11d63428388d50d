"""`make bench`: lora-sweep's five CPU figures on the tiny SDXL, each a side-by-side ratio measured in one run.

    python benchmarks/cpu_bench.py [--figures 1,2,3,4,5] [--quick] [--out benchmarks/results/cpu.json]
                                   [--markdown BENCHMARKS.md | --markdown ''] [--keep]

1 trainer overhead  lora-sweep's step vs a bare diffusers + peft loop (bare_loop.py)   target <= 1.10x
2 cache reuse       encodes of the 12-variant demo with the shared cache vs without    target = dataset size
3 queue overhead    slot free -> first training step, fork server vs fresh process     target < 1 s
4 tracking          MLflow seconds per 100 steps over the loop's time                  target < 2 %
5 sweep makespan    12 tiny jobs on K fake slots vs ceil(12/K) x job time              (reported)

Everything runs in a temporary directory (cache, MLflow stores, sweep outputs) removed at the end unless --keep.
Torch runs one thread in this process and in every sweep job (one core per fake slot), which keeps timings stable on
a shared machine. Writes the JSON results and rewrites the `cpu-bench` block of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import ROOT  # noqa: E402
from benchmarks.report import load_average, machine_info, update_markdown, write_json  # noqa: E402

FULL = {"steps": 6, "reps": 9, "warmup": 3, "batch_sizes": (1, 4), "tracking_steps": 100, "jobs": 12,
        "max_steps": 10, "slots": (1, 2), "spawn_jobs": 2, "extended_jobs": 5, "launcher_jobs": 4}
QUICK = {"steps": 2, "reps": 2, "warmup": 1, "batch_sizes": (1,), "tracking_steps": 10, "jobs": 3,
         "max_steps": 2, "slots": (1, 2), "spawn_jobs": 1, "extended_jobs": 2, "launcher_jobs": 2}


def link_base_cache(warm: Path, cold: Path) -> Path:
    """A cache holding the warm one's model and photos but no latents or text embeddings (a sweep's first run)."""
    cold.mkdir(parents=True)
    for name in ("models", "datasets"):
        if (warm / name).exists():
            (cold / name).symlink_to((warm / name).resolve(), target_is_directory=True)
    return cold


def quiet_progress_bars() -> None:
    """Model loading draws progress bars per load; the benchmark's output is its table."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def figure_1(p: dict, work: Path) -> dict:
    from benchmarks.cpu_figures import trainer_overhead

    return {"batches": [trainer_overhead(b, steps=p["steps"], reps=p["reps"], warmup=p["warmup"], workdir=work)
                        for b in p["batch_sizes"]]}


def figure_2(p: dict, work: Path) -> dict:
    from benchmarks.cache_figure import article_variants, cache_reuse

    return cache_reuse(article_variants(), work)


def figure_4(p: dict, work: Path) -> dict:
    from benchmarks.cpu_figures import tracking_overhead

    return tracking_overhead(p["tracking_steps"], 4, work)


def sweeps_3_5(p: dict, work: Path, figures: set[int]) -> dict:
    """Figures 3 and 5 share their sweeps: the K=1 fork-server sweep (on a cache without latents, so it also checks
    figure 2 across processes) serves both."""
    from benchmarks import queue_overhead
    from benchmarks.sweep_figures import EXTRA_PRELOAD, default_preload, makespan_figure, median_phases, run_sweep

    cache = Path(os.environ["LORA_SWEEP_CACHE_DIR"])
    preload = default_preload()
    out: dict = {"preload": preload, "extra_preload": list(EXTRA_PRELOAD), "max_steps": p["max_steps"],
                 "threads_per_job": 1}
    sweeps = []
    for k in p["slots"] if 5 in figures else (1,):
        cache_dir = link_base_cache(cache, work / f"cache-k{k}") if k == 1 else cache
        sweeps.append(run_sweep(work, f"fork-k{k}", jobs=p["jobs"], slots=k, start_method="forkserver",
                                max_steps=p["max_steps"], cache_dir=cache_dir))
    first = sweeps[0]
    out["cache_misses_per_job"] = [r.get("cache_misses") for r in sorted(first["jobs"], key=lambda r: r["idx"])]
    if 5 in figures:
        job_s = median_phases(first["jobs"][1:] or first["jobs"])["occupancy"]
        out["makespan"] = makespan_figure(sweeps, job_s)
    if 3 in figures:
        spawn = run_sweep(work, "spawn-k1", jobs=p["spawn_jobs"], slots=1, start_method="spawn",
                          max_steps=p["max_steps"], cache_dir=cache)
        extended = run_sweep(work, "fork-extended-k1", jobs=p["extended_jobs"], slots=1, start_method="forkserver",
                             max_steps=p["max_steps"], cache_dir=cache, preload=[*preload, *EXTRA_PRELOAD])
        out["forkserver"] = {"phases": median_phases(first["jobs"][1:] or first["jobs"]),
                             "preload_s": first["preload_s"], "jobs": len(first["jobs"][1:] or first["jobs"])}
        out["extended"] = {"phases": median_phases(extended["jobs"][1:] or extended["jobs"]),
                           "preload_s": extended["preload_s"], "jobs": len(extended["jobs"][1:] or extended["jobs"])}
        out["spawn"] = {"phases": median_phases(spawn["jobs"]), "jobs": len(spawn["jobs"])}
        launcher = queue_overhead.run_sweep("forkserver", p["launcher_jobs"], [f"'{e}'" for e in preload],
                                            work / "launcher-only")
        out["sweeps_3"] = [spawn, extended]
        out["launcher_only"] = {k: launcher[k] for k in ("start_s", "end_s", "first_start_s", "server_ready_s")}
    out["sweeps"] = sweeps
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", default="1,2,3,4,5", help="comma-separated subset of 1..5")
    parser.add_argument("--quick", action="store_true", help="minimal sizes: checks the paths, figures are noise")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu.json")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="'' to leave BENCHMARKS.md alone")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    args = parser.parse_args(argv)
    figures = {int(f) for f in args.figures.split(",") if f.strip()}
    p = QUICK if args.quick else FULL

    import torch

    torch.set_num_threads(1)
    quiet_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="lora-sweep-bench-"))
    os.environ["LORA_SWEEP_CACHE_DIR"] = str(work / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    results: dict = {"machine": machine_info(), "quick": args.quick, "params": p, "seconds": {}}
    results["machine"]["torch_threads"] = torch.get_num_threads()
    print(f"lora-sweep CPU benchmark in {work} (load average {load_average()})", flush=True)
    started = time.perf_counter()
    try:
        steps = [(2, "cache", figure_2), (1, "trainer", figure_1), (4, "tracking", figure_4)]
        for number, key, run in steps:
            if number in figures:
                t = time.perf_counter()
                print(f"figure {number} ({key}) ...", flush=True)
                results[key] = run(p, work)
                results["seconds"][key] = time.perf_counter() - t
        if figures & {3, 5}:
            t = time.perf_counter()
            print("figures 3 and 5 (sweeps) ...", flush=True)
            results["sweeps"] = sweeps_3_5(p, work, figures)
            results["seconds"]["sweeps"] = time.perf_counter() - t
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"]["total"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = load_average()
    from benchmarks.cpu_markdown import render

    body = render(results)
    print(body)
    write_json(args.out, results)
    if args.markdown:
        update_markdown(Path(args.markdown), "cpu-bench", body)
    print(f"\nwrote {args.out}" + (f" and the cpu-bench block of {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
