"""The text of the report's number cells, from the summary's entries: pure, so page and tests render alike.

Numbers get the significant digits it takes for two different numbers of one cell to print differently (at
least 3; 4 for a mean or an effect). Marks: `*` evaluation noise only (one run each), `†` clipped at the bounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import combinations

from lora_sweep.compare.effects import EVAL_NOISE_ONLY

CLIPPED_MARK = "†"
EVAL_NOISE_MARK = "*"


def distinct_digits(values: Iterable[float | None], least: int = 3) -> int:
    """The fewest significant digits (>= `least`, <= 17) at which different finite values print differently ('g')."""
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
    """The decimals for one row's means, shared so means line up and stay distinct ('1.12421', '1.12420').

    At least `least` significant digits of the largest mean, more until means and interval ends differ. None
    (each number 'g' on its own) below 1e-3 or from 1e6 on.
    """
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
    """'0.1234 [0.1201, 0.1267]', '0.1234' (n = 1), '0.1234 (no spread)', or why there is no value.

    When only some runs have a value, why the others lack one follows. `decimals`: from `row_decimals`.
    """
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


def mean_interval_text(entry: dict) -> str:
    """'1.1451 [1.145, 1.1453]': mean and interval ends with one count of significant digits (at least 4, more until
    the three print apart), so the mean never reads outside its interval; the mean alone without an interval."""
    if entry.get("low") is None:
        return format_number(entry.get("mean"))
    digits = max(4, distinct_digits((entry["mean"], entry["low"], entry["high"])))
    mark = CLIPPED_MARK if entry.get("clipped") else ""
    return (f"{format_number(entry['mean'], digits)} "
            f"[{format_number(entry['low'], digits)}, {format_number(entry['high'], digits)}]{mark}")


def interval_text(entry: dict) -> str:
    """'[-0.0123, +0.0456]' with enough digits to tell the ends (and zero) apart; '' without an interval."""
    if entry.get("low") is None:
        return ""
    digits = distinct_digits((entry["low"], entry["high"], 0.0))
    mark = CLIPPED_MARK if entry.get("clipped") else ""
    return f"[{signed(entry['low'], digits)}, {signed(entry['high'], digits)}]{mark}"


def difference_text(entry: dict, *, compact: bool = False) -> str:
    """'no difference', 'within noise [..]', '+0.05 [..]' or '+0.05 (no interval)' ('+0.05' when `compact`)."""
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
    """'fit/loss differs at step 0 by +0.012 [..]; change from step 0: -0.003 [..]', or ''.

    The step-0 difference names its metric (`at_start.metric`): under fit/steps_to_half it is in loss units.
    """
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
