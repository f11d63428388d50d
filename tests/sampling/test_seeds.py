"""`sampling.seeds`: which samples a prompt list drawn at several seeds gives, their keys, the kohya export's
sample_prompts.txt, and the validation of the list."""

from __future__ import annotations

import pytest
from conftest import compose_config

from lora_sweep.checks.validate import config_problems
from lora_sweep.compare.runs import column_titles
from lora_sweep.kohya.export import prompts_text
from lora_sweep.sampling.images import sample_keys, seed_groups
from lora_sweep.training.evaluate import read_prompts


def test_several_seeds_draw_each_prompt_at_s_plus_i_and_a_fixed_seed_at_n_plus_k():
    cfg = compose_config("sampling.prompts=[a cat,a dog --d 100,a bird]", "sampling.seeds=[5,20]")
    specs, problems, _ = read_prompts(cfg)
    assert not problems
    assert [(s.prompt, s.seed) for s in specs] == [("a cat", 5), ("a cat", 20), ("a dog", 100), ("a dog", 101),
                                                   ("a bird", 7), ("a bird", 22)]
    assert sample_keys(specs, 2) == ["sample_p00_s5", "sample_p00_s20", "sample_p01_s100", "sample_p01_s101",
                                     "sample_p02_s7", "sample_p02_s22"]
    assert seed_groups(len(specs), 2) == [[0, 1], [2, 3], [4, 5]]
    one, _, _ = read_prompts(compose_config("sampling.prompts=[a cat,a dog]", "sampling.seed=3"))
    assert [s.seed for s in one] == [3, 4] and sample_keys(one) == ["sample_p00", "sample_p01"]  # today's keys
    single, _, _ = read_prompts(compose_config("sampling.prompts=[a cat,a dog]", "sampling.seeds=[9]"))
    assert [s.seed for s in single] == [9, 10]


def test_each_prompt_and_seed_is_one_kohya_sample_line_and_one_report_column():
    cfg = compose_config("sampling.prompts=[a cat --w 64 --h 64 --s 2 --l 7]", "sampling.seeds=[5,9]")
    assert prompts_text(cfg) == "a cat --w 64 --h 64 --d 5 --s 2 --l 7.0\na cat --w 64 --h 64 --d 9 --s 2 --l 7.0\n"
    specs = [{"prompt": "a cat", "seed": 5, "key": "sample_p00_s5"}, {"prompt": "a cat", "seed": 9,
                                                                       "key": "sample_p00_s9"}]
    assert column_titles(specs, ["sample_p00_s9"]) == {"sample_p00_s9": "p00 · seed 9: a cat"}
    assert column_titles([{"prompt": "a dog", "seed": 3}], ["sample_p00"]) == {"sample_p00": "p00 · seed 3: a dog"}


@pytest.mark.parametrize("seeds, says", [
    ("[7,7]", "7 given more than once"),
    ("[-1,3]", "-1 not in [0, 4294967295]"),
])
def test_a_bad_seed_list_is_refused_naming_the_setting(seeds, says):
    [problem] = config_problems(compose_config("sampling.prompts=[a cat]", f"sampling.seeds={seeds}"))
    assert problem.startswith("sampling.seeds: must be a list of distinct integer seeds") and says in problem
