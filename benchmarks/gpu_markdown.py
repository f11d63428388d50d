"""The `gpu-bench` block of BENCHMARKS.md from gpu_bench.py's results."""

from __future__ import annotations

from benchmarks.report import fmt, machine_lines

PRECISION_LABELS = {"bf16": "bf16", "fp16": "fp16", "fp8_bf16": "fp8 base, bf16 compute",
                    "fp8": "fp8 base, fp16 compute", "fp32": "fp32"}


def _flop(value: float) -> str:
    return f"{value / 1e12:.3f} TFLOP" if value >= 1e11 else f"{value / 1e9:.3f} GFLOP"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _gain(rows: list[dict], row: dict) -> str:
    """Speed of an option row relative to its baseline row (same impl, precision, batch, checkpointing)."""
    if row["option"] == "baseline" and row["impl"] == "lora-sweep":
        return ""
    base = next((r for r in rows if r["impl"] == "lora-sweep" and r["option"] == "baseline"
                 and r["precision"] == row["precision"] and r["batch"] == row["batch"]
                 and r["gradient_checkpointing"] == row["gradient_checkpointing"] and r.get("images_per_s")), None)
    if base is None or not row.get("images_per_s"):
        return ""
    return f"{row['images_per_s'] / base['images_per_s']:.2f}x"


def render(r: dict) -> str:
    flops = r["flops_per_image"]
    what = "lora-sweep's tiny UNet at 64 px (`--toy`: a logic check, not a figure)" if r["toy"] else \
        "SDXL base UNet (2.567 B params, random weights), 1024 x 1024, LoRA rank 16 on kohya's targets, AdamW"
    lines = ["### GPU figures (`make bench-gpu`)", "", f"- Model: {what}.", *machine_lines(r["machine"]),
             f"- FLOPs per image (torch.utils.flop_counter): forward {_flop(flops['forward'])}, training step "
             f"{_flop(flops['train'])}, with gradient checkpointing {_flop(flops['train_gc'])}; "
             f"peak used for MFU: {fmt(r['peak_tflops'], '.1f')} TFLOP/s dense bf16.",
             f"- Timing: {r['params']['warmup']} warm-up steps, then the mean of {r['params']['steps']} steps, each "
             "reading its loss on the host; memory = torch.cuda.max_memory_allocated over those steps.", "",
             "| impl | precision | batch | ckpt | option | img/s | vs lora-sweep baseline | s/step | peak GiB | MFU | "
             "HFU | loss diff first / max | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        mem = row.get("peak_mem_bytes")
        note = row.get("error") or ("" if row.get("losses_finite", True) else "non-finite loss")
        if row.get("first_step_s") and row["option"] == "compile":
            note = note or f"first step {row['first_step_s']:.0f} s (compilation)"
        lines.append(
            f"| {row['impl']} | {PRECISION_LABELS.get(row['precision'], row['precision'])} | {row['batch']} | "
            f"{'on' if row['gradient_checkpointing'] else 'off'} | {row['option']} | {fmt(row.get('images_per_s'))} | "
            f"{_gain(r['rows'], row)} | {fmt(row.get('step_s'), '.4f')} | "
            f"{fmt(mem / 2**30 if mem else None, '.1f')} | {_pct(row.get('mfu'))} | "
            f"{_pct(row.get('hfu')) if row['gradient_checkpointing'] else ''} | "
            f"{fmt(row.get('first_loss_rel_diff'), '.0e')} / {fmt(row.get('loss_rel_diff_max'), '.0e')} | {note} |")
    if r.get("setup"):
        from benchmarks.gpu_setup import markdown as setup_markdown

        lines += setup_markdown(r["setup"])
    lines += ["", f"Total {r['seconds']:.0f} s. MFU counts model FLOPs only; HFU adds the forward that gradient "
              "checkpointing recomputes. 'loss diff': every configuration starts from the same LoRA values and seed; "
              "the relative difference of its first loss (the forward) and the largest over all its steps (the "
              "updates too) from lora-sweep's baseline at the same precision, batch and checkpointing. An option "
              "that changed the result would show more than the precision's rounding."]
    return "\n".join(lines) + "\n"
