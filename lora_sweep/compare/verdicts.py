"""The report's first answer: for each variant and metric, is it better or worse than the baseline beyond the noise.

A verdict is read from the summary's `vs_baseline` difference and the metric's direction (`DIRECTIONS` of
tracking/metric_spec.py): "better"/"worse" where a direction is known, "higher"/"lower" where it is not, "within
noise" when the interval covers zero (or the values are identical), "no interval" for a difference without one,
"no value" when a side has none (or the two are not comparable). A side whose runs all ended not finite (NaN: they
diverged) against one with values is the worse one where a direction is known, else "not finite". The matrix and the
forest plot share these words.
"""

from __future__ import annotations

import html

from lora_sweep.compare.cells import effect_text
from lora_sweep.tracking.metric_spec import DIRECTIONS

VERDICTS = ("better", "worse", "higher", "lower", "within noise", "no interval", "not finite", "no value")
COLOURS = {  # CSS and matplotlib alike: blue better, orange worse, purple a change without a direction, grey noise
    "better": "#1f77b4", "worse": "#e8710a", "higher": "#7b3fa0", "lower": "#7b3fa0", "within noise": "#9a9a9a",
    "no interval": "#c9b458", "not finite": "#7b3fa0", "no value": "#d9d9d9",
}
MEANINGS = {
    "better": "the whole 95 % interval of the difference is on the metric's better side, or the baseline's value "
              "is not finite (it diverged) while the variant's is a number",
    "worse": "the whole interval is on the worse side, or the variant's value is not finite (it diverged) while the "
             "baseline's is a number",
    "higher": "higher (or lower) beyond the noise, for a metric with no better direction",
    "within noise": "the interval covers zero, or the values are identical",
    "not finite": "a side's value is not finite (it diverged), for a metric with no better direction",
    "no interval": "one run against one without evaluation points: a difference, but no interval to judge it",
    "no value": "a side has no value of this metric, or the two are not measured alike",
}


def verdict(entry: dict | None, metric: str) -> str:
    """One of VERDICTS for a `vs_baseline` entry of the summary."""
    if entry is not None and entry.get("not_finite"):
        direction = DIRECTIONS.get(metric)
        if direction is None:
            return "not finite"
        return "worse" if entry["not_finite"] == "b" else "better"
    if entry is None or not entry.get("comparable") or entry["verdict"] == "no value":
        return "no value"
    if entry["verdict"] in ("no difference", "within noise"):
        return "within noise"
    if entry["verdict"] == "no interval":
        return "no interval"
    higher = entry["effect"] > 0
    direction = DIRECTIONS.get(metric)
    if direction is None:
        return "higher" if higher else "lower"
    return "better" if higher == (direction == "max") else "worse"


def matrix(summary: dict) -> list[tuple[dict, dict[str, str]]]:
    """(variant, {metric: verdict}) per non-baseline variant of the summary, in its order."""
    keys = [m["key"] for m in summary["metrics"]]
    return [(v, {k: verdict(v["vs_baseline"].get(k), k) for k in keys})
            for v in summary["variants"] if not v["is_baseline"]]


def metric_head(key: str) -> str:
    """A column head that wraps at its slash and says the metric's better direction."""
    direction = {"min": " ↓", "max": " ↑"}.get(DIRECTIONS.get(key, ""), "")
    group, _, name = key.rpartition("/")
    return (f"<th class='metric' title='{html.escape(key, quote=True)}'>{html.escape(group)}/<br>"
            f"{html.escape(name)}{direction}</th>")


def matrix_html(summary: dict, best_cells: dict[str, str] | None = None, best_head: str = "") -> str:
    """The verdict matrix as a table: variants down, metrics across; `best_cells` (variant name -> cell HTML) adds a
    best-checkpoint column after the names."""
    keys = [m["key"] for m in summary["metrics"]]
    best = f"<th>{html.escape(best_head)}</th>" if best_cells is not None else ""
    rows = [f"<tr><th>variant</th>{best}{''.join(metric_head(k) for k in keys)}</tr>"]
    for variant in sorted(summary["variants"], key=lambda v: not v["is_baseline"]):  # the baseline first
        name = html.escape(variant["name"], quote=True)
        head = (f"<th class='row'>{html.escape(variant['name'])} <span class='n'>{html.escape(variant['n_text'])}"
                "</span></th>")
        best = f"<td class='best'>{best_cells.get(variant['name'], '—')}</td>" if best_cells is not None else ""
        if variant["is_baseline"]:
            cells = f"<td class='v-base' colspan='{len(keys)}'>baseline: every difference is from this variant</td>"
        else:
            cells = ""
            for key in keys:
                entry = variant["vs_baseline"].get(key)
                found = verdict(entry, key)
                title = html.escape(f"{key}: {effect_text(entry)[0]}", quote=True)
                cells += (f"<td class='v v-{found.replace(' ', '-')}' data-variant='{name}' data-metric='{key}' "
                          f"data-verdict='{found}' title='{title}'>{found}</td>")
        rows.append(f"<tr>{head}{best}{cells}</tr>")
    return f"<table class='verdicts' id='verdicts'>{''.join(rows)}</table>"


def legend_html(shown: set[str]) -> str:
    """One line per verdict the matrix shows, in VERDICTS' order, with its colour."""
    words = [w for w in VERDICTS if w in shown]
    words = [w for w in words if w != "lower" or "higher" not in words]  # one swatch says both
    return "<p class='sub legend'>" + " · ".join(
        f"<span class='swatch' style='background:{COLOURS[w]}'></span> <b>{w}</b>: "
        f"{MEANINGS.get(w, MEANINGS['higher'])}"
        for w in words) + ". Hover a cell for the difference and its interval; ↓ lower is better, ↑ higher.</p>"


def css() -> str:
    """The matrix's colours, from COLOURS (white text on the dark ones)."""
    dark = {"better", "worse", "higher", "lower"}
    return "".join(f"td.v-{w.replace(' ', '-')}{{background:{c};color:{'#fff' if w in dark else '#222'}}}"
                   for w, c in COLOURS.items())
