"""The benchmarks' measurement logic at the smallest sizes (no timing assertions: timings live in BENCHMARKS.md).

What must hold for the figures to mean what they say: the bare loop does the same work as lora-sweep's step (same
loss, same update), the encode counts are what the cache promises, the sweep arithmetic is right, the GPU and SDXL
suites' code paths run on the tiny model, and nothing the writer writes names a folder of this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import new_store

from benchmarks import cpu, measure, report, sdxl
from benchmarks.bare_loop import load_lora_values, lora_values, shared_bare_loop


@pytest.fixture(scope="module")
def one_step(tmp_path_factory) -> dict:
    """A real one-step `train()` (fp32, 64 px, batch 2) and what its micro-batch started from: the session, the
    example indices, torch's RNG state, the LoRA values, and the loss it computed."""
    from lora_sweep.training import train as train_module

    seen: dict = {}
    real = train_module.micro_batch_loss

    def first(s, batch, flip_rng, step, **position):
        if "s" not in seen:
            seen.update(s=s, batch=list(batch), rng=torch.get_rng_state(), lora=lora_values(s.unet))
        terms = real(s, batch, flip_rng, step, **position)
        seen.setdefault("loss", float(terms.loss.detach()))
        return terms

    cfg = measure.compose(*measure.STEP_OVERRIDES, "precision=fp32", "train.batch_size=2", "train.max_steps=1")
    seen["output_dir"] = tmp_path_factory.mktemp("one-step")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "micro_batch_loss", first)
        train_module.train(cfg, output_dir=seen["output_dir"], sink=measure.NullSink())
    return seen


def test_bare_loop_computes_the_loss_and_update_of_lora_sweeps_step(one_step):
    s = one_step["s"]
    bare = shared_bare_loop(s)
    frozen = [{n.replace(".base_layer.", "."): p.data_ptr() for n, p in unet.named_parameters() if "lora_" not in n}
              for unet in (s.unet, bare.unet)]
    assert frozen[0] == frozen[1]  # one copy of the frozen weights
    load_lora_values(bare.unet, one_step["lora"])
    torch.set_rng_state(one_step["rng"])
    loss = float(bare.step(measure.session_batch(s, one_step["batch"])))
    assert loss == pytest.approx(one_step["loss"], rel=1e-6)
    ours, theirs = lora_values(s.unet), lora_values(bare.unet)
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name], value, rtol=1e-5, atol=1e-7)
    # lora_B starts at zero: equal after the update means both optimizers stepped alike
    assert any(bool(v.abs().sum() > 0) for n, v in ours.items() if n.endswith("lora_B.default.weight"))


def test_trainer_overhead_times_both_loops(tmp_path):
    result = measure.trainer_overhead(["precision=fp32", "train.batch_size=1"], tmp_path, warmup=1, steps=1, reps=2)
    assert result["reps"] == 2 and len(result["lora_sweep_s"]) == len(result["bare_s"]) == 2
    assert result["ratio_min"] <= result["ratio"] <= result["ratio_max"] and result["setup_s"] > 0
    assert result["lora_tensors"] > 0 and result["final_loss"] is not None


def test_loop_timer_runs_one_bare_repetition_before_each_of_lora_sweeps():
    calls = []
    timer = measure.LoopTimer(warmup=2, steps=3, reps=2)
    timer.bare = calls.append
    for step in range(0, 2 + 2 * 3 + 1):
        timer.progress(step, 8, 0.0, "")
    assert len(timer.theirs) == len(timer.ours) == 2
    assert calls == list(range(2 + 2 * 3))  # the bare warm-up, then a repetition before each of lora-sweep's


def test_shared_cache_encodes_each_image_and_caption_once(tmp_path):
    result = cpu.cache_reuse(tmp_path, ["v53", "v54"])
    n = result["dataset_images"]
    assert n == 8 and {k: result["shared"][k] for k in cpu.ENCODERS} == dict.fromkeys(cpu.ENCODERS, n)
    assert {k: result["separate"][k] for k in cpu.ENCODERS} == dict.fromkeys(cpu.ENCODERS, 2 * n)


def test_tracking_overhead_sees_mlflow_time_inside_the_loop(tmp_path):
    result = cpu.tracking_overhead(4, 1, tmp_path, flush_every=2)
    assert result["flush_every"] == 2 and 0 < result["share"] < 1 and result["mlflow_outside_loop_s"] > 0


def _job(idx, slot, free, start, end, **extra):
    return {"idx": idx, "state": "FINISHED", "slot": slot, "slot_free_at": free, "started_at": start,
            "ended_at": end, **extra}


def test_sweep_arithmetic_on_hand_made_records():
    jobs = [_job(0, 0, 100.0, 100.1, 110.0), _job(1, 1, 100.0, 100.2, 111.0),
            _job(2, 0, 110.0, 110.3, 120.0), _job(3, 1, 111.0, 111.1, 121.5)]
    row = cpu.makespan_row({"slots": 2, "jobs": jobs, "preload_s": 1.0}, job_s=10.0)
    assert row["makespan_s"] == pytest.approx(21.5) and row["ideal_s"] == 20.0 and row["failed"] == 0
    assert row["ratio"] == pytest.approx(21.5 / 20.0) and row["idle_gap_max_s"] == pytest.approx(0.3)
    phases = cpu.job_phases(_job(0, 0, 10.0, 10.5, 20.0, run_start=12.0, data_ready=13.0, first_step=14.0,
                                 last_step=19.0))
    assert phases["launch"] == 0.5 and phases["to_run"] == 1.5 and phases["slot_to_first_step"] == 4.0
    assert phases["slot_to_run"] == 2.0 and phases["tail"] == 1.0 and phases["occupancy"] == 10.0
    assert cpu.job_phases({"slot_free_at": 1.0})["launch"] is None


def test_cpu_verdicts_follow_the_targets():
    def trainer(batch, ratio):
        return {"batch_size": batch, "resolution": 64, "ratio": ratio, "ratio_min": ratio, "ratio_max": ratio,
                "lora_sweep_step_s": 1.0, "bare_step_s": 1.0}

    results = {"trainer": [trainer(1, 1.05), trainer(4, 1.2)],
               "tracking": {"batch_size": 4, "flush_every": 25, "mlflow_per_100_steps_s": 0.1, "share": 0.03},
               "sweeps": {"cache_misses_per_job": [16, 0, 0]}}
    assert [row[-1] for row in cpu.summary_rows(results)] == ["met", "**missed**", "met", "**missed**"]


def test_the_writer_replaces_its_block_and_names_no_folder_of_this_machine(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_SWEEP_CACHE_DIR", str(cache))
    results = {"machine": report.machine_info(), "model": str(cache / "models" / "m"),
               "out": str(report.ROOT / "benchmarks" / "results" / "x.json"), "run": str(tmp_path / "run-1"),
               "elsewhere": "/srv/data/run-1/lora.safetensors", "store": f"sqlite:///{tmp_path}/mlflow.db",
               "load": "1/5/15 min", "root": str(report.ROOT)}
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("intro\n<!-- t:begin -->\nold\n<!-- t:end -->\noutro\n")
    report.publish("t", "Title", results, [f"model in {cache}/models/m"], out=tmp_path / "r.json", markdown=markdown)
    text, written = markdown.read_text(), (tmp_path / "r.json").read_text()
    assert text.startswith("intro\n<!-- t:begin -->\n### Title\n") and text.endswith("<!-- t:end -->\noutro\n")
    assert "model in <cache>/models/m" in text
    for folder in (str(tmp_path), str(report.ROOT), "/srv/"):
        assert folder not in text and folder not in written
    data = json.loads(written)
    assert data["model"] == "<cache>/models/m" and data["out"] == "benchmarks/results/x.json"
    assert data["run"].startswith("<tmp>/") and data["run"].endswith("/run-1")
    assert data["elsewhere"] == ".../lora.safetensors" and data["load"] == "1/5/15 min" and data["root"] == "."
    assert report.replace_block("intro\n", "y", "body").endswith("<!-- y:begin -->\nbody\n<!-- y:end -->\n")


def test_gpu_suite_runs_its_rows_on_the_tiny_model(tmp_path):
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    gpu.main(["--toy", "--device", "cpu", "--precisions", "fp32,fp8", "--batches", "2", "--checkpointing", "off",
              "--no-te", "--no-switches", "--warmup", "1", "--steps", "1", "--reps", "1", "--rank", "4",
              "--out", str(out), "--markdown", ""])
    result = json.loads(out.read_text())
    flops = result["flops_per_image"]
    assert 0 < flops["forward"] < flops["train"] < flops["train_gc"]
    rows = {(r["precision"], r["extra"]): r for r in result["rows"]}
    assert all(r.get("error") is None and r["lora_sweep_step_s"] > 0 for r in rows.values())
    assert rows["fp32", ""]["ratio"] > 0 and rows["bf16", "fused"]["ratio"] > 0  # beside the bare loop
    assert "ratio" not in rows["fp8", ""]  # diffusers' examples have no fp8 base weights
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA L40S") == 362.0 and gpu.peak_tflops("Some New GPU") is None


def test_sdxl_checks_count_kohya_modules_and_diffusers_maps_every_key(one_step):
    from lora_sweep.model.loading import tiny_model_dir

    s = one_step["s"]
    lora_file = one_step["output_dir"] / f"{s.cfg.train.output_name}.safetensors"
    counts = sdxl.kohya_modules(lora_file)
    wrapped = sum(1 for _, m in s.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)
    assert counts["unet"] == wrapped > 0 and counts["te"] == 0 and counts["keys"] == 3 * wrapped
    assert counts["not_sgm"] == [] and counts["up_and_alpha_for_each"]
    assert sdxl.diffusers_check(tiny_model_dir(), lora_file) == {"unet": wrapped, "te": 0, "warnings": []}


def test_sdxl_job_probe_times_a_real_sweep_job(tmp_path):
    from lora_sweep.model.loading import tiny_model_dir

    record = tmp_path / "job.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": new_store(tmp_path / "mlflow.db")}
    subprocess.run([sys.executable, "-m", "benchmarks.sdxl", "job", str(record), *sdxl.JOB,
                    f"model.path={tiny_model_dir()}", "data.resolution=64", f"hydra.run.dir={tmp_path / 'out'}"],
                   cwd=measure.ROOT, env=env, check=True, capture_output=True)
    job = json.loads(record.read_text())
    assert job["exit_code"] == 0 and len(job["load_s"]) == 1 and job["setup_s"] > 0 and len(job["step_s"]) == 2
    assert job["peak_rss_gib"] >= job["marks"]["after_setup"]["VmHWM"] >= job["marks"]["after_load"]["VmHWM"] > 0
    assert sdxl.kohya_modules(Path(job["kohya_file"]))["unet"] > 0


def test_sdxl_rows_follow_the_targets():
    case = {"peak_rss_gib": 8.0, "load_s": [10.0], "setup_s": 20.0, "step_s": [3.0, 2.0], "marks": {},
            "modules": {"unet": 722, "te": 264, "not_sgm": []}}
    results = {"cases": {"bf16": case, "fp8_te": {**case, "peak_rss_gib": 12.0}},
               "step": {"ratio": 1.05, "ratio_min": 1.0, "ratio_max": 1.1, "lora_sweep_step_s": 2.1,
                        "bare_step_s": 2.0},
               "diffusers": {"unet": 722, "te": 264, "warnings": ["unexpected key"]}}
    lines = sdxl.render(results)
    statuses = [line.rsplit("|", 2)[-2].strip() for line in lines if line.startswith("| ") and "status" not in line]
    assert statuses == ["met", "**missed**", "-", "-", "met", "met", "**missed**"]


def test_the_load_line_says_the_machine_was_shared_only_when_it_was():
    info = {"date_utc": "d", "host": "h", "cpu": "c", "cores": 2, "memory_gib": 24, "python": "3.11",
            "versions": {}, "git_commit": "x", "command": "python -m benchmarks.cpu"}
    quiet = report.machine_lines({**info, "load_average_start": [0.3, 0.5, 0.8], "load_average_end": [1.2, 0.9, 0.9]})
    busy = report.machine_lines({**info, "load_average_start": [1.5, 2.1, 2.5], "load_average_end": [2.0, 2.2, 2.4]})
    assert quiet[-1] == "- Load average (1/5/15 min) at start [0.3, 0.5, 0.8], at end [1.2, 0.9, 0.9]."
    assert busy[-1].endswith("(above the core count: other processes shared the machine).")
