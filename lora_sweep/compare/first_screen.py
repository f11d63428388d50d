"""The report's first screen: what differs and which is better (the verdict matrix, each variant's best
checkpoint when `compare.select` chose a metric), then the forest plot of the same differences.
"""

from __future__ import annotations

import html

from lora_sweep.compare.cells import effect_text, mean_interval_text
from lora_sweep.compare.verdicts import legend_html, matrix, matrix_html, metric_head, verdict

SELECT_HINT = "set compare.select to a metric (e.g. fit/loss) to see each variant's best checkpoint here"


def best_cell(best: dict | None) -> str:
    """'step 6 · 0.0808 [0.0712, 0.0903] · LoRA 1 2', its flag ('still improving: train longer'), or why none."""
    if not best or best.get("step") is None:
        why = (best or {}).get("missing") or "no value"
        return f"<span class='none'>{html.escape(why)}</span>"
    value = best.get("value") or {}
    files = [f for f in best.get("files", []) if f.get("uri")]
    links = " ".join(f"<a href='{html.escape(f['uri'], quote=True)}' title='{html.escape(f['path'], quote=True)}'>"
                     f"{'seed ' + str(f['seed']) if f.get('seed') is not None else 'LoRA'}</a>" for f in files)
    flag = f"<br><span class='flag'>{html.escape(best['flag'])}</span>" if best.get("flag") else ""
    return (f"<span data-best-step='{best['step']}'><b>step {best['step']}</b> · "
            f"{html.escape(mean_interval_text(value))}</span>"
            + (f" · LoRA: {links}" if links else "") + flag)


def best_cells(summary: dict) -> tuple[str, dict[str, str] | None]:
    """(the column's head, variant name -> cell HTML), or ('', None) when no metric was selected."""
    select = summary.get("select")
    if not select:
        return "", None
    head = f"best checkpoint by {select['metric']} ({select['direction']})"  # compare/best.py chose it
    return head, {v["name"]: best_cell(v["best"]) for v in summary["variants"]}


def best_marks(summary: dict) -> dict[str, list[tuple[int, int, float]]]:
    """{selected metric: [(variant index, best step, its mean)]} for the curves' stars; {} without a selection."""
    select = summary.get("select")
    found = [(i, b["step"], b["value"]["mean"]) for i, v in enumerate(summary["variants"])
             if (b := v["best"]) and b.get("step") is not None and (b.get("value") or {}).get("mean") is not None]
    return {select["metric"]: found} if select and found else {}


def effects_at_best_html(summary: dict) -> str:
    """The one-knob effects read at each variant's best step, collapsed: a row per pair (b against a), a verdict per
    metric, the step each side's value is read from in the cell; '' when no pair has them."""
    pairs = [p for p in summary["one_knob_pairs"] if "effects_at_best" in p]
    if not pairs:
        return ""
    keys = [m["key"] for m in summary["metrics"]]
    rows = [f"<tr><th>pair (best steps)</th>{''.join(metric_head(k) for k in keys)}</tr>"]
    for pair in pairs:
        steps = pair["best_steps"]
        name = (f"{pair['b']} vs {pair['a']} ({pair['knob']}; best at {steps['b']} and {steps['a']})")
        cells = ""
        for key in keys:
            entry = pair["effects_at_best"].get(key)
            found = verdict(entry, key)
            read = (entry or {}).get("read_at") or {}
            at = f"read at {_steps(read.get('b'))} vs {_steps(read.get('a'))}"
            title = html.escape(f"{key}: {effect_text(entry)[0]}", quote=True)
            cells += (f"<td class='v v-{found.replace(' ', '-')}' data-pair='{html.escape(name, quote=True)}' "
                      f"data-metric='{key}' data-verdict='{found}' title='{title}'>{found}<br>"
                      f"<span class='n'>{html.escape(at)}</span></td>")
        rows.append(f"<tr><th class='row'>{html.escape(name)}</th>{cells}</tr>")
    return ("<details class='at-best'><summary>One-knob effects at each variant's best step (each value read at its "
            f"last logged step up to the best)</summary><table class='verdicts'>{''.join(rows)}</table></details>")


def _steps(steps: list[int] | None) -> str:
    return ", ".join(map(str, steps)) if steps else "—"


def first_screen(summary: dict, forest_uri: str | None) -> tuple[str, list[str]]:
    """Section 1: the matrix (with the best checkpoints), its legend, the forest plot."""
    head, cells = best_cells(summary)
    shown = {found for _, verdicts in matrix(summary) for found in verdicts.values()}
    parts = [f"<p class='sub'>Each variant against the baseline {html.escape(summary['baseline'])}, metric by "
             "metric, at 95 % confidence.</p>",
             matrix_html(summary, cells, head), legend_html(shown)]
    if cells is None:
        parts.append(f"<p class='sub'>{html.escape(SELECT_HINT)}.</p>")
    else:
        parts.append(effects_at_best_html(summary))
    if forest_uri:
        parts.append("<details open class='forest'><summary>The differences from the baseline, with their 95 % "
                     "intervals (zero: no difference)</summary>"
                     f"<img class='fig' id='forest' alt='forest plot' src='{forest_uri}'></details>")
    return "What differs, and which is better", parts
