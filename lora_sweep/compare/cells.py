"""The text of the report's number cells, from the summary's entries (`summary.build_summary`).

Pure string functions, so the page and a test can render the same entry the same way. Numbers get as many
significant digits as it takes for two different numbers of one cell to print differently (an interval never
reads [1.12, 1.12] when its ends differ), at least 3 (4 for a mean or an effect). Marks: `*` an interval of
evaluation noise only (one run each), `†` an interval clipped at the metric's natural bounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import combinations

from lora_sweep.compare.effects import EVAL_NOISE_ONLY

CLIPPED_MARK = "†"
EVAL_NOISE_MARK = "*"


def distinct_digits(values: Iterable[float | None], least: int = 3) -> int:
    """The fewest significant digits (>= `least`, <= 17) at which every two different finite values print
    differently with the 'g' format."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    for digits in range(least, 17):
        if all(f"{x:.{digits}g}" != f"{y:.{digits}g}" for x, y in combinations(finite, 2) if x != y):
            return digits
    return 17


def format_number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}g}"


def row_decimals(entries: Iterable[dict], least: int = 4) -> int | None:
    """The decimals at which a row of means (the summary's estimate entries of one metric) prints: the same for
    every variant, so means side by side line up and can be told apart ('1.12421', '1.12420', '1.12423', not
    '1.12421', '1.1242', '1.124'). At least `least` significant digits of the largest mean, more until every two
    different means, and each entry's mean and interval ends, print differently. None (each number formats on its
    own, 'g') for magnitudes that fixed decimals would write badly (below 1e-3 or from 1e6 on)."""
    entries = [e for e in entries if e.get("mean") is not None and math.isfinite(e["mean"])]
    means = [e["mean"] for e in entries]
    largest = max((abs(m) for m in means), default=0.0)
    if not means or (largest != 0.0 and not 1e-3 <= largest < 1e6):
        return None
    decimals = max(0, least - 1 - math.floor(math.log10(largest))) if largest else least
    groups = [means] + [[e["mean"], e["low"], e["high"]] for e in entries if e.get("low") is not None]
    while decimals < 15 and not all(f"{x:.{decimals}f}" != f"{y:.{decimals}f}"
                                    for group in groups for x, y in combinations(group, 2) if x != y):
        decimals += 1
    return decimals


def signed(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:+.{digits}g}"


def estimate_text(entry: dict, decimals: int | None = None) -> str:
    """'0.1234 [0.1201, 0.1267]', '0.1234' (no interval: n = 1), '0.1234 (no spread)' (identical replicates), or,
    without a value, why (e.g. 'did not decrease (the final fit/loss is not below its start)'); when only some runs
    have one, the number and why the others do not ('2 (1 of 2 runs: did not decrease (not in the mean))').
    `decimals` (`row_decimals`): every number with that many decimals, as its row's other means."""
    if entry["mean"] is None:
        return entry.get("missing") or entry.get("note") or "—"
    missing = f" ({entry['missing']})" if entry.get("missing") else ""

    def number(value: float, digits: int) -> str:
        return f"{value:.{decimals}f}" if decimals is not None else format_number(value, digits)

    if entry["low"] is None:
        return number(entry["mean"], 4) + missing
    if entry["low"] == entry["high"]:
        return f"{number(entry['mean'], 4)} (no spread){missing}"
    digits = distinct_digits((entry["mean"], entry["low"], entry["high"]))
    mark = CLIPPED_MARK if entry.get("clipped") else ""
    return (f"{number(entry['mean'], max(4, digits))} "
            f"[{number(entry['low'], digits)}, {number(entry['high'], digits)}]{mark}{missing}")


def interval_text(entry: dict) -> str:
    """'[-0.0123, +0.0456]' with enough digits to tell the ends (and zero) apart; '' without an interval."""
    if entry.get("low") is None:
        return ""
    digits = distinct_digits((entry["low"], entry["high"], 0.0))
    mark = CLIPPED_MARK if entry.get("clipped") else ""
    return f"[{signed(entry['low'], digits)}, {signed(entry['high'], digits)}]{mark}"


def difference_text(entry: dict, *, compact: bool = False) -> str:
    """A difference on its own: 'no difference', 'within noise [..]', '+0.05 [..]', '+0.05 (no interval)' ('+0.05'
    when `compact`)."""
    verdict = entry["verdict"]
    if verdict == "no difference":
        return "no difference"
    if verdict == "no value":
        return f"no value: {entry['note']}" if entry.get("note") else "no value"
    interval = interval_text(entry)
    digits = max(4, distinct_digits((entry["effect"], entry.get("low"), entry.get("high"))))
    if verdict == "within noise":
        return f"within noise {interval}"
    if verdict == "different":
        if entry["low"] == entry["high"]:
            return f"{signed(entry['effect'], digits)} (every pair alike)"
        return f"{signed(entry['effect'], digits)} {interval}"
    return signed(entry["effect"]) if compact else f"{signed(entry['effect'])} (no interval)"


def effect_text(entry: dict | None) -> tuple[str, str]:
    """(what the cell says, a CSS class) for a difference of the summary."""
    if entry is None:
        return "—", "none"
    if not entry["comparable"]:
        return f"not comparable: {entry['reason']}", "none"
    verdict = entry["verdict"]
    mark = f" {EVAL_NOISE_MARK}" if entry["note"] == EVAL_NOISE_ONLY and verdict != "no difference" else ""
    if verdict == "no interval":
        why = entry.get("note") or ""  # one run against several: why there is none ("no interval: seeds differ ...")
        return f"{signed(entry['effect'])} ({why if why.startswith('no interval:') else 'n = 1: no interval'})", "none"
    cls = {"no difference": "same", "within noise": "noise", "different": "diff"}.get(verdict, "none")
    return difference_text(entry) + mark, cls


def start_text(entry: dict | None) -> str:
    """'fit/loss differs at step 0 by +0.012 [..]; change from step 0: -0.003 [..]' for two variants that differ
    before training; '' otherwise. The step-0 difference names what it measures (`at_start.metric`): under
    fit/steps_to_half it is fit/loss's, in loss units, not a number of steps."""
    if not entry or not entry.get("comparable") or entry.get("at_start") is None:
        return ""
    start = entry["at_start"]
    found = difference_text(start, compact=True)
    if start.get("metric"):
        joint = " by " if start["verdict"] in ("different", "no interval") else ": "
        text = f"{start['metric']} differs at step 0{joint}{found}"
    else:
        text = f"differs at step 0: {found}"
    if entry.get("change") is not None:
        text += f"; change from step 0: {difference_text(entry['change'], compact=True)}"
    return text
