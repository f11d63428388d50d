"""kohya prompt-file parsing."""

from __future__ import annotations

import re

import pytest

from lora_sweep.errors import UserError
from lora_sweep.sampling.prompts import PromptSpec, check_prompts, parse_prompt_line, round_size


def specs_of(*args, **kwargs) -> list[PromptSpec]:
    specs, problems, _ = check_prompts(*args, **kwargs)
    assert problems == []
    return specs


def problems_of(*args, **kwargs) -> str:
    return "\n".join(check_prompts(*args, **kwargs)[1])


def test_inline_options_are_parsed():
    spec = parse_prompt_line(
        "a cat on a sofa, best quality --w 1024 --h 768 --d 42 --s 28 --l 6.5 --n blurry, lowres",
        index=0,
    )
    assert spec == PromptSpec(
        prompt="a cat on a sofa, best quality", negative="blurry, lowres",
        width=1024, height=768, seed=42, steps=28, cfg=6.5,
    )


def test_defaults_and_seed_per_index():
    specs = specs_of(["first", "second --d 7", "third"], default_width=64, default_height=96,
                     default_steps=4, default_cfg=3.0, default_seed=100, default_negative="ugly")
    assert [s.seed for s in specs] == [100, 7, 102]
    assert all((s.width, s.height, s.steps, s.cfg, s.negative) == (64, 96, 4, 3.0, "ugly") for s in specs)
    # Same input, same seeds: every variant draws the same noise.
    assert specs_of(["first", "second --d 7", "third"], default_seed=100) == specs_of(
        ["first", "second --d 7", "third"], default_seed=100)


def test_kohya_rounding_clamping_and_case():
    spec = parse_prompt_line("x --W 1000 --H 30 --S 5000 --L 7", index=0)
    assert (spec.width, spec.height, spec.steps, spec.cfg) == (1000, 64, 1000, 7.0)
    assert spec.changed == ("--h 30 used as 64", "--s 5000 used as 1000")
    assert round_size(1023) == 1016 and round_size(8) == 64
    assert parse_prompt_line("x --s 0", index=0).steps == 1
    assert parse_prompt_line("x --w 1024 --s 30", index=0).changed == ()


def test_values_kohya_changes_are_warned_naming_the_file_line_and_value_used(tmp_path):
    """`--s 0`, `--w 65 --h 10` are sampled at 64x64 / 1 step, and a warning says so."""
    from lora_sweep.sampling.prompts import check_prompts

    path = tmp_path / "p.txt"
    path.write_text("a car --h 0 --s 0\na car --w 65 --h 10 --l 3\na car --w 512 --h 512\n", encoding="utf-8")
    specs, problems, (fallback,) = check_prompts(prompt_file=path)
    assert not problems and [(s.width, s.height, s.steps) for s in specs] == [(1024, 64, 1), (64, 64, 30),
                                                                              (512, 512, 30)]
    assert fallback.setting == "sampling.prompt_file"
    assert fallback.paths == (f"{path}, line 1 (--h 0 used as 64, --s 0 used as 1)",
                              f"{path}, line 2 (--w 65 used as 64, --h 10 used as 64)")
    assert fallback.line().startswith("sampling.prompt_file: 2 prompt lines with --w/--h/--s values changed the way "
                                      "kohya does (sizes down to a multiple of 8, at least 64; steps 1 to 1000)")
    _, _, (listed,) = check_prompts(["fine", "odd --w 1020"])
    assert listed.setting == "sampling.prompts" and listed.paths == ("sampling.prompts[1] (--w 1020 used as 1016)",)


def test_negative_values_are_refused_as_kohya_cannot_use_them(tmp_path):
    """kohya v0.8.7's patterns take digits only: `--h -64` / `--l -3` match nothing and kohya samples with its
    defaults without a word; lora-sweep refuses them, naming the line, the option and what is accepted."""
    from lora_sweep.sampling.prompts import check_prompts

    path = tmp_path / "p.txt"
    path.write_text("a car --h -64 --s 0\na car --w 65 --h 10 --l -3 --d -1 --s -2\na car --h -0\n",
                    encoding="utf-8")
    specs, problems, _ = check_prompts(prompt_file=path)
    where = f"sampling.prompt_file '{path}', line"
    assert specs == [] and [p.split(" is negative; give ")[0] for p in problems] == [
        f"{where} 1: option '--h -64' in 'a car --h -64 --s 0'",
        f"{where} 2: option '--l -3' in 'a car --w 65 --h 10 --l -3 --d -1 --s -2'",
        f"{where} 2: option '--d -1' in 'a car --w 65 --h 10 --l -3 --d -1 --s -2'",
        f"{where} 2: option '--s -2' in 'a car --w 65 --h 10 --l -3 --d -1 --s -2'",
        f"{where} 3: option '--h -0' in 'a car --h -0'"]  # a signed zero is not a size either
    assert "give a height of at least 64 (a multiple of 8)" in problems[0] and "CFG scale of 0 or more" in problems[1]
    assert "1 to 1000 steps" in problems[3]


def test_sample_sizes_above_4096_are_warned_not_refused(tmp_path):
    """`--w 100000 --h 100000` gets a warning from the pre-flight, rather than an out-of-memory later."""
    from lora_sweep.sampling.prompts import check_prompts

    path = tmp_path / "p6.txt"
    path.write_text("a car --w 100000 --h 100000\na car --w 4096 --h 4096\n", encoding="utf-8")
    specs, problems, (fallback,) = check_prompts(prompt_file=path)
    assert not problems and (specs[0].width, specs[0].height) == (100000, 100000)
    assert fallback.paths == (f"{path}, line 1 (100000x100000)",)
    assert "sample side above 4096 px: sampled as given (kohya allows it)" in fallback.line()
    assert specs[0].where == f"sampling.prompt_file '{path}', line 1"  # the sampler names it if memory runs out


def test_option_order_and_negative_in_the_middle():
    spec = parse_prompt_line("a dog --n bad hands --d 3", index=0)
    assert (spec.prompt, spec.negative, spec.seed) == ("a dog", "bad hands", 3)


def test_ignored_kohya_options():
    spec = parse_prompt_line("a dog --cn hint.png --d 3", index=0)
    assert spec.seed == 3


def test_ss_picks_the_prompts_sampler_and_a_bad_name_is_named():
    assert parse_prompt_line("a dog --ss euler_a --d 3", index=0).sampler == "euler_a"
    assert parse_prompt_line("a dog", index=0, default_sampler="ddim").sampler == "ddim"
    assert parse_prompt_line("a dog", index=0).sampler is None  # SDXL base's Euler
    with pytest.raises(UserError, match=r"sampling.prompts\[0\]: option '--ss Euler_A' in 'a dog --ss Euler_A': "
                       r"'Euler_A' is not a kohya sampler. Did you mean 'euler_a'\?"):
        parse_prompt_line("a dog --ss Euler_A", index=0)


def test_prompt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\nfirst --d 1\n   # indented comment\nsecond --w 512\n", encoding="utf-8")
    specs = specs_of(prompt_file=path, default_seed=10)
    assert [(s.prompt, s.seed, s.width) for s in specs] == [("first", 1, 1024), ("second", 11, 512)]
    # A path given as sampling.prompts itself works too; a file plus a list concatenates (file first).
    assert specs_of(str(path), default_seed=10) == specs
    both = specs_of(["third"], prompt_file=path)
    assert [s.prompt for s in both] == ["first", "second", "third"]


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("a cat --x 3", "unknown option '--x'"),
        ("a cat --w big", "needs a number"),
        ("a cat --d", "needs a number"),
        (" --w 512", "no prompt text"),
    ],
)
def test_bad_lines_raise_user_errors(line, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_prompt_line(line, index=0)


def test_bad_sources_raise_user_errors(tmp_path):
    assert "does not exist" in problems_of(prompt_file=tmp_path / "missing.txt")
    (tmp_path / "p.toml").write_text("x")
    assert "not a .txt" in problems_of(prompt_file=tmp_path / "p.toml")
    assert problems_of(prompt_file=tmp_path).endswith("does not exist (it is a folder).")  # not also "not a .txt"
    assert "no prompts" in problems_of(["# only a comment", "  "])
    assert "one prompt file" in problems_of("a.txt", prompt_file="b.txt")


def test_label_is_short():
    spec = PromptSpec(prompt="word " * 30, seed=5)
    assert spec.label(3).startswith("p03 s5: ") and len(spec.label(3)) < 60


def test_prompt_file_problems_name_the_setting_file_and_line_all_at_once(tmp_path):
    from lora_sweep.sampling.prompts import check_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\na cat\na tree --seed 7\na dog --w wide\n", encoding="utf-8")
    specs, problems, _ = check_prompts(prompt_file=path)
    assert [s.prompt for s in specs] == ["a cat"]
    assert problems[0].startswith(f"sampling.prompt_file '{path}', line 4: unknown option '--seed'")
    assert problems[1].startswith(f"sampling.prompt_file '{path}', line 5: option '--w wide'")
    _, listed, _ = check_prompts(["fine", "bad --zz 1"])
    assert listed[0].startswith("sampling.prompts[1]: unknown option '--zz'")


def test_single_dash_options_stay_in_the_prompt_with_a_warning(tmp_path):
    from lora_sweep.sampling.prompts import check_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("a dog -w 640 -h 1280 -s 16\na well-lit room, a t-shirt\n", encoding="utf-8")
    specs, problems, fallbacks = check_prompts(prompt_file=path)
    assert not problems and specs[0].prompt == "a dog -w 640 -h 1280 -s 16" and specs[0].width == 1024
    assert len(fallbacks) == 1 and fallbacks[0].setting == "sampling.prompt_file"
    assert fallbacks[0].paths == (f"{path}, line 1 (-w -h -s)",)  # hyphenated words are not options
    assert "--w 640 --h 1280 --s 16" in fallbacks[0].hint


def test_prompt_file_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a cat\n\xef\xbb\xbfok\nartist\x92s room\n")
    assert re.match(r"sampling.prompt_file '.*prompts.txt', line 3: not valid UTF-8", problems_of(prompt_file=path))


def test_an_empty_prompt_source_names_the_setting_that_turns_sampling_off(tmp_path):
    from lora_sweep.sampling.prompts import check_prompts

    path = tmp_path / "p.txt"
    path.write_text("# only comments\n\n", encoding="utf-8")
    _, (problem,), _ = check_prompts(prompt_file=path)
    assert problem == (f"sampling.prompt_file ('{path}'): no prompts found (only blank or # comment lines). Give at "
                       "least one prompt line, or set sampling.prompt_file=null to sample nothing.")
    _, (problem,), _ = check_prompts(["# a comment"])
    assert problem.endswith("or set sampling.prompts=[] to sample nothing.")


def test_every_bad_option_of_a_prompt_line_is_named_not_the_first(tmp_path):
    """Line 8 `a house --d 1.5 --l notnum --n`: every bad option is named, not only `--d 1.5`."""
    from lora_sweep.sampling.prompts import check_prompts

    path = tmp_path / "p.txt"
    path.write_text("a cat\n" * 7 + "a house --d 1.5 --l notnum --n\n")
    _, problems, _ = check_prompts([], prompt_file=str(path))
    where = f"sampling.prompt_file '{path}', line 8: option"
    assert problems == [f"{where} '--d 1.5' in 'a house --d 1.5 --l notnum --n' needs a number (--w/--h/--d/--s take "
                        "whole numbers, --l a decimal).",
                        f"{where} '--l notnum' in 'a house --d 1.5 --l notnum --n' needs a number (--w/--h/--d/--s "
                        "take whole numbers, --l a decimal)."]


def test_an_emphasis_weight_that_is_no_number_names_the_line_and_the_text(tmp_path):
    """v0.8.7 stops sampling at `(red:1.2.3)`; here the check names the line and which text holds it."""
    path = tmp_path / "p.txt"
    path.write_text("a (red:1.5) cat\na (red:1.2.3) cat --n (blurry:.)\n", encoding="utf-8")
    specs, problems, _ = check_prompts(prompt_file=path)
    assert [s.prompt for s in specs] == ["a (red:1.5) cat"]
    where = f"sampling.prompt_file '{path}', line 2"
    tail = "; write a number, e.g. '(red:1.2)', or '\\(' for a literal bracket. (kohya v0.8.7 stops sampling with an " \
           "error there.)"
    assert problems == [f"{where}: the emphasis weight '1.2.3' is not a number (in the prompt 'a (red:1.2.3) cat')"
                        + tail,
                        f"{where}: the emphasis weight '.' is not a number (in the negative prompt '(blurry:.)')"
                        + tail]
