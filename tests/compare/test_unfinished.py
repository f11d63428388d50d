"""Runs that did not finish, read from a real MLflow store: the page and the JSON name each (variant, seed,
status, the reason MLflow holds), the variant's n counts the finished runs and says what was lost, and a
--baseline that names a failed run says it failed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import new_store

from lora_sweep.compare.report import build_report, main
from lora_sweep.errors import UserError
from lora_sweep.tracking.store import FAILURE, job_runs_tags

REASON = "NonFiniteLoss: train/loss is nan at step 3 (lower the learning rate)"


def job(client, exp, parent, variant, seed, status="FINISHED", *, fit=1.0, offset="0", reason=None):
    from mlflow.entities import Metric, Param

    tags = {"lora_sweep.role": "job", "variant": f"{variant} train.seed={seed}"}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp, run_name=variant, tags=tags, start_time=int(time.time() * 1000)).info.run_id
    client.log_batch(run_id, params=[Param("train.seed", str(seed)), Param("noise.offset", offset),
                                     Param("validation.seed", "0")],
                     metrics=[Metric("fit/loss", v, 0, s) for s, v in ((0, 1.2), (2, 1.1), (4, fit))])
    if reason:
        client.set_tag(run_id, FAILURE, reason)
    client.set_terminated(run_id, status=status)
    return run_id


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """xa seeds 1, 2, 3; xb seeds 1, 2 finished, seed 3 FAILED; a KILLED xb run in another experiment that the
    sweep's jobs used (the parent's job_runs tag names it)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("unfinished")
    uri = new_store(root / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("partial", artifact_location=(root / "mlruns").as_uri())
    other = client.create_experiment("elsewhere", artifact_location=(root / "mlruns2").as_uri())
    parent = client.create_run(exp, run_name="sweep", tags={"lora_sweep.role": "sweep"}).info.run_id
    ids = {f"xa{s}": job(client, exp, parent, "xa", s, fit=1.0 + 0.01 * s) for s in (1, 2, 3)}
    ids |= {f"xb{s}": job(client, exp, parent, "xb", s, fit=0.9 + 0.01 * s, offset="0.1") for s in (1, 2)}
    ids["xb3"] = job(client, exp, parent, "xb", 3, "FAILED", fit=float("nan"), offset="0.1", reason=REASON)
    ids["xb4"] = job(client, other, parent, "xb", 4, "KILLED", offset="0.1", reason="SIGTERM from the queue")
    for key, value in job_runs_tags({i: ids[k] for i, k in enumerate(ids)}).items():
        client.set_tag(parent, key, value)
    return {"uri": uri, "parent": parent, "ids": ids, "root": root}


def test_a_failed_job_is_named_on_the_page_and_in_the_json(sweep, tmp_path):
    path = build_report(sweep_run_id=sweep["parent"], out_dir=tmp_path, tracking_uri=sweep["uri"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    xb = next(v for v in summary["variants"] if v["name"] == "xb")
    assert xb["n"] == 2 and xb["seeds"] == [1, 2]
    assert xb["n_text"] == "n = 2 · seeds 1, 2 · 1 failed, 1 killed (seeds 3, 4)"
    assert xb["unfinished"] == [
        {"run_id": sweep["ids"]["xb3"], "seed": 3, "status": "FAILED", "reason": REASON, "stopped_early": None},
        {"run_id": sweep["ids"]["xb4"], "seed": 4, "status": "KILLED", "reason": "SIGTERM from the queue",
         "stopped_early": None}]
    note = next(n for n in summary["notes"] if n.startswith("xb:"))
    assert note == (f"xb: 2 of 4 runs did not finish and are left out of the numbers: seed 3 FAILED ({REASON}), "
                    f"run {sweep['ids']['xb3'][:8]}; seed 4 KILLED (SIGTERM from the queue), "
                    f"run {sweep['ids']['xb4'][:8]}.")
    xa = next(v for v in summary["variants"] if v["name"] == "xa")
    assert xa["unfinished"] == [] and xa["n_text"] == "n = 3 · seeds 1, 2, 3"
    page = path.read_text()
    assert "n = 2 · seeds 1, 2 · 1 failed, 1 killed (seeds 3, 4)" in page  # the parameters' column head
    assert "n = 2 · 1 failed, 1 killed</span>" in page  # beside each mean
    assert REASON in page
    # the differences use the finished runs: xb's seeds 1, 2 against xa's 1, 2, 3 (Welch, and it says so)
    fit = xb["vs_baseline"]["fit/loss"]
    assert fit["basis"] == "unpaired, 3 + 2 runs" and fit["note"] == "seeds differ (xb: 1, 2; xa: 1, 2, 3)"


def test_a_baseline_that_names_a_failed_run_says_it_failed(sweep, tmp_path, capsys):
    build_report(sweep_run_id=sweep["parent"], out_dir=tmp_path, tracking_uri=sweep["uri"],
                 baseline=sweep["ids"]["xb3"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["baseline"] == "xb"
    assert (f"--baseline {sweep['ids']['xb3']}: run {sweep['ids']['xb3'][:8]} FAILED ({REASON}) and is left out of "
            "the numbers; the baseline is its variant xb, n = 2 · seeds 1, 2 · 1 failed, 1 killed (seeds 3, 4).") \
        in summary["notes"]
    # a failed run of the store that is not among the compared runs (another sweep's): the error says it failed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sweep["uri"])
    exp = client.get_experiment_by_name("partial").experiment_id
    stray = job(client, exp, None, "xc", 1, "FAILED", offset="0.3", reason="CUDA out of memory")
    with pytest.raises(UserError, match=f"run {stray} FAILED \\(CUDA out of memory\\): a run that did not finish is "
                                        "left out of the comparison"):
        build_report(sweep_run_id=sweep["parent"], out_dir=tmp_path, tracking_uri=sweep["uri"], baseline=stray)
    assert main(["--sweep", sweep["parent"], "--baseline", stray, "--tracking-uri", sweep["uri"],
                 "--out", str(tmp_path)]) == 2
    assert "did not finish" in capsys.readouterr().err


def test_a_baseline_whose_variant_has_no_finished_run_is_refused():
    from lora_sweep.compare.variants import VariantData, baseline_index, group_replicates

    def run(name, seed, status, **tags):
        return VariantData(name=name, run_id=f"{name}{seed}".ljust(32, "0"), status=status,
                           params={"train.seed": str(seed), "tracking.variant": name}, final_metrics={},
                           histories={}, cells={}, cell_steps={}, tags={"variant": name, **tags})

    groups = group_replicates([run("a", 1, "FINISHED"), run("b", 1, "FAILED", **{"lora_sweep.failure": "OOM"})])
    with pytest.raises(UserError, match="run b10+ FAILED \\(OOM\\): runs that did not finish are left out of the "
                                        "numbers, and its variant b has no finished run. Name one of the variants "
                                        "that have: a."):
        baseline_index(groups, "b1")


def test_without_baseline_the_first_variant_with_a_finished_run_is_the_baseline():
    """A first variant whose runs all failed would make every difference 'no value'."""
    from lora_sweep.compare.variants import VariantData, baseline_index, group_replicates

    def run(name, seed, status):
        return VariantData(name=name, run_id=f"{name}{seed}".ljust(32, "0"), status=status,
                           params={"train.seed": str(seed), "tracking.variant": name}, final_metrics={},
                           histories={}, cells={}, cell_steps={}, tags={"variant": name})

    groups = group_replicates([run("a", 1, "FAILED"), run("a", 2, "KILLED"), run("b", 1, "FINISHED")])
    assert [g.name for g in groups] == ["a", "b"] and baseline_index(groups, None) == 1
    assert baseline_index(group_replicates([run("a", 1, "FAILED")]), None) == 0  # nothing finished: the first
    assert groups[0].label == "a (no finished run)" and groups[1].label == "b"  # legends count what is shown
    # a job killed before its first state and trained again by a later sweep (a new run, same seed) lost nothing
    (again,) = group_replicates([run("c", 42, "KILLED"), run("c", 42, "FINISHED")])
    assert again.unfinished == [] and again.n_text == "n = 1 · seed 42"


def test_all_sweeps_compares_every_run_of_the_experiment(tmp_path, capsys, monkeypatch):
    """Two sweeps in one experiment (a variant that needed other GPUs went in the second): --experiment compares
    the newest sweep, --all-sweeps both, with the replicates of one config from the two sweeps in one variant."""
    from mlflow.tracking import MlflowClient

    uri = new_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("mine", artifact_location=(tmp_path / "mlruns").as_uri())
    first = client.create_run(exp, run_name="sweep", tags={"lora_sweep.role": "sweep"}).info.run_id
    ids = [job(client, exp, first, "xa", s) for s in (1, 2)] + [job(client, exp, first, "xb", 1, offset="0.1")]
    time.sleep(0.01)
    second = client.create_run(exp, run_name="sweep", tags={"lora_sweep.role": "sweep"}).info.run_id
    ids += [job(client, exp, second, "xb", 2, offset="0.1"), job(client, exp, second, "xc", 1, offset="0.2")]
    newest = json.loads(Path(build_report(experiment="mine", out_dir=tmp_path / "newest", tracking_uri=uri)
                             .with_name("summary.json")).read_text())
    assert [(v["name"], v["n"]) for v in newest["variants"]] == [("xb", 1), ("xc", 1)]
    monkeypatch.chdir(tmp_path)
    assert main(["--experiment", "mine", "--all-sweeps", "--tracking-uri", uri]) == 0
    out = tmp_path / "reports" / "mine-all-sweeps"
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    every = json.loads((out / "summary.json").read_text())
    assert sorted((v["name"], v["n"], v["seeds"]) for v in every["variants"]) == [
        ("xa", 2, [1, 2]), ("xb", 2, [1, 2]), ("xc", 1, [1])]
    assert sorted(r for v in every["variants"] for r in v["run_ids"]) == sorted(ids)
    assert "all job runs of the experiment (2 sweeps)" in (out / "report.html").read_text()
    with pytest.raises(SystemExit) as refused:
        main(["--sweep", first, "--all-sweeps", "--tracking-uri", uri])
    assert refused.value.code == 2 and "give --experiment, not --sweep" in capsys.readouterr().err
