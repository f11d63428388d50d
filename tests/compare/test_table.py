"""The article's table, rebuilt from the composed experiments, must equal the article's values (one test per column)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_config

from lora_sweep.compare.table import ROWS, build_table, experiment_names, render

# The article's table, verbatim: test data, not a source for the code.
ARTICLE = {
    "precision":                 "fp8 fp8 fp8 fp8 fp8 fp8 fp8 fp8 fp8 fp8 fp8 fp16",
    "optimizer":                 "DAP L8 DAP DAP DAP DAP DAP DAP Pg Pg DAP DAP",
    "min-SNR gamma":             "5 x x x 5 5 5 5 5 5 5 5",
    "debiased estimation loss":  "x v v v x x x x x x x x",
    "noise offset":              "0.0357 x x x 0.0357 x x x 0.0357 0.0357 x x",
    "multires noise iterations": "x x x x x 10 x 6 x x x 6",
    "IP noise gamma":            "x x x x 0.1 0.1 0.1 0.1 0.1 0.1 0.1 0.1",
    "huber_c":                   "x x 0.01 0.05 x x 0.08 x x x x x",
    "BS":                        "4 4 4 4 4 4 4 4 2 2 4 4",
    "gradient accumulation":     "1 1 1 1 1 1 1 1 2 2 4 1",
}
VARIANTS = [f"v{n}" for n in range(53, 65)]


def test_experiments_are_the_articles_twelve():
    assert experiment_names() == VARIANTS


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_column_matches_the_article(variant):
    cfg = compose_config(f"experiment={variant}")
    column = VARIANTS.index(variant)
    for label, get in ROWS:
        assert get(cfg) == ARTICLE[label].split()[column], f"{variant}: {label}"
    # What the article holds fixed, and the semantics behind the abbreviations.
    assert cfg.tracking.variant == variant
    assert cfg.data.resolution == 2048 and cfg.data.bucket_reso_steps == 32 and cfg.data.bucket_no_upscale
    assert cfg.noise.multires_discount == 0.3
    if cfg.loss.type == "huber":
        assert cfg.loss.huber_schedule == "snr"
    assert cfg.sampling.prompt_file.endswith("v53-v60.txt" if column < 8 else "v61-v64.txt")
    # a file shipped with lora-sweep: found from any launch folder, not relative to it
    assert Path(cfg.sampling.prompt_file).is_absolute() and Path(cfg.sampling.prompt_file).is_file()


def test_table_command_prints_the_articles_table():
    out = subprocess.run([sys.executable, "-m", "lora_sweep", "table", "--format", "csv"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    lines = [line.split(",") for line in out.strip().splitlines()]
    assert lines[0] == ["parameter", *VARIANTS]
    assert {row[0]: " ".join(row[1:]) for row in lines[1:]} == ARTICLE


def test_markdown_render_has_a_row_per_parameter():
    header, rows = build_table(["v53", "v64"])
    text = render(header, rows, "markdown")
    assert text.splitlines()[0].startswith("| parameter") and len(text.splitlines()) == 2 + len(ARTICLE)


def test_an_unknown_experiment_is_one_line_naming_the_known_ones():
    out = subprocess.run([sys.executable, "-m", "lora_sweep", "table", "v99"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stdout == ""
    assert out.stderr.startswith("error: no experiment v99 in conf/experiment/; the experiments are: article,")
