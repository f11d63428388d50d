"""How two variants are compared, on constructed runs: the basis of each difference (seeds, runs, evaluation points,
none), only finished runs in the numbers, and "not comparable" when the inputs differ."""

from __future__ import annotations

import pytest

from lora_sweep.compare.effects import (
    EVAL_NOISE_ONLY,
    NotComparable,
    difference,
    estimate,
    one_knob_pairs,
    present_metrics,
    run_value,
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
                       make_run("b", 3, 0.7, **{"noise.offset": "0.1"}),
                       make_run("b", 4, 0.71, **{"noise.offset": "0.1"}))
    assert difference(ga, gb, "fit/loss").basis == "unpaired, 2 + 2 runs"


def test_one_run_each_pairs_over_the_evaluation_points_and_says_what_that_holds():
    ga, gb = groups_of(make_run("a", 1, 0.5, points_shift=0.0),
                       make_run("b", 1, 0.6, points_shift=0.1, **{"noise.offset": "0.1"}))
    found = difference(ga, gb, "fit/loss")
    assert found.basis == "paired over 9 (image, t, eps) points" and found.note == EVAL_NOISE_ONLY
    assert found.effect == pytest.approx(0.1) and found.verdict == "different"  # the values shown: 0.6 - 0.5
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
                                           "notes": [], "select": None, "best": []})())
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


def with_history(name: str, seed: int, history, **params: str) -> VariantData:
    run = make_run(name, seed, history[-1][1], **params)
    run.histories["fit/loss"] = list(history)
    run.final_metrics = {"fit/loss": history[-1][1]}
    return run


def test_a_run_whose_fit_loss_did_not_decrease_says_why_it_has_no_steps_to_half():
    from lora_sweep.compare.cells import effect_text, estimate_text

    rising = [(0, 1.0), (4, 1.1), (8, 1.2)]
    ga, gb = groups_of(make_run("v57", 1, 0.2), with_history("v59", 1, rising, **{"loss.huber_c": "0.08"}))
    entry = estimate(gb, "fit/steps_to_half").as_dict()
    assert entry["n"] == 0 and entry["note"] == "did not decrease (the final fit/loss is not below its start)"
    assert estimate_text(entry) == "did not decrease (the final fit/loss is not below its start)"  # not "—"
    found = difference(ga, gb, "fit/steps_to_half")
    assert found.verdict == "no value"
    assert found.note == "v59: did not decrease (the final fit/loss is not below its start)"
    assert effect_text(found.as_dict() | {"comparable": True})[0] == f"no value: {found.note}"
    both = difference(gb, groups_of(with_history("v61", 1, rising, **{"loss.huber_c": "0.5"}))[0], "fit/steps_to_half")
    assert both.note == "v59, v61: did not decrease (the final fit/loss is not below its start)"  # said once
    # some replicates decrease, one does not: the mean is over those that did, and the note says how many did not
    (mixed,) = groups_of(make_run("v57", 1, 0.2), make_run("v57", 2, 0.3), with_history("v57", 3, rising))
    assert estimate(mixed, "fit/steps_to_half").n == 2
    assert estimate(mixed, "fit/steps_to_half").missing == "1 of 3 runs: did not decrease (not in the mean)"
    assert estimate_text(estimate(mixed, "fit/steps_to_half").as_dict()).endswith("(1 of 3 runs: did not decrease "
                                                                                  "(not in the mean))")
    # a dip that comes back above the start (as v57's) did not decrease either, though it fell at first
    (dip,) = groups_of(with_history("v57", 1, [(0, 1.156097), (4, 1.1560910), (8, 1.1561027)]))
    assert estimate(dip, "fit/steps_to_half").missing == "did not decrease (the final fit/loss is not below its start)"
    (short,) = groups_of(with_history("v62", 1, [(0, 1.0)]))
    assert estimate(short, "fit/loss_auc").note == "fewer than two fit/loss evaluations"


def test_a_step_count_interval_is_clipped_at_the_runs_steps():
    fast, slow = [(0, 1.0), (1, 0.0), (8, 0.0)], [(0, 1.0), (4, 0.5), (8, 0.0)]  # halve at step 0.5 and at step 4
    ga, gb = groups_of(with_history("a", 1, fast), with_history("a", 2, slow),
                       with_history("b", 1, slow, **{"noise.offset": "0.1"}),
                       with_history("b", 2, slow, **{"noise.offset": "0.1"}))
    found = estimate(ga, "fit/steps_to_half")
    assert found.mean == pytest.approx(2.25) and (found.low, found.high) == (0.0, 8.0) and found.clipped
    assert "clipped" in found.note
    effect = difference(ga, gb, "fit/steps_to_half")  # paired over the two seeds: +0 and +3.5
    assert effect.clipped and (effect.low, effect.high) == (-8.0, 8.0)
    assert not estimate(gb, "fit/steps_to_half").clipped  # identical replicates: [4, 4], nothing to clip


def test_variants_that_differ_before_training_show_it_and_the_change_from_step_0():
    # fp8 vs fp16 base weights: the quantised base model measures the same points differently at step 0
    fp8 = [with_history("v60", s, [(0, 1.0), (5, 0.8), (10, 0.5 + 0.01 * s)], **{"precision.name": "fp8"})
           for s in (1, 2)]
    fp16 = [with_history("v64", s, [(0, 1.2), (5, 0.9), (10, 0.6 + 0.012 * s)], **{"precision.name": "fp16"})
            for s in (1, 2)]
    ga, gb = groups_of(*fp8, *fp16)
    found = difference(ga, gb, "fit/loss")
    assert found.effect == pytest.approx(0.1 + 0.003)  # the final difference, as before
    assert found.at_start.effect == pytest.approx(0.2) and found.at_start.basis == "paired over 2 seeds"
    assert found.at_start.verdict == "different"
    assert (found.at_start.low, found.at_start.high) == pytest.approx((0.2, 0.2))  # every pair alike
    assert found.change.effect == pytest.approx((0.6 - 1.2 + 0.018) - (0.5 - 1.0 + 0.015))  # -0.097
    entry = found.as_dict()
    assert entry["at_start"]["effect"] == pytest.approx(0.2) and entry["change"]["effect"] == pytest.approx(-0.097)
    auc = difference(ga, gb, "fit/loss_auc")  # the area under the curve is measured from fit/loss's start too
    assert auc.at_start is not None and auc.change is not None
    speed = difference(ga, gb, "fit/steps_to_half")  # already relative to each run's start: flagged, no change
    assert speed.at_start is not None and speed.change is None
    # the flag is fit/loss's step-0 difference, and says so (page and JSON): it is not a number of steps
    assert speed.at_start.of == "fit/loss" and speed.as_dict()["at_start"]["metric"] == "fit/loss"
    assert auc.as_dict()["at_start"]["metric"] == "fit/loss" and found.as_dict()["at_start"]["metric"] == "fit/loss"
    # the same base model: the same step-0 values, no flag
    same = groups_of(*fp8, *[with_history("v63", s, [(0, 1.0), (10, 0.4)], **{"loss.huber_c": "0.1"})
                             for s in (1, 2)])
    plain = difference(same[0], same[1], "fit/loss")
    assert plain.at_start is None and "at_start" not in plain.as_dict()
    # one run each: the step-0 difference without an interval
    one = difference(*groups_of(fp8[0], fp16[0]), "fit/loss")
    assert one.at_start.effect == pytest.approx(0.2) and one.at_start.low is None
    assert one.change.effect == pytest.approx((0.612 - 1.2) - (0.51 - 1.0))


def test_steps_to_half_is_missing_when_fit_loss_has_only_its_start_and_end():
    # validation.every=0: every run would read max_steps/2, "no spread", "no difference"; now no value, and why
    runs = [with_history("a", s, [(0, 1.0), (4, 0.9 - 0.01 * s)]) for s in (1, 2, 3)]
    (group,) = groups_of(*runs)
    entry = estimate(group, "fit/steps_to_half")
    assert entry.n == 0 and entry.missing == "fit/loss evaluated only at the start and end: set validation.every"
    assert run_value(runs[0], "fit/steps_to_half") is None and run_value(runs[0], "fit/loss_auc") is not None
    other = groups_of(*[with_history("b", s, [(0, 1.0), (4, 0.5)], **{"noise.offset": "0.1"}) for s in (1, 2)])[0]
    found = difference(group, other, "fit/steps_to_half")
    assert found.verdict == "no value"
    assert found.note == "a, b: fit/loss evaluated only at the start and end: set validation.every"


def test_a_difference_is_always_the_difference_of_the_means_shown():
    """A sweep: xa seeds 1, 2, 3; xb seeds 1, 2 (its seed 3 failed); xc one run, seed 1."""
    off = {"noise.offset": "0.1"}
    xa = [make_run("xa", s, v, points_shift=0.0) for s, v in ((1, 1.124200), (2, 1.124230), (3, 1.124260))]
    xb = [make_run("xb", s, v, points_shift=0.0, **off) for s, v in ((1, 1.124229), (2, 1.124209))]
    xb.append(make_run("xb", 3, 2.0, status="FAILED", **off))
    xc = [make_run("xc", 1, 1.124229, points_shift=0.0, **{"noise.offset": "0.2"})]
    ga, gb, gc = groups_of(*xa, *xb, *xc)
    means = {g.name: estimate(g, "fit/loss").mean for g in (ga, gb, gc)}
    # baseline xa: xb's seeds (1, 2) are not xa's (1, 2, 3): Welch over all runs, not a pairing over seeds 1, 2
    # (that gave +4e-6 here, beside means whose difference is -1.1e-5: the other sign)
    found = difference(ga, gb, "fit/loss")
    assert found.effect == pytest.approx(means["xb"] - means["xa"], abs=1e-12) and found.effect < 0
    assert found.basis == "unpaired, 3 + 2 runs" and found.has_interval
    assert found.note == "seeds differ (xb: 1, 2; xa: 1, 2, 3)"
    from scipy import stats as scipy_stats
    welch = scipy_stats.ttest_ind([1.124229, 1.124209], [1.124200, 1.124230, 1.124260],
                                  equal_var=False).confidence_interval(0.95)
    assert (found.low, found.high) == pytest.approx((welch.low, welch.high), abs=1e-12)
    # baseline xc (one run): xb's two runs against it have no interval, and the note says why; not "1 run each",
    # not "no difference" though xb's seed 1 equals xc's value
    found = difference(gc, gb, "fit/loss")
    assert found.effect == pytest.approx(means["xb"] - means["xc"], abs=1e-12) and found.effect != 0.0
    assert found.verdict == "no interval" and found.basis == "unpaired, 1 + 2 runs"
    assert found.note == "no interval: seeds differ (xb: 1, 2; xc: 1), and xc has one run"
    assert difference(gc, ga, "fit/loss").note == "no interval: seeds differ (xa: 1, 2, 3; xc: 1), and xc has one run"
    # the same seeds on both sides: paired, and the paired mean is the difference of the means
    same = groups_of(*xa[:2], *[make_run("xd", s, v, **off) for s, v in ((1, 1.3), (2, 1.4))])
    found = difference(*same, "fit/loss")
    assert found.basis == "paired over 2 seeds"
    assert found.effect == pytest.approx(1.35 - (1.124200 + 1.124230) / 2, abs=1e-12)
    # one run each: paired over the points, the effect still the difference of the two values shown
    one = difference(*groups_of(xa[0], xc[0]), "fit/loss")
    assert one.basis == "paired over 9 (image, t, eps) points" and one.note == EVAL_NOISE_ONLY
    assert one.effect == pytest.approx(1.124229 - 1.124200, abs=1e-12) and one.verdict != "no difference"
