"""The report's first screen on a store with planted differences (scorecard_store.py): the verdict matrix and the
forest plot say better / worse / within noise / no value where they were planted, repeated notes are said once
under their table, and in headless Chromium at 1280x800 the matrix and the best steps are above the fold.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import new_store
from scorecard_store import BASELINE, DIVERSE, fill_scorecard_store
from test_page import make_run
from test_ui_browser import find_or_install_chromium, run_chromium, visible_text

from lora_sweep.compare.report import build_report
from lora_sweep.compare.report_html import ReportData, render_html
from lora_sweep.compare.summary import build_summary
from lora_sweep.compare.verdicts import verdict

SCREEN = (1280, 800)
# Writes each first-screen element's bottom edge (px from the page's top) into the DOM, for --dump-dom to carry.
POSITIONS_JS = """<script>window.addEventListener('load', () => {
  const bottom = e => Math.round(e.getBoundingClientRect().bottom + window.scrollY);
  const found = {verdicts: bottom(document.getElementById('verdicts')),
                 right: Math.round(document.getElementById('verdicts').getBoundingClientRect().right),
                 best: [...document.querySelectorAll('[data-best-step]')].map(bottom)};
  const out = document.createElement('pre'); out.id = 'positions'; out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("scorecard")
    uri = new_store(root / "mlflow.db")
    store = fill_scorecard_store(uri, root / "mlruns")
    path = build_report(sweep_run_id=store["parent"], out_dir=root / "report", tracking_uri=uri, select="fit/loss")
    return {**store, "root": root, "path": path, "html": path.read_text(encoding="utf-8")}


def cells(html: str) -> dict[tuple[str, str], str]:
    return {(v, m): found for v, m, found in
            re.findall(r"data-variant='([^']+)' data-metric='([^']+)' data-verdict='([^']+)'", html)}


def test_the_matrix_says_where_the_differences_were_planted(report):
    found = cells(report["html"])
    assert found["noise=offset", "fit/loss"] == "better"  # fit/loss is better lower
    assert found["noise=multires", "fit/loss"] == "worse"
    assert found["noise=ip", "fit/loss"] == "within noise"
    assert found["noise=ip", "val/loss"] == "no value"  # never logged by noise=ip
    assert found["noise=offset", "img/luminance_mean"] == "higher"  # no better direction: the change is said
    assert not any(v == BASELINE for v, _ in found)  # the baseline's row says it is the baseline
    assert "baseline: every difference is from this variant" in report["html"]
    assert report["html"].index("id='verdicts'") < report["html"].index("<h2>2. ")  # the first section
    assert "id='forest'" in report["html"] and (report["path"].parent / "forest.png").stat().st_size > 10_000
    logged = {a.path for a in report["client"].list_artifacts(report["parent"], "report")}
    assert {"report/report.html", "report/forest.png"} <= logged


def test_a_scorecard_metric_is_compared_like_the_yardstick(report):
    found = cells(report["html"])
    assert found[DIVERSE, "img/diversity"] == "better"  # 0.50 against 0.10 at step 8; diversity is max
    assert found["noise=multires", "img/diversity"] == "within noise"
    summary = json.loads(re.search(r'id="lora-sweep-summary">(.*?)</script>', report["html"], re.S).group(1))
    assert "img/diversity" in [m["key"] for m in summary["metrics"]]
    offset = next(v for v in summary["variants"] if v["name"] == DIVERSE)
    assert offset["vs_baseline"]["img/diversity"]["effect"] == pytest.approx(0.40)
    pair = next(p for p in summary["one_knob_pairs"] if {p["a"], p["b"]} == {BASELINE, DIVERSE})
    assert abs(pair["effects"]["img/diversity"]["effect"]) == pytest.approx(0.40)


def test_verdict_words_follow_the_direction_and_the_interval():
    entry = {"comparable": True, "verdict": "different", "effect": -0.1}
    assert verdict(entry, "fit/loss") == "better" and verdict(entry, "img/clip_t") == "worse"
    assert verdict(entry, "img/edge_energy") == "lower"
    assert verdict({**entry, "verdict": "within noise"}, "fit/loss") == "within noise"
    assert verdict({**entry, "verdict": "no difference"}, "fit/loss") == "within noise"
    assert verdict({**entry, "verdict": "no interval"}, "fit/loss") == "no interval"
    assert verdict({"comparable": False, "reason": "different sample prompts"}, "img/clip_t") == "no value"
    assert verdict(None, "fit/loss") == "no value"


def test_a_repeated_note_is_said_once_under_its_table():
    runs = [make_run(f"noise={name} train.seed={s}", s, final + 0.01 * s, **{"noise.offset": offset})
            for name, offset, final in (("none", "0.0", 0.5), ("offset", "0.1", 1.1), ("pyramid", "0.2", 1.2))
            for s in (1, 2, 3)]  # two variants' fit/loss never decreased: their fit/steps_to_half cells say why
    data = ReportData(title="t", subtitle="s", step=None, image_keys=[], column_titles={}, variants=runs)
    text = visible_text(render_html(data, {}, build_summary(data)))
    assert text.count("the final fit/loss is not below its start") == 1
    assert text.count("noise=offset: did not decrease") == 1  # its "no value" cells' note, said once
    assert text.count("n = 3") == text.count("n = 3 · seeds 1, 2, 3")  # in the heads, not in every cell


def test_the_matrix_and_the_best_steps_are_above_the_fold(report, tmp_path):
    binary, why = find_or_install_chromium()
    if binary is None:
        pytest.skip(why)
    probe = tmp_path / "probe.html"
    long_note = "fit/loss not finite from step 2 on (diverged): no later checkpoint is usable"  # wraps in its cell
    page = report["html"].replace("still improving: train longer</span>", f"{long_note}</span>", 1)
    assert long_note in page
    probe.write_text(page.replace("</body>", POSITIONS_JS + "</body>"), encoding="utf-8")
    size = f"--window-size={SCREEN[0]},{SCREEN[1]}"
    dom = run_chromium(binary, probe.as_uri(), tmp_path / "profile", window=size)
    found = json.loads(re.search(r"<pre id=\"positions\">(.*?)</pre>", dom, re.S).group(1))
    assert found["verdicts"] <= SCREEN[1] and found["right"] <= SCREEN[0], found  # no horizontal scrollbar
    assert len(found["best"]) == 4 and max(found["best"]) <= SCREEN[1], found  # each variant's best step
    text = visible_text(dom)
    assert "best checkpoint by fit/loss (min)" in text and long_note in text
    shot = tmp_path / "report.png"  # the pytest tmp dir keeps the screenshot as the test's artefact
    run_chromium(binary, report["path"].as_uri(), tmp_path / "profile", screenshot=shot, window=size)
    assert 10_000 < shot.stat().st_size < 300_000  # docs/images/report.png, the README's picture, is a copy
