"""Captions processed as kohya sd-scripts v0.8.7 processes them: order, Python-random draws, epoch and step seen."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from lora_sweep.data.captions import fixed_caption, process_caption, seen_position
from lora_sweep.data.subsets import Subset

PLAIN = Subset(Path("img"), "data.dir '1_x'")


def process(caption: str, rng: random.Random, *, epoch: int = 1, step: int = 0, max_train_steps: int = 100,
            **options) -> str:
    return process_caption(caption, replace(PLAIN, **options), epoch=epoch, step=step,
                           max_train_steps=max_train_steps, rng=rng)


def test_reference_verified_examples():
    # the outputs of v0.8.7's own process_caption, with Python's random seeded 0
    assert process("sks dog, red, ball,  grass,", random.Random(0), shuffle_caption=True,
                   keep_tokens=1) == "sks dog, grass, red, ball, "
    assert process("a, b ||| c, d;;;e, f ||| g", random.Random(0), shuffle_caption=True, keep_tokens_separator="|||",
                   secondary_separator=";;;") == "a, b, c, f, d,e, g"
    tags = ", ".join(f"t{i}" for i in range(10))
    # 0.5 of 100 steps is 50; at step 10: floor(10 * (10 - 1) / 50) + 1 = 2 tags
    assert process(tags, random.Random(0), step=10, token_warmup_step=0.5, token_warmup_min=1) == "t0, t1"


def test_a_dropped_caption_loses_prefix_and_suffix_and_draws_nothing_more():
    options = dict(caption_prefix="pre", caption_suffix="suf", caption_dropout_rate=0.5, shuffle_caption=True,
                   caption_tag_dropout_rate=0.5, enable_wildcard=True, secondary_separator=";;;")
    seed = next(s for s in range(100) if random.Random(s).random() < 0.5)  # a draw that drops
    rng, twin = random.Random(seed), random.Random(seed)
    assert process("{a|b}, c, d", rng, **options) == ""
    twin.random()
    assert rng.getstate() == twin.getstate()
    # the epoch rule draws nothing: 0 % 2 == 0 drops, 1 % 2 does not
    rng = random.Random(0)
    assert process("x", rng, epoch=0, caption_prefix="pre", caption_dropout_every_n_epochs=2) == ""
    assert rng.getstate() == random.Random(0).getstate()
    assert process("x", rng, epoch=1, caption_prefix="pre", caption_dropout_every_n_epochs=2) == "pre x"


def test_every_draw_in_v087_order():
    options = dict(caption_prefix="p", enable_wildcard=True, caption_dropout_rate=0.1, shuffle_caption=True,
                   keep_tokens=1, caption_tag_dropout_rate=0.3)
    seed = next(s for s in range(100) if random.Random(s).random() >= 0.1)  # a draw that keeps
    rng, twin = random.Random(seed), random.Random(seed)
    out = process("{red|blue} car, tree, {sun|moon}, sky\nsecond line, x", rng, **options)
    twin.random()  # dropout decision
    line = twin.choice(["p {red|blue} car, tree, {sun|moon}, sky", "second line, x"])
    if line.startswith("p"):
        line = line.replace("{red|blue}", twin.choice(["red", "blue"]))
        line = line.replace("{sun|moon}", twin.choice(["sun", "moon"]))
    tags = [t.strip() for t in line.split(",")]
    flex = tags[1:]
    twin.shuffle(flex)
    flex = [t for t in flex if twin.random() >= 0.3]  # tag dropout after the shuffle, one draw per tag
    assert out == ", ".join(tags[:1] + flex)
    assert rng.getstate() == twin.getstate()


def test_separator_join_empty_tags_and_untouched_captions():
    rng, twin = random.Random(3), random.Random(3)
    flex = ["x", "y", "z"]
    twin.shuffle(flex)
    assert process("x;y;z", rng, shuffle_caption=True, caption_separator=";") == ", ".join(flex)
    # a trailing comma is an empty tag in the keep_tokens path (also when keep_tokens_separator is set but absent)
    assert process("a, b,", random.Random(0), caption_tag_dropout_rate=1e-9, keep_tokens=1,
                   keep_tokens_separator="|||") == "a, b, "
    # ...and dropped in the separator path
    assert process("a, ||| b,, c ,", random.Random(0), caption_tag_dropout_rate=1e-9,
                   keep_tokens_separator="|||") == "a, b, c"
    # no tag option: no split, no re-join, only the secondary separator replaced (bare, no space)
    assert process(" a ,b;;;c,,  d ", random.Random(0), secondary_separator=";;;") == " a ,b,c,,  d "
    assert process("first\nsecond", random.Random(0), caption_suffix="s") == "first"


def test_wildcards_lines_and_escapes():
    rng, twin = random.Random(5), random.Random(5)
    out = process("{{lit}} {a|b|c} {one}\nother {x|y}", rng, enable_wildcard=True)
    line = twin.choice(["{{lit}} {a|b|c} {one}", "other {x|y}"])
    expected = (f"{{lit}} {twin.choice(['a', 'b', 'c'])} {twin.choice(['one'])}" if line.startswith("{{")
                else f"other {twin.choice(['x', 'y'])}")
    assert out == expected and rng.getstate() == twin.getstate()
    # no nesting: the pattern ends at the first "}", and a closing "}}" reads as an escaped brace
    assert process("{a|{b|c} d}", random.Random(0), enable_wildcard=True) in {"a d}", "{b d}", "c d}"}
    assert process("{a|{b|c}}", random.Random(0), enable_wildcard=True) == "{a|{b|c}"
    assert process("a { b", random.Random(0), enable_wildcard=True) == "a { b"


def test_token_warmup_is_in_caption_order_and_repeatable():
    tags = ", ".join(f"t{i}" for i in range(6))
    subset = replace(PLAIN, token_warmup_step=0.5, token_warmup_min=2)
    for _ in range(2):  # v0.8.7 rewrites the fraction into its subset; the result is the same each call
        out = process_caption(tags, subset, epoch=1, step=5, max_train_steps=20, rng=random.Random(0))
        assert out == "t0, t1, t2, t3"  # floor(5 * (6 - 2) / 10) + 2 = 4
    assert subset.token_warmup_step == 0.5
    # at or past the warmup every tag is there; a whole number of steps is used as given
    assert process(tags, random.Random(0), step=10, max_train_steps=20, token_warmup_step=0.5) == tags
    assert process(tags, random.Random(0), step=0, token_warmup_step=4, token_warmup_min=1) == "t0"


def test_fixed_caption_only_when_nothing_draws_or_reads_epoch_or_step():
    assert fixed_caption("a;;;b", replace(PLAIN, caption_prefix="p", caption_suffix="s",
                                          secondary_separator=";;;")) == "p a,b s"
    assert fixed_caption("line one\nline two", PLAIN) == "line one"
    assert fixed_caption("no braces", replace(PLAIN, enable_wildcard=True)) == "no braces"
    for options in (dict(caption_dropout_rate=0.1), dict(caption_dropout_every_n_epochs=3),
                    dict(shuffle_caption=True), dict(token_warmup_step=10), dict(caption_tag_dropout_rate=0.1)):
        assert fixed_caption("a, b", replace(PLAIN, **options)) is None, options
    assert fixed_caption("{a|b}", replace(PLAIN, enable_wildcard=True)) is None
    assert fixed_caption("a\nb", replace(PLAIN, enable_wildcard=True)) is None


@pytest.mark.parametrize(("batches", "accum", "expected"), [
    # the true global step at each micro-batch is e * ceil(B / accum) + j // accum
    (4, 1, [(0, 0), (1, 0), (1, 0), (1, 0), (1, 1), (2, 3), (2, 3), (2, 4)]),
    (5, 2, [(0, 0), (1, 0), (1, 0), (1, 0), (1, 0), (1, 1), (2, 2), (2, 2), (2, 3), (2, 3)]),
    (1, 1, [(0, 0), (1, 0), (2, 0), (3, 1)]),
])
def test_seen_position_table(batches, accum, expected):
    epochs = len(expected) // batches
    assert [seen_position(e, j, batches, accum) for e in range(epochs) for j in range(batches)] == expected


def test_seen_position_epoch_rule_drops_the_very_first_batch():
    epoch, _ = seen_position(0, 0, 10, 1)
    assert process("x", random.Random(0), epoch=epoch, caption_dropout_every_n_epochs=5) == ""
    assert [seen_position(e, 0, 10, 1)[0] for e in range(3)] == [0, 1, 2]  # each epoch's first batch lags one
    assert [seen_position(e, 1, 10, 1)[0] for e in range(3)] == [1, 2, 3]


def test_seen_position_matches_accelerate_dataloader_and_kohya_loop():
    """kohya's loop (shared epoch/step copied by the collate) over accelerate's one-batch-ahead DataLoaderShard."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    class Dataset(torch.utils.data.Dataset):
        def __init__(self, length):
            self.length, self.current_epoch, self.current_step, self.seen = length, 0, 0, []

        def __len__(self):
            return self.length

        def __getitem__(self, index):
            self.seen.append((self.current_epoch, self.current_step))
            return index

    try:
        for batches in (1, 2, 3, 5):
            for accum in (1, 2, 3):
                AcceleratorState._reset_state(True)
                GradientState._reset_state()
                accelerator = Accelerator(gradient_accumulation_steps=accum, cpu=True)
                dataset, shared = Dataset(batches), {"epoch": 0, "step": 0}

                def collate(examples, dataset=dataset, shared=shared):
                    dataset.current_epoch, dataset.current_step = shared["epoch"], shared["step"]
                    return examples[0]

                model, loader = accelerator.prepare(
                    torch.nn.Linear(1, 1), torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate))
                global_step = 0
                for epoch in range(3):
                    shared["epoch"] = epoch + 1
                    for _ in loader:
                        shared["step"] = global_step
                        with accelerator.accumulate(model):
                            pass
                        global_step += accelerator.sync_gradients
                expected = [seen_position(e, j, batches, accum) for e in range(3) for j in range(batches)]
                assert dataset.seen == expected, (batches, accum)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
