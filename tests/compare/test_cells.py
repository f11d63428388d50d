"""The text of the report's number cells, on constructed summary entries: enough digits to tell an interval's ends
apart, "no difference" for identical values, a reason where a value is missing, the step-0 flag."""

from __future__ import annotations

from dataclasses import replace

from lora_sweep.compare.cells import (
    distinct_digits,
    effect_text,
    estimate_text,
    mean_interval_text,
    row_decimals,
    start_text,
)
from lora_sweep.compare.stats import Difference, Estimate, no_interval, paired_difference


def entry(found) -> dict:
    return found.as_dict() if isinstance(found, Estimate) else {"comparable": True, **found.as_dict()}


def test_an_interval_never_reads_the_same_number_twice_when_its_ends_differ():
    assert distinct_digits([1.1201, 1.1249]) == 4 and distinct_digits([1.0, 1.0]) == 3
    assert distinct_digits([0.123456789012, 0.123456789013]) == 12
    assert estimate_text(entry(Estimate(1.1225, 1.1201, 1.1249, 3))) == "1.123 [1.12, 1.125]"  # not [1.12, 1.12]
    effect = effect_text(entry(Difference(0.0003, 0.00031, 0.00034, 3, "paired over 3 seeds")))[0]
    assert effect.startswith("+0.0003 [+0.00031, +0.00034]")
    assert estimate_text(entry(Estimate(2.0, 2.0, 2.0, 3))) == "2 (no spread)"  # identical replicates


def test_identical_values_read_no_difference():
    same = paired_difference([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], unit="(image, t, eps) points")
    assert effect_text(entry(same)) == ("no difference", "same")  # not "within noise [+0, +0]"
    assert effect_text(entry(no_interval(4.0, 4.0 - 5.551e-12)))[0] == "no difference"
    assert effect_text(entry(no_interval(4.0, 4.5)))[0] == "+0.5 (n = 1: no interval)"
    noise = paired_difference([0.5, 0.6, 0.7], [0.51, 0.59, 0.7])
    assert effect_text(entry(noise))[0].startswith("within noise [-")


def test_missing_values_and_clipped_intervals_say_so():
    missing = Estimate(float("nan"), None, None, 0, "did not halve (fit/loss never fell below its start)")
    assert estimate_text(entry(missing)) == missing.note
    some = Estimate(2.0, None, None, 1, "n = 1", missing="1 of 2 runs: did not halve (not in the mean)")
    assert estimate_text(entry(some)) == "2 (1 of 2 runs: did not halve (not in the mean))"
    assert estimate_text(entry(Estimate(2.25, 0.0, 8.0, 2, clipped=True))) == "2.25 [0, 8]†"
    no_value = Difference(float("nan"), None, None, 0, "", "v59: did not halve")
    assert effect_text(entry(no_value)) == ("no value: v59: did not halve", "none")


def test_the_step_0_flag():
    found = Difference(0.103, 0.1, 0.106, 2, "paired over 2 seeds",
                       at_start=Difference(0.2, 0.2, 0.2, 2, "paired over 2 seeds"),
                       change=Difference(-0.097, -0.1, -0.094, 2, "paired over 2 seeds"))
    assert start_text(entry(found)) == ("differs at step 0: +0.2 (every pair alike); "
                                        "change from step 0: -0.097 [-0.1, -0.094]")
    assert start_text(entry(Difference(0.1, None, None, 2, ""))) == "" and start_text(None) == ""


def test_a_difference_without_interval_says_why():
    found = Difference(-1.04e-5, None, None, 3, "unpaired, 1 + 2 runs",
                       "no interval: seeds differ (xb: 1, 2; xc: 1), and xc has one run")
    assert effect_text(entry(found)) == ("-1.04e-05 (no interval: seeds differ (xb: 1, 2; xc: 1), and xc has one run)",
                                         "none")
    assert effect_text(entry(no_interval(4.0, 4.5)))[0] == "+0.5 (n = 1: no interval)"  # one run each, as before


def test_the_step_0_flag_names_the_metric_it_measures():
    # under fit/steps_to_half the step-0 difference is fit/loss's (-0.001785), not a number of steps
    start = Difference(-0.001785, None, None, 2, "1 run each", "one run each: no interval", of="fit/loss")
    found = Difference(-3.617, None, None, 2, "1 run each", at_start=start)
    assert entry(found)["at_start"]["metric"] == "fit/loss"
    assert start_text(entry(found)) == "fit/loss differs at step 0 by -0.001785"
    noise = paired_difference([1.0, 1.1, 1.2], [1.01, 1.09, 1.2])
    within = Difference(0.1, 0.05, 0.15, 3, "paired over 3 seeds", at_start=replace(noise, of="val/loss"))
    assert start_text(entry(within)).startswith("val/loss differs at step 0: within noise [-")


def test_means_of_one_metric_print_with_the_same_decimals():
    # xa 1.12421 [..], xb 1.1242 [..], xc 1.124 (n = 1) would not tell which is lower
    row = [entry(Estimate(1.124212, 1.124120, 1.124304, 3)), entry(Estimate(1.12421899, 1.1241, 1.1244, 2)),
           entry(Estimate(1.12422945, None, None, 1))]
    decimals = row_decimals(row)
    assert decimals == 5
    assert [estimate_text(e, decimals) for e in row] == [
        "1.12421 [1.12412, 1.12430]", "1.12422 [1.12410, 1.12440]", "1.12423"]
    assert row_decimals([entry(Estimate(2.0, 2.0, 2.0, 3)), entry(Estimate(6.27, None, None, 1))]) == 3
    assert estimate_text(entry(Estimate(2.0, 2.0, 2.0, 3)), 3) == "2.000 (no spread)"
    assert row_decimals([entry(Estimate(1234.51, None, None, 1)), entry(Estimate(1234.54, None, None, 1))]) == 2
    assert row_decimals([entry(Estimate(1e-17, None, None, 1))]) is None  # fixed decimals would write 0.0000...
    assert row_decimals([entry(Estimate(float("nan"), None, None, 0))]) is None


def test_a_best_cells_mean_and_interval_share_one_digit_count():
    """The fresh-user test's s1 best cell read 'step 6 · 1.145 [1.15, 1.15]': the mean outside its interval."""
    from lora_sweep.compare.first_screen import best_cell

    value = {"mean": 1.14523, "low": 1.14502, "high": 1.14544}
    assert mean_interval_text(value) == "1.1452 [1.145, 1.1454]"
    assert mean_interval_text({"mean": 0.0808, "low": 0.0712, "high": 0.0903}) == "0.0808 [0.0712, 0.0903]"
    assert mean_interval_text({"mean": 0.5, "low": None, "high": None}) == "0.5"
    assert "step 6</b> · 1.1452 [1.145, 1.1454]" in best_cell({"step": 6, "value": value})
