"""`make bench`: lora-sweep's five CPU figures on the tiny SDXL (BENCHMARKS.md says what each measures).

    python -m benchmarks.cpu [--figures 1,2,3,4,5] [--quick] [--out FILE] [--markdown FILE | --markdown '']

Everything runs in a temporary folder (cache, MLflow stores, sweeps) removed at the end. Torch runs one thread here
and in every sweep job (one core per fake slot), which keeps timings steady on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import ROOT, NullSink, compose, median, trainer_overhead
from benchmarks.report import fmt, load_average, machine_info, publish, table, verdict

FULL = {"warmup": 3, "steps": 6, "reps": 9, "batch_sizes": (1, 4), "tracking_steps": 100, "jobs": 12,
        "max_steps": 10, "slots": (1, 2), "spawn_jobs": 2}
QUICK = {"warmup": 1, "steps": 2, "reps": 2, "batch_sizes": (1,), "tracking_steps": 10, "jobs": 3,
         "max_steps": 2, "slots": (1, 2), "spawn_jobs": 1}
TRAINER_TARGET, QUEUE_TARGET_S, TRACKING_TARGET = 1.10, 1.0, 0.02
ENCODERS = ("vae", "text_encoder", "text_encoder_2")
SDXL_VAE_ENCODE_TFLOP_1024 = 4.88  # SDXL's VAE encoder, one 1024 x 1024 image (torch.utils.flop_counter)


def cache_reuse(work: Path, variants: list[str] | None = None) -> dict:
    """Figure 2: the demo variants prepare their data (`prepare_examples`) all through one cache, then each through
    an empty cache of its own; forward hooks count the images and captions each encoder actually processes."""
    import torch

    from lora_sweep.data.dataset import scan_folder
    from lora_sweep.data.photos import data_folder
    from lora_sweep.data.prepare import prepare_examples
    from lora_sweep.training.session import load_parts

    names = variants or sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("v*.yaml"))
    configs = [compose("preset=demo", f"experiment={name}") for name in names]
    parts = load_parts(configs[0])
    counts = dict.fromkeys(ENCODERS, 0)

    def counter(name: str):
        def count(module, args, output) -> None:
            counts[name] += int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else 1
        return count

    modules = (parts.vae.encoder, parts.text_encoder, parts.text_encoder_2)
    hooks = [m.register_forward_hook(counter(name)) for name, m in zip(ENCODERS, modules, strict=True)]
    result: dict = {"variants": len(configs)}
    try:
        for mode in ("shared", "separate"):
            before, started = dict(counts), time.perf_counter()
            for i, cfg in enumerate(configs):
                scan = scan_folder(data_folder(cfg), cfg.data.caption_extension)
                job_cfg = copy.deepcopy(cfg)  # the whole config: data.resolution interpolates model.resolution
                job_cfg.data.cache_dir = str(work / ("fig2-shared" if mode == "shared" else f"fig2-own-{i}"))
                encode_text = not (cfg.network.train_text_encoder or cfg.data.shuffle_caption)
                prepare_examples(parts, scan, job_cfg.data, device=torch.device("cpu"), encode_text=encode_text)
                result["dataset_images"] = len(scan.items) * (2 if cfg.data.flip_aug else 1)
            result[mode] = {name: counts[name] - before[name] for name in ENCODERS}
            result[mode]["seconds"] = time.perf_counter() - started
    finally:
        for hook in hooks:
            hook.remove()
    return result


class _Clock(NullSink):
    """A sink over a RunLogger that notes wall time and MLflow seconds at the loop's first and last step."""

    def __init__(self, logger) -> None:
        self.logger, self.marks = logger, {}
        self.params, self.metrics, self.flush = logger.log_params, logger.log_metrics, logger.flush
        self.artifact = logger.log_artifact

    def progress(self, step, max_steps, loss, speed) -> None:
        if step in (0, max_steps):
            self.marks[step] = (time.perf_counter(), self.logger.seconds_in_mlflow)


def tracking_overhead(steps: int, batch_size: int, work: Path, flush_every: int | None = None) -> dict:
    """Figure 4: a real `train()` logging to a fresh sqlite store through lora-sweep's RunLogger; the MLflow seconds
    inside the loop (RunLogger.seconds_in_mlflow) over the loop's wall time, and the one-off MLflow seconds."""
    from lora_sweep.tracking.logger import RunLogger
    from lora_sweep.tracking.store import ROLE
    from lora_sweep.tracking.store import client as mlflow_client
    from lora_sweep.training.train import train

    extra = [] if flush_every is None else [f"tracking.flush_every={flush_every}"]
    cfg = compose(f"train.max_steps={steps}", f"train.batch_size={batch_size}", "precision=fp32", *extra)
    store = Path(tempfile.mkdtemp(prefix="fig4-mlflow-", dir=work))
    started = time.perf_counter()
    client = mlflow_client(f"sqlite:///{store / 'mlflow.db'}")
    exp_id = client.create_experiment("bench-tracking", artifact_location=(store / "artifacts").as_uri())
    logger = RunLogger.start(client, exp_id, name="bench", tags={ROLE: "job"}, flush_every=cfg.tracking.flush_every)
    setup_s = time.perf_counter() - started
    sink = _Clock(logger)
    train(cfg, output_dir=work / "fig4-out", sink=sink)
    ending = time.perf_counter()
    logger.end("FINISHED")
    (t0, m0), (t1, m1) = sink.marks[0], sink.marks[steps]
    return {"steps": steps, "batch_size": batch_size, "flush_every": int(cfg.tracking.flush_every),
            "step_s": (t1 - t0) / steps, "mlflow_per_100_steps_s": (m1 - m0) * 100 / steps,
            "share": (m1 - m0) / (t1 - t0), "mlflow_outside_loop_s": logger.seconds_in_mlflow - (m1 - m0) + setup_s
            + time.perf_counter() - ending}


def run_sweep(work: Path, name: str, *, jobs: int, slots: int, max_steps: int, cache: Path,
              start_method: str = "forkserver") -> dict:
    """`python sweep.py -m` of `jobs` tiny jobs on `slots` fake CPU slots of the gpu_queue launcher, one torch
    thread each; the launcher's times and the MLflow run's of every job (see `job_records`)."""
    sweep_dir, store = work / name, f"sqlite:///{work / 'mlflow.db'}"
    cmd = [sys.executable, str(ROOT / "sweep.py"), "-m", f"train.seed=range({jobs})", f"train.max_steps={max_steps}",
           "sweep.skip_finished=false", f"tracking.experiment=bench-{name}", "hydra/launcher=gpu_queue",
           "hydra.launcher.gpus=[]", f"hydra.launcher.cpu_slots={slots}", f"hydra.launcher.start_method={start_method}",
           "hydra.launcher.console=plain", f"hydra.sweep.dir={sweep_dir}"]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "LORA_SWEEP_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    started = time.time()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    summary = json.loads((sweep_dir / "gpu_queue_summary.json").read_text())
    return {"name": name, "slots": slots, "wall_s": time.time() - started,
            "preload_s": (summary.get("preload") or {}).get("seconds"), "jobs": job_records(summary, store)}


def job_records(summary: dict, tracking_uri: str) -> list[dict]:
    """Per job, epoch seconds from two clocks of one machine: the launcher's (slot free, process started, ended) and
    the MLflow run's (created; `cache/hits` at step 0 = data ready; `train/loss` at step 1 and the last)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    records = []
    for job in sorted(summary["jobs"], key=lambda j: j["idx"]):
        rec = {k: job.get(k) for k in ("idx", "state", "slot", "slot_free_at", "started_at", "ended_at")}
        if run_id := job.get("run_id"):
            losses, hits, misses = ({m.step: m for m in client.get_metric_history(run_id, key)}
                                    for key in ("train/loss", "cache/hits", "cache/misses"))
            rec.update(run_start=client.get_run(run_id).info.start_time / 1000,
                       data_ready=hits[0].timestamp / 1000 if 0 in hits else None,
                       first_step=losses[1].timestamp / 1000 if 1 in losses else None,
                       last_step=losses[max(losses)].timestamp / 1000 if losses else None,
                       cache_misses=int(misses[0].value) if 0 in misses else None)
        records.append(rec)
    return records


def job_phases(rec: dict) -> dict:
    """Seconds of each phase of one job, from its slot becoming free to the slot being free again."""
    def diff(later: str, earlier: str) -> float | None:
        a, b = rec.get(later), rec.get(earlier)
        return a - b if a is not None and b is not None else None

    return {"launch": diff("started_at", "slot_free_at"),  # queue + fork/spawn
            "to_run": diff("run_start", "started_at"),  # Hydra job, imports, MLflow store and run
            "to_data": diff("data_ready", "run_start"),  # model loaded, cached latents/text read
            "to_first_step": diff("first_step", "data_ready"),  # LoRA, optimizer, step 1
            "slot_to_run": diff("run_start", "slot_free_at"), "slot_to_first_step": diff("first_step", "slot_free_at"),
            "tail": diff("ended_at", "last_step"),  # save the LoRA, artifacts, end the run, exit
            "occupancy": diff("ended_at", "slot_free_at")}


def median_phases(records: list[dict]) -> dict:
    phases = [job_phases(r) for r in records]
    return {key: median(p[key] for p in phases) for key in phases[0]} if phases else {}


def makespan_row(sweep: dict, job_s: float) -> dict:
    """Figure 5: first slot free -> last job ended, against ceil(N/K) x `job_s` (one job's time without
    contention: the K=1 sweep's median) and against the same with this sweep's own median job time (which separates
    queueing from CPU contention between jobs); plus the idle gaps of a slot between two jobs."""
    jobs = [r for r in sweep["jobs"] if r.get("ended_at") and r.get("slot_free_at")]
    waves, own_s = math.ceil(len(jobs) / sweep["slots"]), median(job_phases(r)["occupancy"] for r in jobs)
    span = max(r["ended_at"] for r in jobs) - min(r["slot_free_at"] for r in jobs)
    gaps = []
    for slot in {r["slot"] for r in jobs}:
        on_slot = sorted((r for r in jobs if r["slot"] == slot), key=lambda r: r["started_at"])
        gaps += [b["started_at"] - a["ended_at"] for a, b in itertools.pairwise(on_slot)]
    return {"slots": sweep["slots"], "jobs": len(jobs), "makespan_s": span, "ideal_s": waves * job_s,
            "ratio": span / (waves * job_s), "job_s": own_s, "ratio_own": span / (waves * own_s),
            "idle_gap_median_s": median(gaps), "idle_gap_max_s": max(gaps, default=None),
            "failed": sum(r["state"] != "FINISHED" for r in sweep["jobs"]), "preload_s": sweep["preload_s"]}


def sweeps(p: dict, work: Path, figures: set[int]) -> dict:
    """Figures 3 and 5 share their sweeps. The K=1 fork-server sweep starts on a cache without latents, so its
    cache misses per job check figure 2 across processes too."""
    cache = Path(os.environ["LORA_SWEEP_CACHE_DIR"])
    cold = work / "cache-cold"  # the model and photos, no latents or text embeddings
    cold.mkdir()
    for name in ("models", "datasets"):
        if (cache / name).is_dir():
            (cold / name).symlink_to(cache / name, target_is_directory=True)
    runs = [run_sweep(work, f"fork-k{k}", jobs=p["jobs"], slots=k, max_steps=p["max_steps"],
                      cache=cold if k == 1 else cache) for k in (p["slots"] if 5 in figures else (1,))]
    later = runs[0]["jobs"][1:] or runs[0]["jobs"]  # the first job of a sweep also fills the cache
    out: dict = {"cache_misses_per_job": [r.get("cache_misses") for r in runs[0]["jobs"]],
                 "forkserver": {"phases": median_phases(later), "jobs": len(later)}}
    if 5 in figures:
        out["makespan"] = [makespan_row(run, out["forkserver"]["phases"]["occupancy"]) for run in runs]
    if 3 in figures:
        spawn = run_sweep(work, "spawn-k1", jobs=p["spawn_jobs"], slots=1, max_steps=p["max_steps"], cache=cache,
                          start_method="spawn")
        out["spawn"] = {"phases": median_phases(spawn["jobs"]), "jobs": len(spawn["jobs"])}
    return out


def summary_rows(r: dict) -> list[list[str]]:
    rows = []
    for b in r.get("trainer", []):
        rows.append(["1", f"trainer overhead, batch {b['batch_size']}, {b['resolution']} px",
                     f"{b['ratio']:.3f}x [{b['ratio_min']:.2f}-{b['ratio_max']:.2f}] ({b['lora_sweep_step_s']:.4f} "
                     f"vs {b['bare_step_s']:.4f} s/step)", f"<= {TRAINER_TARGET:.2f}x",
                     verdict(b["ratio"] <= TRAINER_TARGET)])
    if "cache" in r:
        c = r["cache"]
        shared, separate, n = c["shared"], c["separate"], c["dataset_images"]
        rows.append(["2", f"cache reuse, {c['variants']} variants, {n} images",
                     f"VAE {shared['vae']} vs {separate['vae']} encodes, text {shared['text_encoder']} vs "
                     f"{separate['text_encoder']}; {shared['seconds']:.1f} s vs {separate['seconds']:.1f} s",
                     f"= dataset size ({n})", verdict(all(shared[e] == n for e in ENCODERS))])
        saved = separate["vae"] - shared["vae"]
        rows.append(["2", "the same saving on SDXL at 1024 px", f"{saved * SDXL_VAE_ENCODE_TFLOP_1024:.0f} TFLOP of "
                     f"VAE encoding ({saved} x {SDXL_VAE_ENCODE_TFLOP_1024} TFLOP)", "-", "-"])
    s = r.get("sweeps", {})
    if s.get("cache_misses_per_job"):
        misses = s["cache_misses_per_job"]
        rows.append(["2", "cache across processes: misses per job of a sweep started without latents",
                     f"first job {misses[0]}, then {sorted(set(misses[1:]))}", "0 after the first job",
                     verdict(not any(misses[1:]))])
    if "spawn" in s:
        fork, spawn = s["forkserver"]["phases"], s["spawn"]["phases"]
        rows.append(["3", "queue: slot free -> job's MLflow run created (launcher, Hydra job, imports, store)",
                     f"{fmt(fork['slot_to_run'], '.2f')} s fork server, {fmt(spawn['slot_to_run'], '.2f')} s fresh "
                     "process", f"< {QUEUE_TARGET_S:.0f} s", verdict(fork["slot_to_run"] < QUEUE_TARGET_S)])
        rows.append(["3", "slot free -> first training step", f"{fmt(fork['slot_to_first_step'])} s fork server, "
                     f"{fmt(spawn['slot_to_first_step'])} s fresh process", "-", "-"])
    if "tracking" in r:
        t = r["tracking"]
        rows.append(["4", f"tracking, batch {t['batch_size']}, flush every {t['flush_every']} steps",
                     f"{t['mlflow_per_100_steps_s']:.3f} s per 100 steps = {100 * t['share']:.2f} % of loop time",
                     f"< {100 * TRACKING_TARGET:.0f} %", verdict(t["share"] < TRACKING_TARGET)])
    for m in s.get("makespan", []):
        rows.append(["5", f"makespan, {m['jobs']} jobs on {m['slots']} slot(s)",
                     f"{m['makespan_s']:.1f} s = {m['ratio']:.2f}x ideal ({m['ideal_s']:.1f} s); "
                     f"{m['ratio_own']:.2f}x with this sweep's own job time", "ideal = ceil(N/K) x job", "-"])
    return rows


def details(r: dict) -> list[str]:
    lines = []
    if "tracking" in r:
        t = r["tracking"]
        lines += ["", f"Figure 4: {t['steps']} steps at {t['step_s']:.3f} s/step; MLflow work outside the loop "
                  f"(store, run, params, LoRA artifacts, end) {t['mlflow_outside_loop_s']:.2f} s, paid once per job."]
    s = r.get("sweeps", {})
    if "spawn" in s:
        names = {"launch": "slot free -> process running", "to_run": "-> MLflow run created (Hydra job, imports, "
                 "store opened)", "to_data": "-> data ready (model loaded, cached latents read)",
                 "to_first_step": "-> first step done (LoRA, optimizer, step 1)",
                 "slot_to_first_step": "**slot free -> first step**", "tail": "last step -> slot free (save, exit)"}
        fork, spawn = s["forkserver"], s["spawn"]
        lines += ["", "Figure 3, median seconds per job phase: fork server (conf/'s preload), jobs "
                  f"2..{fork['jobs'] + 1} of the K=1 sweep; fresh process (`start_method=spawn`), "
                  f"{spawn['jobs']} job(s).", "",
                  *table(["phase", "fork server", "fresh process"],
                         [[label, fmt(fork["phases"][k], ".3f"), fmt(spawn["phases"][k], ".3f")]
                          for k, label in names.items()])]
    if s.get("makespan"):
        lines += ["", "Figure 5 (one core and one torch thread per fake slot):", "",
                  *table(["slots", "jobs", "makespan s", "ideal s", "ratio", "job s in this sweep", "ratio (own job s)",
                          "idle gap median / max s", "fork server start s", "failed"],
                         [[m["slots"], m["jobs"], f"{m['makespan_s']:.1f}", f"{m['ideal_s']:.1f}", f"{m['ratio']:.2f}",
                           fmt(m["job_s"]), f"{m['ratio_own']:.2f}",
                           f"{fmt(m['idle_gap_median_s'], '.3f')} / {fmt(m['idle_gap_max_s'], '.3f')}",
                           fmt(m["preload_s"], ".1f"), m["failed"]] for m in s["makespan"]])]
    return lines


def render(r: dict) -> list[str]:
    lines = ["**Quick run (`--quick`): sizes too small for the figures to mean anything.**", ""] if r["quick"] else []
    return lines + [f"Torch threads: 1 in the benchmark process and in each sweep job; total time "
                    f"{r['seconds']['total']:.0f} s.", "",
                    *table(["#", "figure", "measured", "target", "status"], summary_rows(r)), *details(r)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", default="1,2,3,4,5", help="comma-separated subset of 1..5")
    parser.add_argument("--quick", action="store_true", help="minimal sizes: checks the paths, figures are noise")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu.json")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="'' to leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    figures = {int(f) for f in args.figures.split(",") if f.strip()}
    p = QUICK if args.quick else FULL

    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="lora-sweep-bench-"))
    os.environ["LORA_SWEEP_CACHE_DIR"] = str(work / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    results: dict = {"machine": machine_info(), "quick": args.quick, "params": p, "seconds": {}}
    started = time.perf_counter()
    try:
        steps = [(2 in figures, "cache", lambda: cache_reuse(work)),
                 (1 in figures, "trainer", lambda: [
                     trainer_overhead(["precision=fp32", f"train.batch_size={b}"], work / f"fig1-b{b}",
                                      warmup=p["warmup"], steps=p["steps"], reps=p["reps"]) for b in p["batch_sizes"]]),
                 (4 in figures, "tracking", lambda: tracking_overhead(p["tracking_steps"], 4, work)),
                 (bool(figures & {3, 5}), "sweeps", lambda: sweeps(p, work, figures))]
        for wanted, key, run in steps:
            if wanted:
                print(f"{key} ...", flush=True)
                t = time.perf_counter()
                results[key] = run()
                results["seconds"][key] = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"]["total"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = load_average()
    publish("cpu-bench", "CPU figures (`make bench`)", results, render(results), out=args.out,
            markdown=args.markdown or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
