"""The true end to end: `python sweep.py -m ...` -> gpu_queue jobs -> MLflow parent + child runs -> report.

Real subprocesses, a real sqlite MLflow store, the real launcher; only the scale is small (tiny model, few steps).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def run_sweep(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_sweep_records_nested_runs_and_writes_the_report(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lora_sweep.__main__ import main

    out = run_sweep(tmp_path, "-m", "preset=demo", "experiment=v53,v57", "train.max_steps=2",
                    "sampling.every=2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lora-sweep")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("lora_sweep.role") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["variant"] for r in children) == ["v53", "v57"]
    assert all(r.info.status == "FINISHED" for r in children)
    for child in children:
        assert client.get_metric_history(child.info.run_id, "train/loss")
        assert client.get_metric_history(child.info.run_id, "img/luminance_mean")
        assert any(a.path == "lora" for a in client.list_artifacts(child.info.run_id))
    report = tmp_path / "sweep" / "report" / "report.html"
    html = report.read_text()
    assert "v53" in html and "v57" in html and "data:image/png;base64" in html
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "comparison report" in out.stderr + out.stdout
    # the report's numbers, as JSON: the sweep's order, the first as baseline, v53 -> v57 is one knob (IP noise)
    import json
    import re

    summary = json.loads(re.search(r'id="lora-sweep-summary">(.*?)</script>', html, re.S).group(1))
    assert [v["name"] for v in summary["variants"]] == ["v53", "v57"] and summary["baseline"] == "v53"
    assert [(p["a"], p["b"], p["knob"]) for p in summary["one_knob_pairs"]] == [("v53", "v57", "noise")]
    assert "fit/loss" in [m["key"] for m in summary["metrics"]]  # the demo preset logs the common yardstick
    assert {c.data.tags.get("lora_sweep.job_num") for c in children} == {"0", "1"}
    by_job_num = {c.data.tags["lora_sweep.job_num"]: c.info.run_id for c in children}

    again = run_sweep(tmp_path, "-m", "preset=demo", "experiment=v53,v57", "train.max_steps=2",
                      "sampling.every=2", f"hydra.sweep.dir={tmp_path / 'sweep2'}")
    assert again.returncode == 0
    assert (again.stdout + again.stderr).count("SKIPPED") >= 2  # same configs: skipped, not retrained
    # skipped in the sweep process (the launcher's precheck): the fork server, which preloads the trainer, never ran
    queue = json.loads((tmp_path / "sweep2" / "gpu_queue_summary.json").read_text())
    assert [j["state"] for j in queue["jobs"]] == ["SKIPPED", "SKIPPED"] and queue["preload"] is None
    assert [j["run_id"] for j in queue["jobs"]] == [by_job_num["0"], by_job_num["1"]]
    assert "starting the fork server" not in again.stdout + again.stderr
    assert not (tmp_path / "sweep2" / ".gpu_queue" / "forkserver.log").exists()

    # The rerun's results are the runs its skipped jobs matched: its parent lists them, its report shows them, and
    # `compare` (the newest sweep: this rerun) works.
    (rerun,) = [r for r in client.search_runs([exp.experiment_id], "tags.`lora_sweep.role` = 'sweep'")
                if r.info.run_id != parent.info.run_id]
    by_job = {c.data.tags["lora_sweep.job_num"]: c.info.run_id for c in children}
    assert rerun.info.status == "FINISHED" and rerun.data.tags["lora_sweep.jobs_skipped"] == "2"
    assert rerun.data.tags["lora_sweep.job_runs"] == f"0={by_job['0']} 1={by_job['1']}"
    html = (tmp_path / "sweep2" / "report" / "report.html").read_text()
    assert "v53" in html and "v57" in html and "trained by earlier sweeps" in html
    assert "report" in {a.path for a in client.list_artifacts(rerun.info.run_id)}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["compare", "--out", str(tmp_path / "cmp")]) == 0  # in this process: the CLI without its start-up
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert rerun.info.run_id in page and "v53" in page and "v57" in page


def test_bad_input_is_one_paragraph_and_exit_2_without_a_traceback(tmp_path):
    out = run_sweep(tmp_path, "model=sdxl", f"model.path={tmp_path / 'missing'}", timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 2
    assert "model.path" in text and "Traceback" not in text


def test_unknown_group_option_lists_the_choices(tmp_path):
    out = run_sweep(tmp_path, "noise=bogus", timeout=120)
    assert out.returncode != 0 and "bogus" in out.stderr and "multires" in out.stderr
