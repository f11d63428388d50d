"""Labels in a font that has their glyphs (CJK when one is installed), else by number: no box, no glyph warning."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import matplotlib
import pytest
from matplotlib import font_manager
from PIL import Image, ImageChops, ImageFont

from lora_sweep.compare.figures import curve_figure, drawable_labels
from lora_sweep.sampling.fonts import NO_GLYPH, font_file_for, has_glyphs, label_font
from lora_sweep.sampling.images import make_grid, prompts_grid
from lora_sweep.sampling.prompts import PromptSpec

DEJAVU = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")  # ships with matplotlib
CJK = "訓練された猫"
CYRILLIC = "кот на диване"


@pytest.fixture
def dejavu_only(monkeypatch):
    """matplotlib's font list holds DejaVu Sans alone: Latin and Cyrillic glyphs, no CJK."""
    monkeypatch.setattr(font_manager.fontManager, "ttflist", [])
    font_manager.fontManager.addfont(DEJAVU)


def test_pillows_default_font_draws_latin_only():
    font = ImageFont.load_default(size=12)
    assert has_glyphs("p00 s1: a cat", font) and not has_glyphs(CJK, font) and not has_glyphs(CYRILLIC, font)
    assert not has_glyphs(NO_GLYPH, font)


def test_a_font_from_matplotlibs_list_draws_what_pillows_cannot(dejavu_only):
    assert font_file_for(CYRILLIC) == DEJAVU and font_file_for(CJK) is None
    assert label_font("p00 s1: a cat", 12).getname() == ImageFont.load_default(size=12).getname()
    assert label_font(CYRILLIC, 12).path == DEJAVU and label_font(CJK, 12) is None
    images = [Image.new("RGB", (128, 128), (200, 200, 200))]
    drawn = prompts_grid(images, [PromptSpec(CYRILLIC, seed=1)])
    assert drawn.size == make_grid(images, rows=1, cols=1, labels=["x"]).size  # no caption line
    assert ImageChops.difference(drawn, make_grid(images, rows=1, cols=1, labels=["p00 s1"])).getbbox() is not None


def test_a_cjk_prompt_without_a_cjk_font_is_labelled_by_number_and_the_caption_says_so(dejavu_only, caplog):
    images = [Image.new("RGB", (128, 128), (200, 200, 200))] * 2
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        grid = prompts_grid(images, [PromptSpec(CJK, seed=1), PromptSpec("a cat", seed=1)])
    expected = make_grid(images, rows=1, cols=2, labels=["p00 s1", "p01 s1: a cat"], caption=(
        "p00: labelled by number (no font on this machine draws the prompt's characters); the prompts are in "
        "samples/prompts.json"))
    assert ImageChops.difference(grid, expected).getbbox() is None
    assert not caught and not caplog.records


def test_a_machine_cjk_font_draws_the_prompt():
    path = font_file_for(CJK)
    if path is None:
        pytest.skip("no font with CJK glyphs on this machine (Noto Sans CJK, Droid Sans Fallback, ...)")
    assert "Last Resort" not in font_manager.FontProperties(fname=path).get_name()
    assert label_font(f"p00 s1: {CJK}", 12).path == path


def test_the_placeholder_font_does_not_count():
    boxes = [entry for entry in font_manager.fontManager.ttflist if entry.name.startswith("Last Resort")]
    if not boxes:
        pytest.skip("no Last Resort font on this machine")
    assert font_file_for(CJK) != boxes[0].fname


class Run:
    def __init__(self, name: str):
        self.name, self.histories = name, {"fit/loss": [(0, 1.0), (10, 0.5)]}


def test_chart_legends_draw_cjk_or_number_the_variant_without_a_glyph_warning(dejavu_only, caplog):
    labels, font, note = drawable_labels([CJK, CYRILLIC, "plain"], [0, 1, 2])
    assert labels == ["#1", CYRILLIC, "plain"] and font.get_family()[0] == "DejaVu Sans"
    assert note == "#1: the report's variant of that number (no font on this machine draws its name)"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, logger="matplotlib"):
        warnings.simplefilter("always")
        png = curve_figure([Run(CJK), Run(CYRILLIC)], ["fit/loss"])
    assert png.startswith(b"\x89PNG")
    assert not [w for w in caught if "Glyph" in str(w.message)]
    assert not [r for r in caplog.records if "Glyph" in r.getMessage()]
