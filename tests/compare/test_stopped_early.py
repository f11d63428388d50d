"""Runs `sweep.stop_early` stopped are censored in the report (real MLflow store, runs logged by hand as the
training side leaves them: KILLED, tagged `lora_sweep.stopped_early`): drawn to their step and marked, left out of
every mean and interval with a note saying why, and named in the one-knob effects and the JSON."""

from __future__ import annotations

import json
import time

import pytest
from conftest import new_store

from lora_sweep.compare.report import build_report
from lora_sweep.tracking.stopped import STOPPED_EARLY


def job(client, exp, parent, variant, seed, offset, fits, stop=None):
    """A job run with fit/loss at steps 0, 2, (4) and samples every 4 steps (a stopped run: at step 0 only);
    `stop`: the rule's tag, and the run ends KILLED at step 2."""
    from mlflow.entities import Metric, Param
    from PIL import Image

    from lora_sweep.sampling.images import log_samples
    from lora_sweep.sampling.metrics import mean_metrics
    from lora_sweep.sampling.prompts import PromptSpec

    tags = {"lora_sweep.role": "job", "variant": f"{variant} train.seed={seed}", "mlflow.parentRunId": parent}
    run_id = client.create_run(exp, run_name=variant, tags=tags, start_time=int(time.time() * 1000)).info.run_id
    client.log_batch(run_id, params=[Param("train.seed", str(seed)), Param("noise.offset", offset),
                                     Param("validation.seed", "0")],
                     metrics=[Metric("fit/loss", v, 0, s) for s, v in zip((0, 2, 4), fits, strict=False)])
    for step in (0,) if stop else (0, 4):
        images = [Image.new("RGB", (8, 8), (10 * seed, 40 * step, 100))]
        log_samples(images, [PromptSpec("a cat", seed=1, width=8, height=8)], step, client=client, run_id=run_id)
        client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, v in mean_metrics(images).items()])
    if stop:
        client.set_tag(run_id, STOPPED_EARLY, stop)
    client.set_terminated(run_id, status="KILLED" if stop else "FINISHED")
    return run_id


def median_stop(value: float) -> str:
    """The tag as the job writes it: the median rule at step 2 against 3 peers."""
    from lora_sweep.training.stop_early import Decision

    return Decision(2, "median", "fit/loss", value, 1.0, [0.9, 1.0, 1.1]).record()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """xa: seeds 1, 2 finished; xb: seed 1 finished, seed 2 stopped at step 2; xc: both seeds stopped at step 2;
    xd: both finished with fit/loss NaN from step 2. xb, xc, xd each differ from xa in noise.offset alone."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("stopped")
    uri = new_store(root / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("censored", artifact_location=(root / "mlruns").as_uri())
    parent = client.create_run(exp, run_name="sweep", tags={"lora_sweep.role": "sweep"}).info.run_id
    ids = {f"xa{s}": job(client, exp, parent, "xa", s, "0", (1.2, 1.0, 0.8 + 0.01 * s)) for s in (1, 2)}
    ids["xb1"] = job(client, exp, parent, "xb", 1, "0.1", (1.2, 0.9, 0.7))
    ids["xb2"] = job(client, exp, parent, "xb", 2, "0.1", (1.2, 1.25), median_stop(1.25))
    ids |= {f"xc{s}": job(client, exp, parent, "xc", s, "0.2", (1.2, 1.5), median_stop(1.5)) for s in (1, 2)}
    nan = float("nan")  # xd diverged: fit/loss NaN from step 2, resumed to the end (the fresh-user test's lr=1e4)
    ids |= {f"xd{s}": job(client, exp, parent, "xd", s, "0.3", (1.145, nan, nan)) for s in (1, 2)}
    out = root / "report"
    page = build_report(sweep_run_id=parent, out_dir=out, tracking_uri=uri, select="fit/loss").read_text()
    return {"ids": ids, "summary": json.loads((out / "summary.json").read_text()), "page": page}


def test_a_stopped_run_is_left_out_of_the_numbers_with_a_note_saying_when_and_why(report):
    ids, summary = report["ids"], report["summary"]
    xb = next(v for v in summary["variants"] if v["name"] == "xb")
    assert xb["n"] == 1 and xb["n_text"] == "n = 1 · seed 1 · 1 stopped early (seed 2)"
    assert xb["metrics"]["fit/loss"]["mean"] == pytest.approx(0.7)  # seed 2's 1.25 at step 2 enters no mean
    assert (xb["best"]["step"], xb["best"]["value"]["n"]) == (4, 1)  # nor the best-step mean
    why = "at step 2: fit/loss 1.25 > median 1"
    assert xb["unfinished"] == [{"run_id": ids["xb2"], "seed": 2, "status": "KILLED", "reason": "",
                                 "stopped_early": {"step": 2, "rule": "median", "metric": "fit/loss", "value": 1.25,
                                                   "finite": True, "compared_with": 1.0, "peers": 3, "why": why}}]
    note = next(n for n in summary["notes"] if n.startswith("xb:"))
    assert note == ("xb: 1 of 2 runs was stopped early by sweep.stop_early and is left out of the final and "
                    "best-step numbers (censored: its curves end where it stopped): seed 2 at step 2: fit/loss 1.25 "
                    f"> median 1 (rule median, 3 peers), run {ids['xb2'][:8]}.")
    assert not any("did not finish" in n for n in summary["notes"])  # said once, as stopped, not as killed
    assert [(s["variant"], s["seed"], s["run_id"], s["why"]) for s in summary["stopped_early"]] == [
        ("xb", 2, ids["xb2"], why), ("xc", 1, ids["xc1"], "at step 2: fit/loss 1.5 > median 1"),
        ("xc", 2, ids["xc2"], "at step 2: fit/loss 1.5 > median 1")]
    assert note in report["page"] and "1 stopped early (seed 2)" in report["page"]


def test_stopped_runs_do_not_pull_the_samples_and_image_metrics_back_to_their_step(report):
    """xc stopped at step 2 having sampled step 0 only: the finished runs' last sampled step (4) is the page's."""
    summary, page = report["summary"], report["page"]
    assert summary["step"] == 4
    assert next(m for m in summary["metrics"] if m["key"] == "img/colorfulness")["at"] == "final (step 4)"
    xa = next(v for v in summary["variants"] if v["name"] == "xa")
    assert xa["metrics"]["img/colorfulness"]["n"] == 2
    note = ("Samples and image metrics are at step 4, the last step every finished run sampled: xc stopped early "
            "before it, so its row shows its last sampled step.")
    assert note in summary["notes"] and note in page
    assert "Samples at step 4" in page


def test_a_stopped_variants_mean_cells_share_one_footnote(report):
    """The fresh-user test's table said 'its run stopped early at step 2' in full in 9 cells."""
    import re

    cells = re.findall(r"data-variant='xc' data-metric='[^']+' data-kind='mean' title='[^']*'>([^<]*<sup[^>]*>\d+)",
                       report["page"])
    assert cells and len(set(cells)) == 1 and cells[0].startswith("no value<sup")
    assert report["page"].count(">all replicates stopped early at step 2</li>") == 1


def test_the_forest_plot_leaves_out_metrics_no_variant_has():
    """The fresh-user test's forest plot drew 9 empty 'no value' panels when 3 of 4 variants stopped."""
    from lora_sweep.compare.forest import forest_figure, panels

    drawn = {"comparable": True, "verdict": "different", "effect": -0.02, "low": -0.03, "high": -0.01}
    empty = {"comparable": True, "verdict": "no value", "effect": None, "low": None, "high": None}
    diverged = {**empty, "not_finite": "b"}
    summary = {"metrics": [{"key": "fit/loss"}, {"key": "val/loss"}, {"key": "img/diversity"}],
               "variants": [{"name": "a", "is_baseline": True, "vs_baseline": {}},
                            {"name": "b", "is_baseline": False,
                             "vs_baseline": {"fit/loss": drawn, "val/loss": diverged, "img/diversity": empty}},
                            {"name": "c", "is_baseline": False,
                             "vs_baseline": {"fit/loss": empty, "val/loss": empty, "img/diversity": empty}}]}
    assert panels(summary) == (["fit/loss", "val/loss"], ["img/diversity"])  # val/loss: b is worse (NaN)
    assert forest_figure(summary) is not None


def test_the_summarys_variant_tag_has_no_replicate_key(report):
    """The fresh-user test's summary.json tagged variant noise=none 'noise=none train.seed=1'."""
    assert [v["tag"] for v in report["summary"]["variants"]] == ["xa", "xb", "xc", "xd"]


def test_a_diverged_variant_is_worse_and_its_best_checkpoint_says_why():
    """xd's fit/loss is NaN from step 2 on: 'worse' (fit/loss has a direction), not 'no value'."""
    from lora_sweep.compare.verdicts import verdict

    assert verdict({"comparable": True, "verdict": "no value", "not_finite": "b"}, "img/luminance_mean") == \
        "not finite"  # no better direction: the matrix says what it knows
    assert verdict({"comparable": True, "verdict": "no value", "not_finite": "a"}, "fit/loss") == "better"


def test_a_diverged_variant_in_the_report(report):
    summary, page = report["summary"], report["page"]
    xd = next(v for v in summary["variants"] if v["name"] == "xd")
    entry = xd["vs_baseline"]["fit/loss"]
    assert (entry["verdict"], entry["not_finite"], entry["note"]) == ("no value", "b",
                                                                      "xd: fit/loss not finite from step 2")
    assert xd["vs_baseline"]["fit/loss_auc"]["not_finite"] == "b"
    assert "data-variant='xd' data-metric='fit/loss' data-verdict='worse'" in page
    assert (xd["best"]["step"], xd["best"]["flag"]) == (
        0, "fit/loss not finite from step 2 on (diverged): no later checkpoint is usable")


def test_a_side_with_only_stopped_runs_says_so_in_the_effects(report):
    summary = report["summary"]
    xc = next(v for v in summary["variants"] if v["name"] == "xc")
    assert xc["n"] == 0 and xc["label"] == "xc (stopped early)"
    assert xc["metrics"]["fit/loss"]["note"] == "all replicates stopped early at step 2"
    assert xc["vs_baseline"]["fit/loss"]["note"] == "xc: all replicates stopped early at step 2"
    assert xc["best"]["step"] is None and xc["best"]["missing"] == "all replicates stopped early at step 2"
    pair = next(p for p in summary["one_knob_pairs"] if (p["a"], p["b"]) == ("xa", "xc"))
    assert pair["effects"]["fit/loss"]["note"] == "xc: all replicates stopped early at step 2"
    assert pair["effects"]["fit/loss"]["effect"] is None


def test_a_stopped_runs_curve_ends_at_its_step_with_a_mark():
    from lora_sweep.compare.figures import STOPPED_LABEL, curve_figure, stop_mark
    from lora_sweep.compare.variants import VariantData

    def run(status, tags, fits):
        return VariantData(name="v", run_id="r", status=status, params={}, final_metrics={}, cells={}, cell_steps={},
                           histories={"fit/loss": list(zip((0, 2, 4), fits, strict=False))}, tags=tags)

    tag = {STOPPED_EARLY: median_stop(float("nan"))}
    stopped = run("KILLED", tag, (1.2, 1.3, float("nan")))
    assert stop_mark(stopped, stopped.histories["fit/loss"]) == (2, 1.3)  # the last finite point
    assert stop_mark(run("KILLED", {}, (1.2, 1.3)), [(0, 1.2), (2, 1.3)]) is None  # a signal's stop
    assert stop_mark(run("FINISHED", tag, (1.2, 1.3)), [(0, 1.2), (2, 1.3)]) is None  # resumed to the end since
    assert curve_figure([stopped], ["fit/loss"]) is not None and STOPPED_LABEL.startswith("X: stopped early")
