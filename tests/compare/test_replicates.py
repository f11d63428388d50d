"""A sweep of 2 variants x 2 seeds, trained for real (tiny model, two steps) into a real MLflow store as sweep.py
runs its jobs (parent run, job numbers and group choices from Hydra), then compared: two variants with n = 2 each,
in the sweep's order, the first as baseline, the one-knob pair found, and a JSON summary that parses and holds
exactly what the page shows."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser

import pytest
from conftest import ROOT, new_store

from lora_sweep.compare.cells import effect_text, estimate_text, row_decimals
from lora_sweep.compare.report import build_report, main

pytestmark = pytest.mark.slow

VARIANTS = {"v53": "noise=offset", "v57": "noise=offset_ip"}  # the article's v53 -> v57 step: IP noise on top
SEEDS = (1, 2)
SETTINGS = ("train.max_steps=2", "train.batch_size=2", "validation.every=1", "validation.fit_images=2",
            "validation.timesteps=[100,900]", "sampling.prompts=[a photo of a cat,a red rocket]", "sampling.steps=2",
            "sampling.every=1", "train.save_every=1", "compare.select=train/loss")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import sweep as sweep_entry
    from lora_sweep.config import register_configs
    from lora_sweep.job.run import run_job
    from lora_sweep.tracking import store

    tmp = tmp_path_factory.mktemp("replicates")
    uri = new_store(tmp / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        client = store.client(uri)
        parent = client.create_run(store.experiment_id(client, "lora-sweep"), run_name="sweep",
                                   tags={store.ROLE: "sweep"}).info.run_id
        (tmp / "sweep").mkdir()
        (tmp / "sweep" / store.PARENT_FILE).write_text(parent)
        register_configs()
        jobs = [(name, seed) for name in VARIANTS for seed in SEEDS]  # Hydra's order: job numbers 0..3
        with initialize_config_dir(str(ROOT / "conf"), version_base=None):
            for num, (name, seed) in reversed(list(enumerate(jobs))):  # launched last job first
                cfg = compose("config", overrides=[VARIANTS[name], f"tracking.variant={name}", f"train.seed={seed}",
                                                   *SETTINGS, f"hydra.job.num={num}"], return_hydra_config=True)
                tags = sweep_entry.job_tags(cfg.hydra, multirun=True)
                with open_dict(cfg):
                    del cfg["hydra"]
                outcome = run_job(cfg, output_dir=tmp / "sweep" / str(num), sweep_dir=tmp / "sweep", tags=tags)
                assert outcome.status == "FINISHED", outcome.reason
        report = build_report(sweep_run_id=parent, out_dir=tmp / "report", tracking_uri=uri,
                              json_path=tmp / "summary.json")
        yield {"report": report, "uri": uri, "parent": parent, "tmp": tmp, "client": client}
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


class Spans(HTMLParser):
    """Text of every element carrying data-metric (the numbers of the final-metrics and one-knob tables)."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[dict, str]] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "data-metric" in attributes:
            self._open, self._text = attributes, ""

    def handle_data(self, data):
        if self._open is not None:
            self._text += data

    def handle_endtag(self, tag):
        if self._open is not None and tag == "span":
            self.found.append((self._open, self._text))
            self._open = None


def embedded_summary(html: str) -> dict:
    block = re.search(r'<script type="application/json" id="lora-sweep-summary">(.*?)</script>', html, re.S)
    assert block, "the page carries its numbers as JSON"
    return json.loads(block.group(1))


def test_replicates_form_two_variants_in_the_sweeps_order(sweep):
    summary = embedded_summary(sweep["report"].read_text(encoding="utf-8"))
    assert [(v["name"], v["n"], v["seeds"]) for v in summary["variants"]] == [("v53", 2, [1, 2]), ("v57", 2, [1, 2])]
    assert summary["baseline"] == "v53" and summary["variants"][0]["is_baseline"]
    keys = [m["key"] for m in summary["metrics"]]
    assert keys[:2] == ["fit/loss", "fit/loss_auc"] and "img/edge_energy" in keys and "val/loss" not in keys
    assert "train/loss" not in [m["key"] for m in summary["metrics"]] and "train/loss" in summary["curves_only"]
    assert not any(m["key"].startswith(("cache/", "train/lr", "mem/")) for m in summary["metrics"])
    fit = summary["variants"][1]["vs_baseline"]["fit/loss"]
    assert fit["comparable"] and fit["basis"] == "paired over 2 seeds" and fit["low"] <= fit["effect"] <= fit["high"]
    for variant in summary["variants"]:
        entry = variant["metrics"]["fit/loss"]
        assert entry["n"] == 2 and entry["low"] <= entry["mean"] <= entry["high"]


def test_the_one_knob_pair_is_found(sweep):
    summary = embedded_summary(sweep["report"].read_text(encoding="utf-8"))
    (pair,) = summary["one_knob_pairs"]
    assert (pair["a"], pair["b"], pair["knob"], pair["from"], pair["to"]) == ("v53", "v57", "noise", "offset",
                                                                              "offset_ip")
    assert "noise.ip_gamma" in pair["detail"]
    assert pair["effects"]["fit/loss"] == summary["variants"][1]["vs_baseline"]["fit/loss"]


def test_json_block_holds_what_the_page_shows(sweep, capsys):
    html = sweep["report"].read_text(encoding="utf-8")
    summary = embedded_summary(html)
    assert json.loads((sweep["tmp"] / "summary.json").read_text()) == summary  # compare --json writes the same
    spans = Spans()
    spans.feed(html)
    shown = {(a.get("data-variant"), a.get("data-a"), a["data-metric"], a.get("data-kind")): text
             for a, text in spans.found}
    checked = 0
    for variant in summary["variants"]:
        for key, entry in variant["metrics"].items():
            decimals = row_decimals(v["metrics"][key] for v in summary["variants"])  # one row, one format
            assert shown[(variant["name"], None, key, "mean")] == estimate_text(entry, decimals)
            checked += 1
        for key, entry in variant["vs_baseline"].items():
            assert shown[(variant["name"], None, key, "vs-baseline")] == effect_text(entry)[0]
    for pair in summary["one_knob_pairs"]:
        for key, entry in pair["effects"].items():
            assert shown[(None, pair["a"], key, None)] == effect_text(entry)[0]
    assert checked >= 2 * 3
    # the page's parameter table and pictures
    params = html.split('<table class="params">', 1)[1].split("</table>", 1)[0]
    assert "v53<br><span class='n'>n = 2 · seeds 1, 2</span>" in params and "IP noise gamma (noise.ip_gamma)" in params
    assert "train.seed" not in params
    assert html.count("<details class='config'>") == 2  # each variant's full resolved config, one click away
    steps = set(re.findall(r'data-progress-step="(\d+)"', html))
    assert steps == {"0", "1", "2"}  # variants x steps for one prompt and seed
    # the CLI writes the same JSON
    out = sweep["tmp"] / "cli.json"
    assert main(["--sweep", sweep["parent"], "--tracking-uri", sweep["uri"], "--out", str(sweep["tmp"] / "cli"),
                 "--json", str(out)]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    assert json.loads(out.read_text())["variants"] == summary["variants"]


def test_report_is_logged_on_the_parent_with_its_summary(sweep):
    names = {a.path.rsplit("/", 1)[-1] for a in sweep["client"].list_artifacts(sweep["parent"], "report")}
    assert {"report.html", "summary.json", "progression.png", "grid.png", "losses.png"} <= names


def test_each_variants_best_step_links_the_lora_its_training_logged(sweep):
    """train/loss is logged at steps 1 and 2, and train.save_every=1 saves a LoRA at both: every link resolves."""
    from pathlib import Path

    summary = json.loads((sweep["tmp"] / "summary.json").read_text())
    assert summary["select"] == {"metric": "train/loss", "direction": "min"}
    for variant in summary["variants"]:
        best = variant["best"]
        assert best["steps"] == [1, 2] and best["step"] in (1, 2), variant["name"]
        assert [f["seed"] for f in best["files"]] == [1, 2]
        for link in best["files"]:
            assert link["path"] == f"lora/checkpoints/lora-step{best['step']:08d}.safetensors"
            assert Path(link["uri"].removeprefix("file://")).is_file()
