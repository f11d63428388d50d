"""The benchmarks' measurement logic at the smallest sizes (no timing assertions: timings live in BENCHMARKS.md).

What must hold for the figures to mean what they say: the bare loop does the same work as lora-sweep's step (same
loss, same update), the encode counts are what the cache promises, the sweep arithmetic is right, the GPU
benchmark's code paths (FLOP count, lora-sweep vs bare, options) run on the tiny UNet.
"""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks import cpu_figures, sweep_figures
from benchmarks.cache_figure import article_variants, cache_reuse
from benchmarks.common import compose
from benchmarks.cpu_markdown import summary_rows
from benchmarks.report import replace_block


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = compose("train.batch_size=2", *cpu_figures.FIG1_OVERRIDES)
    return cpu_figures.build_pair(cfg, tmp_path_factory.mktemp("pair"))


def test_bare_loop_computes_the_same_loss_and_update_as_lora_sweeps_step(pair):
    s, bare = pair
    indices = cpu_figures.index_batches(s, 2)[0]
    torch.manual_seed(7)
    ours = cpu_figures.core_step(s, indices, random.Random(0))
    torch.manual_seed(7)
    theirs = float(bare.step(cpu_figures.session_batch(s, indices)))
    assert ours == pytest.approx(theirs, rel=1e-5)
    ours_lora = {n: p for n, p in s.unet.named_parameters() if "lora_" in n}
    changed = 0
    for name, param in bare.unet.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, ours_lora[name], rtol=1e-5, atol=1e-7)
            changed += int(name.endswith("lora_B.default.weight") and bool(param.abs().sum() > 0))
    assert changed > 0  # lora_B starts at zero: equal after the update means both optimizers stepped alike


def test_trainer_overhead_runs_both_measures(tmp_path):
    result = cpu_figures.trainer_overhead(1, steps=1, reps=2, warmup=1, workdir=tmp_path)
    for measure in ("core", "loop"):
        m = result[measure]
        assert m["reps"] == 2 and m["lora_sweep_step_s"] > 0 and m["bare_step_s"] > 0
        assert m["ratio_min"] <= m["ratio"] <= m["ratio_max"]


def test_loop_timer_interleaves_bare_and_lora_sweep_repetitions():
    calls = []
    timer = cpu_figures._LoopTimer(lambda k: calls.append(k), warmup=2, steps=3, reps=2)
    for step in range(0, 2 + 2 * 3 + 1):
        timer.progress(step, 8, 0.0, "")
    assert len(timer.theirs) == 2 and len(timer.ours) == 2
    assert len(calls) == 2 + 2 * 3  # bare warm-up, then one repetition before each lora-sweep repetition


def test_shared_cache_encodes_each_image_and_caption_once(tmp_path):
    variants = article_variants()
    assert len(variants) == 12
    result = cache_reuse(variants[:2], tmp_path)
    n = result["dataset_images"]
    assert n == 8
    assert {k: result["shared"][k] for k in ("vae", "text_encoder", "text_encoder_2")} == dict.fromkeys(
        ("vae", "text_encoder", "text_encoder_2"), n)
    assert result["separate"]["vae"] == 2 * n and result["separate"]["text_encoder_2"] == 2 * n


def test_tracking_overhead_sees_mlflow_time_inside_the_loop(tmp_path):
    result = cpu_figures.tracking_overhead(4, 1, tmp_path, flush_every=2)
    assert result["flush_every"] == 2 and result["mlflow_in_loop_s"] > 0
    assert 0 < result["share"] < 1 and result["mlflow_outside_loop_s"] > 0


def _job(idx, slot, free, start, end, **extra):
    return {"idx": idx, "state": "FINISHED", "slot": slot, "slot_free_at": free, "started_at": start,
            "ended_at": end, **extra}


def test_sweep_arithmetic_on_hand_made_records():
    jobs = [_job(0, 0, 100.0, 100.1, 110.0), _job(1, 1, 100.0, 100.2, 111.0),
            _job(2, 0, 110.0, 110.3, 120.0), _job(3, 1, 111.0, 111.1, 121.5)]
    assert sweep_figures.makespan(jobs) == pytest.approx(21.5)
    assert sorted(sweep_figures.slot_idle_gaps(jobs)) == pytest.approx([0.1, 0.3])
    assert sweep_figures.ideal_makespan(12, 5, 2.0) == 6.0
    [row] = sweep_figures.makespan_figure([{"slots": 2, "jobs": jobs, "preload_s": 1.0, "wall_s": 30.0}], job_s=10.0)
    assert row["ideal_s"] == 20.0 and row["ratio"] == pytest.approx(21.5 / 20.0) and row["failed"] == 0
    phases = sweep_figures.job_phases(_job(0, 0, 10.0, 10.5, 20.0, run_start=12.0, data_ready=13.0,
                                           first_step=14.0, last_step=19.0))
    assert phases["launch"] == 0.5 and phases["to_run"] == 1.5 and phases["slot_to_first_step"] == 4.0
    assert phases["tail"] == 1.0 and phases["occupancy"] == 10.0
    assert sweep_figures.job_phases({"slot_free_at": 1.0})["launch"] is None


def test_summary_verdicts_follow_the_targets():
    core = {"ratio": 1.0}
    results = {"trainer": {"batches": [
        {"batch_size": 1, "resolution": 64, "loop": {"ratio": 1.05}, "core": core},
        {"batch_size": 4, "resolution": 64, "loop": {"ratio": 1.20}, "core": core}]},
        "tracking": {"batch_size": 4, "flush_every": 25, "mlflow_per_100_steps_s": 0.1, "share": 0.03}}
    verdicts = [row[-1] for row in summary_rows(results)]
    assert verdicts == ["met", "**missed**", "**missed**"]


def test_markdown_block_is_replaced_in_place_or_appended():
    text = "intro\n<!-- x:begin -->\nold\n<!-- x:end -->\noutro\n"
    assert replace_block(text, "x", "new") == "intro\n<!-- x:begin -->\nnew\n<!-- x:end -->\noutro\n"
    assert replace_block("intro\n", "y", "body").endswith("<!-- y:begin -->\nbody\n<!-- y:end -->\n")


def test_gpu_model_counts_flops_and_builds_deterministically():
    from benchmarks.gpu_model import build_unet, count_flops, peak_tflops, unet_config

    config = unet_config(toy=True)
    plain = count_flops(config, rank=4, gradient_checkpointing=False)
    checkpointed = count_flops(config, rank=4, gradient_checkpointing=True)
    assert 0 < plain["forward"] < plain["train"] < checkpointed["train"]
    a, b = build_unet(config, "cpu", seed=3), build_unet(config, "cpu", seed=3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.isfinite(x).all(), name
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA L40S") == 362.0 and peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("Some New GPU") is None


def test_gpu_bench_toy_matches_bare_loop_and_options_keep_the_result(tmp_path):
    import json

    from benchmarks import gpu_bench

    out = tmp_path / "gpu.json"
    gpu_bench.main(["--toy", "--device", "cpu", "--precisions", "fp32", "--batches", "2", "--checkpointing", "off",
                    "--options", "loop_checks,fused_adamw", "--options-precision", "fp32", "--bare", "fp32",
                    "--steps", "1", "--warmup", "1", "--rank", "4", "--out", str(out), "--markdown", "",
                    "--setup", "fp8_te", "--setup-steps", "1"])
    result = json.loads(out.read_text())
    [setup] = result["setup"]  # lora-sweep's own set-up then training; memory figures need CUDA
    assert setup["case"] == "fp8_te" and setup["error"] is None and setup["setup_s"] > 0
    assert setup.get("setup_peak_bytes") is None and setup["kohya_gb"] == 6.0
    from benchmarks.gpu_markdown import render

    assert "| fp8_te (precision=fp8, network.train_text_encoder=true) |" in render(result)
    rows = {(r["impl"], r["option"]): r for r in result["rows"]}
    base, fused, bare = rows["lora-sweep", "baseline"], rows["lora-sweep", "fused_adamw"], rows["bare", "baseline"]
    assert base["error"] is None and base["images_per_s"] > 0 and base["losses_finite"]
    assert fused["first_loss_rel_diff"] == 0.0  # the first loss precedes the first update: same LoRA, same seed
    assert len(fused["losses"]) == 2 and fused["loss_rel_diff_max"] < 1e-4  # and the fused update is AdamW's
    assert bare["loss_rel_diff_max"] < 1e-3  # the bare loop on the same UNet, LoRA and seed: the same losses
    assert rows["lora-sweep", "loop_checks"]["loss_rel_diff_max"] == 0.0  # train()'s checks change nothing


@pytest.mark.slow
def test_a_real_two_slot_sweep_gives_consistent_records(tmp_path):
    """Two tiny jobs on two fake CPU slots through `python sweep.py -m` and the gpu_queue launcher (~1 min)."""
    import os
    from pathlib import Path

    cache = Path(os.environ["LORA_SWEEP_CACHE_DIR"])
    sweep = sweep_figures.run_sweep(tmp_path, "two", jobs=2, slots=2, start_method="forkserver", max_steps=2,
                                    cache_dir=cache)
    jobs = sweep["jobs"]
    assert [j["state"] for j in jobs] == ["FINISHED", "FINISHED"] and {j["slot"] for j in jobs} == {0, 1}
    for job in jobs:
        p = sweep_figures.job_phases(job)
        assert all(p[k] is not None and p[k] >= 0 for k in ("launch", "to_run", "to_data", "slot_to_first_step"))
        assert job["slot_free_at"] <= job["started_at"] <= job["run_start"] <= job["first_step"] <= job["ended_at"]
    [row] = sweep_figures.makespan_figure([sweep], job_s=1.0)
    assert row["makespan_s"] > 0 and row["failed"] == 0


def test_sdxl_step_bare_loop_shares_lora_sweeps_weights_and_computes_the_same_step(pair):
    from benchmarks.sdxl_step import shared_bare_loop

    s, _ = pair
    bare = shared_bare_loop(s, rank=s.cfg.network.rank, alpha=s.cfg.network.alpha, lr=float(s.cfg.train.lr),
                            max_grad_norm=s.cfg.train.max_grad_norm)
    ours = {n.replace(".base_layer.", "."): p for n, p in s.unet.named_parameters() if "lora_" not in n}
    theirs = {n.replace(".base_layer.", "."): p for n, p in bare.unet.named_parameters() if "lora_" not in n}
    assert ours.keys() == theirs.keys()
    assert all(ours[n].data_ptr() == theirs[n].data_ptr() for n in ours)  # one copy of the frozen weights
    indices = cpu_figures.index_batches(s, 2)[0]
    batch = cpu_figures.session_batch(s, indices)
    torch.manual_seed(7)
    theirs_loss = float(bare.step(batch))
    torch.manual_seed(7)
    ours_loss = cpu_figures.core_step(s, indices, random.Random(0))
    assert ours_loss == pytest.approx(theirs_loss, rel=1e-5)


def test_sdxl_step_times_both_loops_on_the_given_model(tmp_path):
    import json

    from benchmarks import sdxl_step
    from lora_sweep.model.loading import tiny_model_dir

    record = tmp_path / "step.json"
    assert sdxl_step.main(["--model", str(tiny_model_dir()), "--record", str(record), "--workdir", str(tmp_path),
                           "--resolution", "64", "--warmup", "1", "--steps", "1", "--reps", "2"]) == 0
    result = json.loads(record.read_text())
    assert result["loop"]["reps"] == 2 and result["lora_tensors"] > 0
    assert len(result["ours_s"]) == len(result["bare_s"]) == 2


def test_sdxl_markdown_reports_before_after_and_verdicts():
    from benchmarks.sdxl_markdown import render, summary_rows

    machine = {"date_utc": "d", "host": "h", "cpu": "c", "cores": 2, "memory_gib": 24, "python": "3", "versions": {},
               "git_commit": "abc", "command": "x"}
    def run(rss_bf16, rss_te, load, ratio, unet=722, te=264):
        case = lambda rss: {"peak_rss_gib": rss, "load_s": [load], "step_s": [3.0, 2.0], "marks": {},  # noqa: E731
                            "modules": {"unet": unet, "te": te, "not_sgm": []}}
        return {"machine": machine, "root": "/r", "model": "/m",
                "cases": {"bf16": case(rss_bf16), "fp8_te": case(rss_te)},
                "step": {"loop": {"ratio": ratio, "ratio_min": ratio, "ratio_max": ratio, "lora_sweep_step_s": 1.0,
                                  "bare_step_s": 1.0, "ratio_of_fastest": ratio}, "reps": 3, "steps": 3, "warmup": 2},
                "diffusers": {"diffusers": {"unet": unet, "te1": 72, "te2": 192, "warnings": []}}}
    before, after = run(15.5, 18.0, 20.0, 1.2), run(8.0, 12.0, 10.0, 1.05)
    verdicts = [row[-1] for row in summary_rows(after, before)]
    assert verdicts == ["met", "**missed**", "met", "-", "-", "met", "met", "met"]
    text = render(after, before)
    assert "15.50 GiB" in text and "50% of before" in text and "| 722 / 264 |" in text


def test_sdxl_checks_count_kohya_modules_and_sgm_names(pair, tmp_path):
    from benchmarks.sdxl_checks import kohya_modules
    from lora_sweep.model.network import save_kohya

    s, _ = pair
    path = save_kohya(tmp_path / "lora.safetensors", s.kohya_lora(), {})
    counts = kohya_modules(path)
    wrapped = sum(1 for _, m in s.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)
    assert counts["unet"] == wrapped > 0 and counts["te"] == 0  # UNet-only LoRA
    assert counts["not_sgm"] == [] and counts["up_and_alpha_for_each"]
    assert counts["keys"] == 3 * wrapped  # lora_down, lora_up, alpha per module
