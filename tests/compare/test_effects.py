"""How two variants are compared, on constructed runs: the basis of each difference (seeds, runs, evaluation points,
none), only finished runs in the numbers, and "not comparable" when the inputs differ."""

from __future__ import annotations

import pytest

from lora_sweep.compare.effects import (
    EVAL_NOISE_ONLY, NotComparable, difference, estimate, one_knob_pairs, present_metrics, run_value,
)
from lora_sweep.compare.summary import build_summary
from lora_sweep.compare.variants import VariantData, group_replicates

POINTS = [(f"1_photos/img{i}.png", t) for i in range(3) for t in (100, 500, 900)]


def make_run(name: str, seed: int, fit: float, *, status: str = "FINISHED", points_shift: float | None = None,
             **params: str) -> VariantData:
    """A run whose fit/loss falls from 1.0 to `fit` over 10 steps; per-point values = level + shift."""
    history = [(0, 1.0), (5, (1.0 + fit) / 2), (10, fit)]
    points = {} if points_shift is None else {
        "fit/loss": {p: 0.1 * i + points_shift for i, p in enumerate(POINTS)}}
    return VariantData(name=name, run_id=f"{name}{seed}".ljust(32, "0"), status=status,
                       params={"train.seed": str(seed), "tracking.variant": name, "validation.seed": "0", **params},
                       final_metrics={"fit/loss": fit}, histories={"fit/loss": history}, cells={}, cell_steps={},
                       tags={"variant": name}, points=points)


def groups_of(*runs):
    return group_replicates(list(runs))


def test_replicates_pair_over_seeds_and_separate_a_real_effect():
    a = [make_run("a", s, 0.50 + 0.01 * s) for s in (1, 2, 3)]
    b = [make_run("b", s, 0.60 + 0.01 * s + 0.001 * (s % 2), **{"noise.offset": "0.1"}) for s in (1, 2, 3)]
    ga, gb = groups_of(*a, *b)
    found = difference(ga, gb, "fit/loss")
    assert found.basis == "paired over 3 seeds" and found.verdict == "different"
    assert found.effect == pytest.approx(0.1 + 0.002 / 3, abs=1e-9)
    same = difference(ga, groups_of(*[make_run("c", s, 0.50 + 0.01 * s, **{"noise.offset": "0.1"})
                                      for s in (1, 2, 3)])[0], "fit/loss")
    assert same.verdict == "no difference" and same.effect == 0.0  # identical replicates: not "within noise"
    assert estimate(ga, "fit/loss").n == 3 and estimate(ga, "fit/loss").has_interval


def test_without_common_seeds_the_difference_is_unpaired():
    ga, gb = groups_of(make_run("a", 1, 0.5), make_run("a", 2, 0.52),
                       make_run("b", 3, 0.7, **{"noise.offset": "0.1"}), make_run("b", 4, 0.71, **{"noise.offset": "0.1"}))
    assert difference(ga, gb, "fit/loss").basis == "unpaired, 2 + 2 runs"


def test_one_run_each_pairs_over_the_evaluation_points_and_says_what_that_holds():
    ga, gb = groups_of(make_run("a", 1, 0.5, points_shift=0.0),
                       make_run("b", 1, 0.6, points_shift=0.05, **{"noise.offset": "0.1"}))
    found = difference(ga, gb, "fit/loss")
    assert found.basis == "paired over 9 (image, t, eps) points" and found.note == EVAL_NOISE_ONLY
    assert found.effect == pytest.approx(0.05) and found.verdict == "different"
    bare = difference(*groups_of(make_run("a", 1, 0.5), make_run("b", 1, 0.6, **{"noise.offset": "0.1"})),
                      "fit/loss")
    assert bare.verdict == "no interval" and bare.effect == pytest.approx(0.1) and "n = 1" in bare.note
    assert estimate(ga, "fit/loss").low is None


def test_unfinished_runs_stay_out_of_the_numbers():
    runs = [make_run("a", 1, 0.5), make_run("a", 2, 0.52), make_run("a", 3, 0.9, status="FAILED")]
    (group,) = groups_of(*runs)
    assert group.n == 3 and len(group.finished) == 2 and estimate(group, "fit/loss").mean == pytest.approx(0.51)
    summary = build_summary(type("D", (), {"groups": [group], "step": None, "baseline": 0, "title": "t",
                                           "experiment": "e", "sweep_run_id": None, "tracking_uri": "",
                                           "notes": []})())
    assert any("1 of 3 runs did not finish" in note for note in summary["notes"])


def test_different_inputs_are_not_comparable():
    ga, gb = groups_of(make_run("a", 1, 0.5), make_run("b", 1, 0.6, **{"validation.seed": "1"}))
    found = difference(ga, gb, "fit/loss")
    assert isinstance(found, NotComparable) and "validation.seed" in found.reason
    ga.representative.prompts, gb.representative.prompts = [{"prompt": "a cat"}], [{"prompt": "a dog"}]
    assert isinstance(difference(ga, gb, "img/edge_energy"), NotComparable)


def test_fitting_speed_comes_from_the_whole_fit_loss_history():
    (group,) = groups_of(make_run("a", 1, 0.2))
    assert run_value(group.runs[0], "fit/steps_to_half") == pytest.approx(5.0)
    assert run_value(group.runs[0], "fit/loss_auc") == pytest.approx(0.6)  # a straight line from 1.0 to 0.2
    assert present_metrics([group]) == ["fit/loss", "fit/loss_auc", "fit/steps_to_half"]
    assert one_knob_pairs([group], ["fit/loss"]) == []
