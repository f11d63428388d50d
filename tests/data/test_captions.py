"""kohya's caption file reading, caption shuffling, and the warning for kohya syntax left as text."""

from __future__ import annotations

import random

import pytest

from lora_sweep.data.captions import caption_path, caption_syntax_fallbacks, read_caption, shuffle_caption
from lora_sweep.data.dataset import ImageItem
from lora_sweep.data.subsets import Subset
from lora_sweep.errors import UserError


def test_read_caption_first_line_stripped(tmp_path):
    image = tmp_path / "a.png"
    (tmp_path / "a.txt").write_text("  sks dog, red ball  \r\nsecond line ignored\n", encoding="utf-8")
    assert read_caption(image) == "sks dog, red ball"


def test_read_caption_missing_file_is_none(tmp_path):
    assert read_caption(tmp_path / "a.png") is None
    (tmp_path / "a.caption").write_text("x", encoding="utf-8")
    assert read_caption(tmp_path / "a.png") is None  # default extension is .txt
    assert read_caption(tmp_path / "a.png", "caption") == "x"  # dot added, as kohya does
    assert caption_path(tmp_path / "dir.v2" / "a.b.png", ".txt").name == "a.b.txt"


def test_read_caption_bom_blank_first_line_and_empty_file(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffsks cat\n".encode("utf-8"))
    assert read_caption(tmp_path / "bom.jpg") == "sks cat"
    (tmp_path / "blank.txt").write_text("\nlater\n", encoding="utf-8")
    assert read_caption(tmp_path / "blank.jpg") == ""  # kohya uses the (empty) first line too
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        read_caption(tmp_path / "empty.jpg")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        read_caption(tmp_path / "latin.jpg")


def test_read_caption_with_wildcards_keeps_every_non_blank_line(tmp_path):
    (tmp_path / "a.txt").write_text(" one {x|y} \r\n\n  \ntwo\n", encoding="utf-8")
    assert read_caption(tmp_path / "a.png", enable_wildcard=True) == "one {x|y}\ntwo"
    assert read_caption(tmp_path / "a.png") == "one {x|y}"
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    assert read_caption(tmp_path / "blank.png", enable_wildcard=True) == ""


def test_read_caption_face_crop_name_falls_back_to_the_stem_without_four_tokens(tmp_path):
    (tmp_path / "img_01.txt").write_text("face crop", encoding="utf-8")
    assert read_caption(tmp_path / "img_01_120_80_64_64.png") == "face crop"
    assert read_caption(tmp_path / "img_01_120_80_64.png") is None  # four tokens: no fallback
    (tmp_path / "img_01_120_80_64_64.txt").write_text("own", encoding="utf-8")
    assert read_caption(tmp_path / "img_01_120_80_64_64.png") == "own"  # its own file first
    # tokens are counted in the file name only (v0.8.7 counts the folders' underscores too)
    folder = tmp_path / "10_a_b_c_d"
    folder.mkdir()
    (tmp_path / "10.txt").write_text("outside", encoding="utf-8")
    assert read_caption(folder / "x.png") is None


def test_syntax_left_as_text_is_one_fallback_per_option(tmp_path):
    folder = Subset(tmp_path / "10_x", "data.dir '10_x'")
    given = Subset(tmp_path / "set", "data.datasets[0].subsets[1]", caption_extension=".caption")
    wildcards_on = Subset(tmp_path / "w", "data.datasets[0].subsets[2]", enable_wildcard=True)
    separator_set = Subset(tmp_path / "k", "data.datasets[0].subsets[3]", keep_tokens_separator="|||")
    for subset, name, caption in [(folder, "a", "a ||| b"), (folder, "b", "{red|blue} car"), (given, "c", "x|||y"),
                                  (wildcards_on, "d", "{a|b} c"), (separator_set, "e", "a ||| b"),
                                  (folder, "f", "{braces} and a|b"), (given, "g", "{x|y}")]:
        subset.image_dir.mkdir(exist_ok=True)
        (subset.image_dir / f"{name}{subset.caption_extension}").write_text(caption, encoding="utf-8")
    items = [ImageItem(subset.image_dir / f"{name}.png", read_caption(subset.image_dir / f"{name}.png",
                                                                        subset.caption_extension), 1, (8, 8), subset)
             for subset, name in [(folder, "a"), (folder, "b"), (given, "c"), (wildcards_on, "d"),
                                  (separator_set, "e"), (folder, "f"), (given, "g")]]
    items.append(ImageItem(tmp_path / "10_x" / "h.png", "class ||| token", 1, (8, 8), folder))  # no caption file
    keep, wildcard = caption_syntax_fallbacks(items)
    assert keep.setting == "data.keep_tokens_separator"
    assert keep.paths == (str(tmp_path / "10_x" / "a.txt"), str(tmp_path / "set" / "c.caption"),
                          str(tmp_path / "10_x" / "h.png"))
    assert keep.line().startswith("data.keep_tokens_separator: 3 caption files with '|||' while "
                                  "data.keep_tokens_separator is empty: trained as literal text (kohya is silent): ")
    assert keep.hint == ("Set data.keep_tokens_separator='|||' and keep_tokens_separator='|||' in "
                         "data.datasets[0].subsets[1], or take '|||' out of the captions.")
    assert wildcard.setting == "data.enable_wildcard"
    assert wildcard.paths == (str(tmp_path / "10_x" / "b.txt"), str(tmp_path / "set" / "g.caption"))
    assert wildcard.hint.startswith("Set data.enable_wildcard=true and enable_wildcard=true in data.datasets[0]")
    assert caption_syntax_fallbacks(items[3:5]) == []


def test_shuffle_keeps_first_tokens_and_uses_rng():
    caption = "sks dog,  red ball ,grass, sunny,park"
    flex = ["red ball", "grass", "sunny", "park"]
    random.Random(7).shuffle(flex)
    expected = ", ".join(["sks dog"] + flex)
    assert shuffle_caption(caption, keep_tokens=1, rng=random.Random(7)) == expected
    results = {shuffle_caption(caption, keep_tokens=1, rng=random.Random(seed)) for seed in range(20)}
    assert len(results) > 1
    for result in results:
        tags = result.split(", ")
        assert tags[0] == "sks dog" and sorted(tags) == sorted(["sks dog", "red ball", "grass", "sunny", "park"])


def test_shuffle_custom_separator_and_empty_tags_kept():
    out = shuffle_caption("a;b;;c", keep_tokens=2, separator=";", rng=random.Random(0))
    tags = out.split(", ")
    assert tags[:2] == ["a", "b"] and sorted(tags[2:]) == ["", "c"]  # joined with ", ", empty tag kept


def test_shuffle_keep_tokens_separator_prefix_and_suffix():
    caption = "1girl, miku ||| stage, mic, , lights ||| best quality, general"
    for seed in range(5):
        tags = shuffle_caption(caption, keep_tokens=0, rng=random.Random(seed), keep_tokens_separator="|||").split(", ")
        assert tags[:2] == ["1girl", "miku"] and tags[-2:] == ["best quality", "general"]
        assert sorted(tags[2:-2]) == ["lights", "mic", "stage"]  # empty tag dropped in this branch


def test_shuffle_rejects_negative_keep_tokens():
    with pytest.raises(UserError, match="data.keep_tokens"):
        shuffle_caption("a, b", keep_tokens=-1, rng=random.Random(0))
