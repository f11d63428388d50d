"""The report page's layout on constructed runs (no MLflow): continuous section numbers, long values cut where the
full resolved config holds them whole, settings only among the shared parameters, the data warnings per run, the
variant names without their seed, compound one-knob pairs marked, and the JSON block holding what the page shows."""

from __future__ import annotations

import json
import re

import pytest

from lora_sweep.compare.report_html import ReportData, render_html
from lora_sweep.compare.summary import build_summary
from lora_sweep.compare.variants import VariantData

LONG = "a photo of " + "x" * 489  # a 500-character override value


def make_run(label: str, seed: int, fit: float, **params: str) -> VariantData:
    return VariantData(
        name=label, run_id=f"{label[6:9]}{seed}".ljust(32, "0"), status="FINISHED",
        params={"train.seed": str(seed), "tracking.variant": "None", "data.warnings": "0",
                "sampling.prompt_file": LONG, "noise.offset": "0.0", **params},
        final_metrics={"fit/loss": fit}, histories={"fit/loss": [(0, 1.0), (4, (1 + fit) / 2), (8, fit)]},
        cells={}, cell_steps={}, tags={"variant": label, "lora_sweep.job_num": str(seed)},
        artifact_uri=f"file:///tmp/mlruns/1/{label[6:9]}{seed}/artifacts")


def page() -> tuple[str, dict, ReportData]:
    runs = [make_run(f"noise=none train.seed={s}", s, 0.5 + 0.01 * s) for s in (1, 2)]
    runs += [make_run(f"noise=offset train.seed={s}", s, 0.4 + 0.01 * s, **{"noise.offset": "0.1",
                                                                          "sampling.prompt_file": LONG + "y"})
             for s in (1, 2)]
    runs[0].params["data.warnings"] = runs[1].params["data.warnings"] = "2"  # the same data: the same fallbacks
    runs[0].warnings_text = runs[1].warnings_text = "skipped 1_photos/broken.png: cannot identify image file\n"
    data = ReportData(title="t", subtitle="s", step=None, image_keys=[], column_titles={}, variants=runs)
    summary = build_summary(data)
    return render_html(data, {}, summary), summary, data


def test_sections_are_numbered_continuously_without_samples():
    html, _, _ = page()
    titles = re.findall(r"<h2>(\d+)\. ([^<(]+)", html.replace("&#x27;", "'"))
    assert [int(n) for n, _ in titles] == list(range(1, len(titles) + 1))
    assert [t.strip() for _, t in titles] == ["What differs, and which is better",
                                              "Samples at each run's last sampled step", "Curves",
                                              "Parameters that differ", "The numbers"]


def test_long_values_are_cut_in_the_table_and_whole_in_the_resolved_config():
    html, _, _ = page()
    params = html.split('<table class="params">', 1)[1].split("</table>", 1)[0]
    assert f">{LONG[:59]}… (500 chars)</span>" in params and f">{LONG[:59]}… (501 chars)</span>" in params
    assert f"<span class='cut' title='{LONG}'>" in params  # the whole value on hover
    configs = html.split("<div class='configs'>", 1)[1]
    assert f"<td>{LONG}</td>" in configs and f"<td>{LONG}y</td>" in configs


def test_shared_parameters_are_settings_and_data_warnings_are_notes_per_run():
    html, summary, data = page()
    shared = html.split("parameters shared by all variants</summary>", 1)[1].split("</details>", 1)[0]
    assert "status" not in shared and "data.warnings" not in shared and "FINISHED" not in shared
    warned, other = summary["data_warnings"]
    assert warned == {"variant": "noise=none", "run_id": data.groups[0].runs[0].run_id, "count": 2,
                      "artifact": "data/warnings.txt"} and other["run_id"] == data.groups[0].runs[1].run_id
    assert [v["data_warnings"] for v in summary["variants"]] == [2, 0]
    (note,) = re.findall(r"<div class='note' data-warnings-runs='([^']*)'>(.*?)</div>", html, re.S)  # one for both
    assert note[0] == f"{warned['run_id']} {other['run_id']}"
    assert "2 data warnings (fallbacks the pre-flight allowed) in 2 runs (noise=none)" in note[1]
    assert "broken.png" in note[1] and "href='file:///tmp/mlruns/1/non1/artifacts/data/warnings.txt'" in note[1]


def test_variants_are_named_without_their_seed_everywhere():
    html, summary, _ = page()
    assert [(v["name"], v["label"], v["n"], v["seeds"]) for v in summary["variants"]] == [
        ("noise=none", "noise=none (n = 2, seeds 1, 2)", 2, [1, 2]),
        ("noise=offset", "noise=offset (n = 2, seeds 1, 2)", 2, [1, 2])]
    assert "train.seed=1" not in html.split('<script type="application/json"', 1)[0].replace(
        "train.seed=1,2,3", "")  # the hint to add replicates is the only seed override on the page
    (pair,) = summary["one_knob_pairs"]
    assert (pair["a"], pair["b"], pair["knob"]) == ("noise=none", "noise=offset", "noise.offset")
    assert not pair["compound"] and pair["values"] == [{"key": "noise.offset", "from": "0", "to": "0.1"}]
    block = re.search(r'id="lora-sweep-summary">(.*?)</script>', html, re.S).group(1)
    assert json.loads(block) == json.loads(json.dumps(summary))


def test_a_pair_that_differs_before_training_shows_it_on_the_page_as_in_the_json():
    from lora_sweep.compare.cells import start_text

    runs = [make_run(f"precision={name} train.seed={s}", s, 0.5, **{"precision.name": name}) for s in (1, 2)
            for name in ("fp8", "fp16")]
    for run in runs[1::2]:  # fp16 base weights: the same points measure differently before any training
        run.histories["fit/loss"] = [(0, 1.2), (4, 0.9), (8, 0.6 + 0.01 * run.seed)]
    data = ReportData(title="t", subtitle="s", step=None, image_keys=[], column_titles={}, variants=runs)
    summary = build_summary(data)
    html = render_html(data, {}, summary)
    (pair,) = summary["one_knob_pairs"]
    entry = pair["effects"]["fit/loss"]
    assert entry["at_start"]["effect"] == pytest.approx(0.2) and entry["change"]["verdict"] == "different"
    shown = re.search(r"<span class='start' data-a='precision=fp8' data-b='precision=fp16' "
                      r"data-metric='fit/loss' data-kind='at-start'>([^<]*)</span>", html).group(1)
    assert shown == start_text(entry).replace("'", "&#x27;") and shown.startswith("fit/loss differs at step 0 by +0.2")
    assert summary["variants"][1]["vs_baseline"]["fit/loss"]["at_start"] == entry["at_start"]
