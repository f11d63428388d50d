"""The `cpu-bench` block of BENCHMARKS.md from cpu_bench.py's results: a summary table with targets, then details."""

from __future__ import annotations

from benchmarks.report import fmt, machine_lines

TRAINER_TARGET, LAUNCH_TARGET_S, TRACKING_TARGET = 1.10, 1.0, 0.02


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def summary_rows(r: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for b in r.get("trainer", {}).get("batches", []):
        loop, core = b["loop"], b["core"]
        rows.append(("1", f"trainer overhead, batch {b['batch_size']}, {b['resolution']} px",
                     f"{loop['ratio']:.3f}x full loop step, {core['ratio']:.3f}x core step",
                     f"<= {TRAINER_TARGET:.2f}x", _verdict(loop["ratio"] <= TRAINER_TARGET)))
    if "cache" in r:
        c = r["cache"]
        shared, separate, n = c["shared"], c["separate"], c["dataset_images"]
        ok = shared["vae"] == n and shared["text_encoder"] == n and shared["text_encoder_2"] == n
        rows.append(("2", f"cache reuse, {c['variants']} variants, {n} images",
                     f"VAE {shared['vae']} vs {separate['vae']} encodes, text {shared['text_encoder']} vs "
                     f"{separate['text_encoder']}; {shared['seconds']:.1f} s vs {separate['seconds']:.1f} s",
                     f"= dataset size ({n})", _verdict(ok)))
        if c.get("sdxl_vae_tflop_saved_1024"):
            rows.append(("2", "the same saving on SDXL at 1024 px", f"{c['sdxl_vae_tflop_saved_1024']:.0f} TFLOP of "
                         f"VAE encoding ({separate['vae'] - shared['vae']} x 4.88 TFLOP) not spent", "-", "-"))
    sweeps = r.get("sweeps", {})
    if "forkserver" in sweeps:
        fork, spawn = sweeps["forkserver"]["phases"], sweeps["spawn"]["phases"]
        extended = sweeps.get("extended", {}).get("phases", {})
        launcher = sweeps["launcher_only"]["start_s"]
        rows.append(("3", "queue: slot free -> job function entered (launcher)", f"{launcher:.3f} s",
                     f"< {LAUNCH_TARGET_S:.0f} s", _verdict(launcher < LAUNCH_TARGET_S)))
        first = fork["slot_to_first_step"]
        rows.append(("3", "queue: slot free -> first training step",
                     f"{fmt(first)} s fork server (default preload), {fmt(extended.get('slot_to_first_step'))} s "
                     f"with the MLflow store preloaded, {fmt(spawn['slot_to_first_step'])} s fresh process",
                     f"< {LAUNCH_TARGET_S:.0f} s", _verdict(first is not None and first < LAUNCH_TARGET_S)))
    if "tracking" in r:
        t = r["tracking"]
        rows.append(("4", f"tracking, batch {t['batch_size']}, flush every {t['flush_every']} steps",
                     f"{t['mlflow_per_100_steps_s']:.3f} s per 100 steps = {100 * t['share']:.2f} % of loop time",
                     f"< {100 * TRACKING_TARGET:.0f} %", _verdict(t["share"] < TRACKING_TARGET)))
    for m in sweeps.get("makespan", []):
        rows.append(("5", f"makespan, {m['jobs']} jobs on {m['slots']} slot(s)",
                     f"{m['makespan_s']:.1f} s = {m['ratio']:.2f}x ideal ({m['ideal_s']:.1f} s); "
                     f"{m['ratio_own']:.2f}x with this sweep's own job time", "ideal = ceil(N/K) x job", "-"))
    return rows


def _trainer_details(r: dict) -> list[str]:
    lines = ["", "Figure 1, per-step seconds (median of repetitions; ratio = median of per-repetition ratios, "
             "range in brackets):", "",
             "| batch | measure | repetitions x steps | lora-sweep s/step | bare loop s/step | ratio | "
             "ratio of fastest |",
             "|---|---|---|---|---|---|---|"]
    for b in r["trainer"]["batches"]:
        for name in ("core", "loop"):
            m = b[name]
            lines.append(f"| {b['batch_size']} | {name} | {m['reps']} x {b['steps']} | {m['lora_sweep_step_s']:.4f} | "
                         f"{m['bare_step_s']:.4f} | {m['ratio']:.3f} [{m['ratio_min']:.3f}-{m['ratio_max']:.3f}] | "
                         f"{fmt(m.get('ratio_of_fastest'), '.3f')} |")
    return lines


def _sweep_details(s: dict) -> list[str]:
    lines = []
    if "forkserver" in s:
        f, p, e = s["forkserver"]["phases"], s["spawn"]["phases"], s.get("extended", {}).get("phases", {})
        extended_jobs = s.get("extended", {}).get("jobs", 0) + 1
        lines += ["", f"Figure 3, median seconds per job phase. Fork server with conf/'s preload "
                  f"({', '.join(s['preload'])}): jobs 2..{s['forkserver']['jobs'] + 1} of the K=1 sweep; the same "
                  f"plus {', '.join(s.get('extra_preload', []))}: jobs 2..{extended_jobs} of a K=1 sweep; fresh "
                  f"process: {s['spawn']['jobs']} jobs with start_method=spawn.", "",
                  "| phase | fork server | fork server + MLflow store | fresh process |", "|---|---|---|---|"]
        names = {"launch": "slot free -> process running", "to_run": "-> MLflow run created (Hydra job, "
                 "imports, store opened)", "to_data": "-> data ready (model loaded, cached latents read)",
                 "to_first_step": "-> first step done (LoRA, optimizer, step 1)",
                 "slot_to_first_step": "**slot free -> first step**", "tail": "last step -> slot free (save, exit)"}
        lines += [f"| {label} | {fmt(f[k], '.3f')} | {fmt(e.get(k), '.3f')} | {fmt(p[k], '.3f')} |"
                  for k, label in names.items()]
        lo = s["launcher_only"]
        lines += ["", f"Launcher alone (benchmarks/queue_overhead.py, fork server, same preload): slot free -> job "
                  f"function {lo['start_s']:.3f} s, job return -> slot free {lo['end_s']:.3f} s; fork server "
                  f"ready in {fmt(lo['server_ready_s'])} s, paid once per sweep."]
    if "makespan" in s:
        lines += ["", "Figure 5 (one core and one torch thread per fake slot):", "",
                  "| slots | jobs | makespan s | ideal s | ratio | job s in this sweep | ratio (own job s) | "
                  "idle gap median / max s | fork server start s |", "|---|---|---|---|---|---|---|---|---|"]
        for m in s["makespan"]:
            lines.append(f"| {m['slots']} | {m['jobs']} | {m['makespan_s']:.1f} | {m['ideal_s']:.1f} | "
                         f"{m['ratio']:.2f} | {fmt(m['job_s'], '.2f')} | {m['ratio_own']:.2f} | "
                         f"{fmt(m['idle_gap_median_s'], '.3f')} / {fmt(m['idle_gap_max_s'], '.3f')} | "
                         f"{fmt(m['preload_s'], '.1f')} |")
    if s.get("cache_misses_per_job"):
        lines += ["", f"Cache across processes (K=1 sweep started without latents): cache misses per job "
                  f"{s['cache_misses_per_job']}."]
    return lines


def render(r: dict) -> str:
    lines = ["### CPU figures (`make bench`)", ""]
    if r.get("quick"):
        lines += ["**Quick run (`--quick`): sizes too small for the figures to mean anything.**", ""]
    lines += machine_lines(r["machine"])
    lines += [f"- Torch threads: {r['machine'].get('torch_threads')} in the benchmark process and in each sweep job; "
              f"total time {r['seconds'].get('total', 0):.0f} s.", "",
              "| # | figure | measured | target | status |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in summary_rows(r)]
    if "trainer" in r:
        lines += _trainer_details(r)
    if "tracking" in r:
        t = r["tracking"]
        lines += ["", f"Figure 4: a real `train()` of {t['steps']} steps ({t['step_s']:.3f} s/step) logging to a fresh "
                  f"sqlite store; {t['mlflow_in_loop_s']:.3f} s of MLflow calls inside the loop, "
                  f"{t['mlflow_outside_loop_s']:.2f} s outside it (opening the store, run, params, LoRA artifacts, "
                  "end), paid once per job."]
        for b in r.get("trainer", {}).get("batches", []):
            if b["batch_size"] != t["batch_size"]:
                share = t["mlflow_per_100_steps_s"] / (100 * b["loop"]["lora_sweep_step_s"])
                lines.append(f"At batch {b['batch_size']} ({b['loop']['lora_sweep_step_s']:.3f} s/step, figure 1) the "
                             f"same MLflow time would be {100 * share:.2f} % of the loop.")
    if "sweeps" in r:
        lines += _sweep_details(r["sweeps"])
    return "\n".join(lines) + "\n"
