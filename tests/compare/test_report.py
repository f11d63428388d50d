"""The comparison report, read from a real MLflow sqlite store filled the way run.py fills it.

Each synthetic variant's samples are solid colours that encode (variant, prompt, step), so a test can decode any
grid cell of the HTML and tell which run, prompt and step it came from.
"""

from __future__ import annotations

import base64
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import GridCells, new_store
from PIL import Image

from lora_sweep.compare.figures import ema
from lora_sweep.compare.report import build_report, choose_step, main
from lora_sweep.compare.runs import parse_image_artifact
from lora_sweep.errors import UserError
from lora_sweep.sampling.images import log_samples
from lora_sweep.sampling.metrics import mean_metrics
from lora_sweep.sampling.prompts import PromptSpec

VARIANTS = {  # name -> params that differ (everything else shared)
    "v53": {"noise.offset": "0.0357", "loss.min_snr_gamma": "5.0", "optimizer.name": "DAdaptAdamPreprint"},
    "v57": {"noise.offset": "0.0357", "loss.min_snr_gamma": "5.0", "optimizer.name": "DAdaptAdamPreprint",
            "noise.ip_gamma": "0.1"},
    "v61": {"noise.offset": "0.0357", "loss.min_snr_gamma": "5.0", "optimizer.name": "Prodigy",
            "noise.ip_gamma": "0.1"},
}
SHARED = {"train.batch_size": "4", "network.rank": "8", "precision.name": "fp8"}
PROMPTS = [PromptSpec("a photo of a cat", seed=1234, width=64, height=64),
           PromptSpec("a photo of a dog", seed=1235, width=64, height=64)]
SAMPLE_STEPS = (0, 10, 20)


def cell_colour(variant: int, prompt: int, step: int) -> tuple[int, int, int]:
    return (30 + 80 * variant, 40 + 120 * prompt, 20 + 10 * step)


def fill_store(uri: str, artifact_root: Path, *, with_parent: bool = True, experiment: str = "lora-sweep") -> dict:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(experiment, artifact_location=artifact_root.as_uri())
    parent = client.create_run(exp, run_name="sweep", tags={"lora_sweep.role": "sweep"}) if with_parent else None
    ids = {}
    for index, (name, params) in enumerate(VARIANTS.items()):
        tags = {"lora_sweep.role": "job", "variant": name, "config_hash": f"h{index}"}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent.info.run_id
        started = int(time.time() * 1000) - 60_000 * (len(VARIANTS) - index)  # launch order = variant order
        run = client.create_run(exp, run_name=name, tags=tags, start_time=started)
        run_id = ids[name] = run.info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in {**SHARED, **params}.items()])
        metrics = [Metric("train/loss", 0.2 - 0.002 * s + 0.01 * index, 0, s) for s in range(21)]
        metrics += [Metric("val/loss", 0.15 - 0.001 * s + 0.005 * index, 0, s) for s in SAMPLE_STEPS]
        for step in SAMPLE_STEPS:
            images = [Image.new("RGB", (64, 64), cell_colour(index, p, step)) for p in range(len(PROMPTS))]
            log_samples(images, PROMPTS, step, client=client, run_id=run_id)
            metrics += [Metric(k, v, 0, step) for k, v in mean_metrics(images).items()]
        client.log_batch(run_id, metrics=metrics)
        client.set_terminated(run_id)
    return {"client": client, "parent": parent.info.run_id if parent else None, "runs": ids}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One sqlite store for the module (creating one costs seconds): a sweep in "lora-sweep", loose job runs in
    "loose"."""
    root = tmp_path_factory.mktemp("store")
    uri = new_store(root / "mlflow.db")
    fill_store(uri, root / "mlruns-loose", with_parent=False, experiment="loose")
    return {"uri": uri, **fill_store(uri, root / "mlruns")}


@pytest.fixture(scope="module")
def sweep_report(store, tmp_path_factory) -> Path:
    """The report of the sweep, built once by --sweep run id."""
    out = tmp_path_factory.mktemp("sweep_report")
    return build_report(sweep_run_id=store["parent"], out_dir=out, tracking_uri=store["uri"])


def decode(data_uri: str) -> tuple[int, int, int]:
    payload = base64.b64decode(data_uri.split(",", 1)[1])
    pixels = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"), dtype=np.float64)
    return tuple(int(round(c)) for c in pixels.reshape(-1, 3).mean(axis=0))


def assert_cells_match(cells, store, step):
    names = list(VARIANTS)
    assert len(cells) == len(VARIANTS) * len(PROMPTS)
    for cell in cells:
        variant = next(i for i, n in enumerate(names) if store["runs"][n] == cell["data-run-id"])
        prompt = int(cell["data-key"][len("sample_p"):])
        assert int(cell["data-step"]) == step
        expected = cell_colour(variant, prompt, step)
        assert all(abs(a - b) <= 3 for a, b in zip(decode(cell["src"]), expected, strict=True)), (cell["alt"], expected)


def test_image_artifact_names_old_and_new():
    uuid = "0b5f6c1e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
    new = parse_image_artifact(f"images/sample_p00+step+10+timestamp+1700000000000+{uuid}.png")
    assert (new.key, new.step, new.timestamp) == ("sample_p00", 10, 1700000000000)
    old = parse_image_artifact("images/a#b%step%3%timestamp%17%0b5f6c1e-1c2d-4e5f-8a9b-0c1d2e3f4a5b.png")
    assert (old.key, old.step) == ("a/b", 3)
    assert parse_image_artifact(f"images/x+step+1+timestamp+2+{uuid}+compressed.webp") is None
    assert parse_image_artifact("samples/grid_step000010.png") is None


def test_choose_step_prefers_latest_common_step():
    runs = [{("k", 0): 1, ("k", 10): 1, ("k", 20): 1}, {("k", 0): 1, ("k", 10): 1}, {}]
    assert choose_step(runs, None) == 10
    assert choose_step(runs, 0) == 0
    assert choose_step([{("k", 5): 1}, {("k", 6): 1}], None) is None


def test_report_names_every_variant_and_embeds_grid_from_right_runs(store, tmp_path):
    path = build_report(experiment="lora-sweep", sweep_run_id=None, step=None, out_dir=tmp_path / "r",
                        baseline=None, tracking_uri=store["uri"])
    text = path.read_text(encoding="utf-8")
    for name in VARIANTS:
        assert name in text
    parser = GridCells()
    parser.feed(text)
    assert_cells_match(parser.cells, store, step=20)  # default: the latest step all runs sampled
    assert "p00 · seed 1234: a photo of a cat" in text  # column titles from samples/prompts.json
    for png in ("grid.png", "losses.png", "image_metrics.png"):
        assert (tmp_path / "r" / png).stat().st_size > 1000
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 2  # the two curve figures, embedded


def test_parameter_table_shows_only_differing_rows(sweep_report):
    text = sweep_report.read_text(encoding="utf-8")
    params_table = text.split('<table class="params">', 1)[1].split("</table>", 1)[0]
    assert "noise.ip_gamma" in params_table and "optimizer.name" in params_table
    assert "Prodigy" in params_table and "<td>x</td>" in params_table  # v53 has no ip_gamma: the article's "x"
    for shared in ("train.batch_size", "network.rank", "noise.offset", "loss.min_snr_gamma"):
        assert shared not in params_table
    assert "Parameters that differ (2 of 7)" in text  # settings only: the status (all FINISHED) is no parameter


def test_step_option_and_baseline(store, tmp_path):
    path = build_report(sweep_run_id=store["parent"], step=10, out_dir=tmp_path, baseline="v57",
                        tracking_uri=store["uri"])
    text = path.read_text()
    parser = GridCells()
    parser.feed(text)
    assert_cells_match(parser.cells, store, step=10)
    final = text.split('<table class="final">', 1)[1].split("</table>", 1)[0]
    assert "v57 (baseline)" in final and "img/luminance_mean" in final and "val/loss" in final
    # v61's val/loss is 0.005 above v57's at every step: its delta reads +0.005.
    assert "+0.005" in final
    with pytest.raises(UserError, match="baseline"):
        build_report(sweep_run_id=store["parent"], out_dir=tmp_path, baseline="nope", tracking_uri=store["uri"])


def test_report_is_logged_on_the_parent_run(store, sweep_report):
    names = {Path(f.path).name for f in store["client"].list_artifacts(store["parent"], "report")}
    assert {"report.html", "grid.png", "losses.png", "image_metrics.png"} <= names


def test_experiment_without_sweep_compares_all_jobs(store, tmp_path):
    text = build_report(experiment="loose", out_dir=tmp_path / "out", tracking_uri=store["uri"]).read_text()
    assert all(name in text for name in VARIANTS)
    assert "all job runs" in text


def test_cli(store, tmp_path, capsys):
    assert main(["--sweep", store["parent"], "--out", str(tmp_path), "--tracking-uri", store["uri"]]) == 0
    assert str((tmp_path / "report.html").resolve()) in capsys.readouterr().out
    assert main(["--experiment", "missing", "--tracking-uri", store["uri"], "--out", str(tmp_path)]) == 2
    assert "no MLflow experiment named 'missing'" in capsys.readouterr().err
    assert main(["--sweep", "0" * 32, "--tracking-uri", store["uri"], "--out", str(tmp_path)]) == 2


def test_small_helpers():
    assert ema([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no warm-up dip
    assert ema([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10.0 * 0.5 / 0.75])


def test_a_step_without_samples_is_refused_with_the_steps_that_exist(store, tmp_path, capsys):
    from lora_sweep.compare.report import check_step

    args = ["--sweep", store["parent"], "--tracking-uri", store["uri"], "--out", str(tmp_path / "r")]
    assert main([*args, "--step", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --step 3: no compared run logged samples at step 3. Sampled steps: 0, 10, 20.")
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()  # one paragraph, nothing written
    with pytest.raises(UserError, match=r"Sampled steps: 0, 5, 10; at every run: 0, 10\. Pick one"):
        check_step([{("k", 0): 1, ("k", 5): 1, ("k", 10): 1}, {("k", 0): 1, ("k", 10): 1}], 7)
    with pytest.raises(UserError, match="logged no samples at all"):
        check_step([{}, {}], 7)
    check_step([{("k", 5): 1}, {("k", 6): 1}], 5)  # one run has it: the page notes the other


def test_each_metric_row_states_the_step_its_values_are_from(store, tmp_path):
    """--step 10 moves the image metrics to step 10 while val/loss stays final (step 20): each row says which."""
    import json

    path = build_report(sweep_run_id=store["parent"], out_dir=tmp_path, tracking_uri=store["uri"], step=10)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {m["key"]: (m["steps"], m["final"], m["at"]) for m in summary["metrics"]}
    assert rows["val/loss"] == ([20], True, "final (step 20)")
    assert rows["img/luminance_mean"] == ([10], False, "step 10")
    page = path.read_text()
    assert "<span class='n' data-metric='img/luminance_mean' data-kind='step'>at step 10</span>" in page
    assert "<span class='n' data-metric='val/loss' data-kind='step'>at final (step 20)</span>" in page
    assert "<h3>Metrics (image metrics at step 10, the rest final) on a common yardstick" in page
    build_report(sweep_run_id=store["parent"], out_dir=tmp_path, tracking_uri=store["uri"])  # the latest step
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {m["at"] for m in summary["metrics"]} == {"final (step 20)"}
