"""The `sdxl-bench` block of BENCHMARKS.md from sdxl_bench.py's results (and, optionally, a run on the code before).

Targets are issue 16's: peak RSS of one job at most 60 % of the figures measured before the fix (15.3 GiB bf16
UNet-only -> 9.2 GiB; 18.4 GiB fp8 + text encoders -> 11 GiB), model load at most 60 % of before, lora-sweep's step
at most 1.10x the bare loop doing the same work. "today" is the issue's own measurement (same machine kind).
"""

from __future__ import annotations

from benchmarks.common import median
from benchmarks.report import fmt, machine_lines

TODAY = {  # issue 16's table, measured before the fix on this machine kind
    "rss_bf16": 15.3, "rss_fp8_te": 18.4, "load_s": 37.0, "step_ratio": 1.16,
}
TARGETS = {"rss_bf16": 9.2, "rss_fp8_te": 11.0, "load_share": 0.60, "step_ratio": 1.10}
LABELS = {"bf16": "`precision=bf16`, UNet LoRA", "fp8_te": "`precision=fp8`, UNet + text-encoder LoRA"}


def _case(r: dict | None, case: str) -> dict:
    return ((r or {}).get("cases") or {}).get(case) or {}


def _load(r: dict | None, case: str = "bf16") -> float | None:
    """The load-only probes' median when there are some, else the job's own load."""
    if case == "bf16" and ((r or {}).get("load") or {}).get("median_s"):
        return r["load"]["median_s"]
    loads = _case(r, case).get("load_s")
    return loads[0] if loads else None


def _job_load(r: dict | None, case: str) -> float | None:
    loads = _case(r, case).get("load_s")
    return loads[0] if loads else None


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def _gib(value) -> str:
    return fmt(value, ".2f", " GiB")


def summary_rows(r: dict, before: dict | None) -> list[list[str]]:
    rows = []
    for case, key in (("bf16", "rss_bf16"), ("fp8_te", "rss_fp8_te")):
        after = _case(r, case).get("peak_rss_gib")
        rows.append([f"peak RSS, {LABELS[case]}", f"{TODAY[key]} GiB", _gib(_case(before, case).get("peak_rss_gib")),
                     _gib(after), f"<= {TARGETS[key]} GiB", _verdict(None if after is None else after <= TARGETS[key])])
    load_after, load_before = _load(r), _load(before)
    share = load_after / load_before if load_after and load_before else None
    rows.append(["model load (diffusers folder, fp16 on disk; bf16 job's load, median of fresh processes)",
                 f"~{TODAY['load_s']:.0f} s",
                 fmt(load_before, ".1f", " s"), fmt(load_after, ".1f", " s") + (f" ({share:.0%} of before)"
                                                                                  if share else ""),
                 "<= 60 % of before", _verdict(None if share is None else share <= TARGETS["load_share"])])
    for case in ("bf16", "fp8_te"):
        rows.append([f"s/step (steps 1, 2), {LABELS[case]}", "-", _steps(_case(before, case)),
                     _steps(_case(r, case)), "reported", "-"])
    step_after, step_before = (r.get("step") or {}).get("loop"), ((before or {}).get("step") or {}).get("loop")
    ratio = (step_after or {}).get("ratio")
    rows.append(["lora-sweep step / bare diffusers + peft loop (fp32, 128 px, batch 1, clipping in both)",
                 f"{TODAY['step_ratio']}x (bare loop without clipping)", _ratio(step_before), _ratio(step_after),
                 f"<= {TARGETS['step_ratio']}x", _verdict(None if ratio is None else ratio <= TARGETS["step_ratio"])])
    counts = [_modules(_case(r, c).get("modules")) for c in ("bf16", "fp8_te")]
    ok = _case(r, "fp8_te").get("modules") or {}
    rows.append(["LoRA modules in the kohya file (UNet / text encoders), SGM names", "722 / 264",
                 " ; ".join(_modules(_case(before, c).get("modules")) for c in ("bf16", "fp8_te")),
                 " ; ".join(counts), "722 / 264",
                 _verdict(None if not ok else ok.get("unet") == 722 and ok.get("te") == 264 and not ok.get("not_sgm"))])
    dd = ((r.get("diffusers") or {}).get("diffusers")) or {}
    if dd:
        rows.append(["diffusers `load_lora_weights` of the fp8_te kohya file", "every key mapped",
                     _diffusers(((before or {}).get("diffusers") or {}).get("diffusers")), _diffusers(dd),
                     "722 / 264, no key warning",
                     _verdict(dd["unet"] == 722 and dd["te1"] + dd["te2"] == 264 and not dd["warnings"])])
    return rows


def _diffusers(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['unet']} / {d['te1'] + d['te2']} modules, {len(d['warnings'])} key warnings"


def _steps(case: dict) -> str:
    steps = case.get("step_s")
    return ", ".join(f"{s:.1f}" for s in steps) + " s" if steps else "-"


def _ratio(loop: dict | None) -> str:
    if not loop or loop.get("ratio") is None:
        return "-"
    return (f"{loop['ratio']:.3f}x [{loop['ratio_min']:.2f}-{loop['ratio_max']:.2f}] "
            f"({loop['lora_sweep_step_s']:.2f} vs {loop['bare_step_s']:.2f} s)")


def _modules(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{m['unet']} / {m['te']}" + ("" if not m.get("not_sgm") else " (non-SGM names!)")


def _phase_lines(r: dict, title: str) -> list[str]:
    lines = []
    for case in ("bf16", "fp8_te"):
        c = _case(r, case)
        marks = c.get("marks") or {}
        if not marks:
            continue
        after_load, after_setup = marks.get("after_load", {}), marks.get("after_setup", {})
        lines.append(f"- {title}, {LABELS[case]}: load {fmt(_job_load(r, case), '.1f')} s, set-up (load, cache, LoRA, "
                     f"casts) {fmt(c.get('setup_s'), '.1f')} s, job {fmt(c.get('wall_s'), '.0f')} s; peak RSS after "
                     f"load {_gib(after_load.get('VmHWM'))} (resident then {_gib(after_load.get('VmRSS'))}), after "
                     f"set-up {_gib(after_setup.get('VmHWM'))} (resident {_gib(after_setup.get('VmRSS'))}), at the "
                     f"end {_gib(c.get('peak_rss_gib'))}." + (f" Error: {c['error']}" if c.get("error") else ""))
    return lines


def render(r: dict, before: dict | None = None) -> str:
    lines = ["### Real SDXL-base architecture (`make bench-sdxl`)", "", *machine_lines(r["machine"]),
             f"- Model: SDXL base built from `lora_sweep/assets/sdxl_base` with random weights, fp16 diffusers folder "
             f"(`{r['model']}`); jobs: `sweep.py model=sdxl data.resolution=128 train.max_steps=2 "
             "train.batch_size=1` on the bundled photos, one at a time, the first on an empty latent/text cache."]
    if before:
        lines.append(f"- Before: the same script on `{before['root']}` (commit {before.get('root_commit', '?')}), "
                     f"{before['machine']['date_utc']}.")
    lines += ["", "| measured (one job, CPU) | today (issue 16) | before (this machine) | after | target | status |",
              "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(r, before)]
    lines += ["", *(_phase_lines(before, "before") if before else []), *_phase_lines(r, "after")]
    for label, run in (("before", before), ("after", r)):
        probes = (run or {}).get("load") or {}
        if probes.get("load_s"):
            lines.append(f"- {label}: model load alone (bf16 job, fresh processes, page cache warm): "
                         + ", ".join(f"{t:.1f}" for t in probes["load_s"]) + " s.")
    step = r.get("step") or {}
    if step.get("loop"):
        lines.append(f"- Step figure: {step['reps']} repetitions x {step['steps']} steps after {step['warmup']} "
                     f"warm-up steps, {step.get('lora_tensors')} LoRA tensors, torch threads {step.get('threads')}; "
                     f"median of per-repetition ratios [range]; ratio of each side's fastest repetition "
                     f"{step['loop']['ratio_of_fastest']:.3f}x.")
    s_per_step = [median(_case(r, c).get("step_s") or []) for c in ("bf16", "fp8_te")]
    if any(s_per_step):
        lines.append("- Steps of the two-step jobs include the first step's one-off costs (optimizer state, "
                     "allocations); on a CPU without fp16 arithmetic `precision=fp8` (fp16 compute) is far slower "
                     "than bf16: these are memory and correctness checks, not speed figures.")
    return "\n".join(lines) + "\n"
