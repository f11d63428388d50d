"""A real browser on the real pages: `mlflow server` (started by lora_sweep.tracking.ui) over a test store, and the
report.

Headless Chromium (Debian's `chromium` package; installed here with apt-get when missing and possible, otherwise
the test is skipped with the reason) renders MLflow 3's JavaScript app; `--dump-dom` after a virtual-time budget
gives the rendered DOM to assert on, `--screenshot` the pictures, which are kept under test-artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from cluster_fixtures import free_port
from conftest import new_store
from test_report import VARIANTS, fill_store

from lora_sweep.compare.report import build_report
from lora_sweep.tracking.store import EXPERIMENT_KIND_TAG, experiment_id
from lora_sweep.tracking.ui import experiment_page, running_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=15000"]
WINDOW = "--window-size=1400,900"


def find_or_install_chromium() -> tuple[str | None, str]:
    """(path, why not): Debian's chromium, installed with apt-get if missing and we are root."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "chromium is not installed and apt-get is unavailable (not root?): apt-get install chromium"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            subprocess.run(command, check=True, capture_output=True, timeout=900, env=env)
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"could not install chromium with apt-get ({exc})"
    path = shutil.which("chromium")
    return path, "" if path else "apt-get installed chromium but no chromium binary is on PATH"


@pytest.fixture(scope="module")
def chromium() -> str:
    path, why = find_or_install_chromium()
    if path is None:
        pytest.skip(why)
    return path


def run_chromium(binary: str, url: str, profile: Path, *, screenshot: Path | None = None, window: str = WINDOW) -> str:
    """One headless page load in a `window` ('--window-size=W,H'): the rendered DOM (stdout), or a screenshot.
    Chromium's helper processes share its session, which is killed as a whole if the load hangs."""
    action = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    process = subprocess.Popen([binary, *CHROMIUM_FLAGS, window, f"--user-data-dir={profile}", *action, url],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return out


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_mlflow_ui_and_report_render_in_chromium(chromium, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    uri = new_store(tmp_path / "mlflow.db")
    store = fill_store(uri, tmp_path / "mlruns")
    exp_id = store["client"].get_experiment_by_name("lora-sweep").experiment_id
    report = build_report(sweep_run_id=store["parent"], out_dir=tmp_path / "report", tracking_uri=uri)

    assert experiment_id(store["client"], "lora-sweep") == exp_id  # tags the older experiment
    kind = store["client"].get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG]
    assert kind == "custom_model_development"  # what MLflow 3's UI calls "Model training"

    with running_server(uri, port=free_port(), log_path=tmp_path / "server.log") as server:
        experiment_url = experiment_page(uri, server.url, "lora-sweep")  # what `make ui` prints
        assert experiment_url.startswith(f"{server.url}/#/experiments/{exp_id}/runs")
        text = visible_text(run_chromium(chromium, experiment_url, tmp_path / "profile"))
        assert "lora-sweep" in text and "sweep" in text, text[:2000]
        assert "4 matching runs" in text, text[:2000]  # the parent and its three jobs (nested under it)
        assert "Run Name" in text and "Created" in text and "Duration" in text, text[:2000]  # the runs table
        assert "Token Usage" not in text and "Latency" not in text  # not the GenAI overview
        run_chromium(chromium, experiment_url, tmp_path / "profile", screenshot=ARTIFACTS / "ui_experiment.png")

        run_ids = quote(json.dumps(list(store["runs"].values())))
        compare_url = f"{server.url}/#/compare-runs?runs={run_ids}&experiments={quote(json.dumps([exp_id]))}"
        text = visible_text(run_chromium(chromium, compare_url, tmp_path / "profile"))
        assert all(name in text for name in VARIANTS), text[:2000]
        assert "noise.ip_gamma" in text and "img/cast_yb" in text
        run_chromium(chromium, compare_url, tmp_path / "profile", screenshot=ARTIFACTS / "ui_compare.png")
        group = server.process.pid
    with pytest.raises(ProcessLookupError):  # the whole server group is gone, workers included
        os.killpg(group, 0)

    dom = run_chromium(chromium, report.as_uri(), tmp_path / "profile")
    text = visible_text(dom)
    assert all(name in text for name in VARIANTS)
    assert "Parameters that differ" in text and "Final metrics" in text
    assert "One-knob effects" in text and "Fitting over the steps" in text
    # the numbers are in the rendered DOM as JSON, and what the table shows is what the JSON says
    block = re.search(r'<script type="application/json" id="lora-sweep-summary">(.*?)</script>', dom, re.S)
    summary = json.loads(block.group(1))
    assert [v["name"] for v in summary["variants"]] == list(VARIANTS) and summary["baseline"] == "v53"
    assert {(p["a"], p["b"]) for p in summary["one_knob_pairs"]} == {("v53", "v57"), ("v57", "v61")}
    assert "+0.005 (n = 1: no interval)" in text  # v57's val/loss vs v53: one run each, no interval made up
    run_chromium(chromium, report.as_uri(), tmp_path / "profile", screenshot=ARTIFACTS / "report.png")
    for name in ("ui_experiment.png", "ui_compare.png", "report.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000, name  # a blank page compresses to a few KB
