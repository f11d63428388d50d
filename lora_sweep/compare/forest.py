"""The forest plot: per metric, each variant's difference from the baseline with its 95 % interval and a zero
line, coloured by its verdict (verdicts.py), as one matplotlib PNG with a panel per metric.
"""

from __future__ import annotations

import io
import math

from lora_sweep.compare.verdicts import COLOURS, matrix
from lora_sweep.tracking.metric_spec import DIRECTIONS

COLUMNS = 4


def panels(summary: dict) -> tuple[list[str], list[str]]:
    """(the metrics drawn, those left out because no variant has a verdict other than "no value")."""
    rows = matrix(summary)
    every = [m["key"] for m in summary["metrics"]]
    drawn = [k for k in every if any(verdicts[k] != "no value" for _, verdicts in rows)]
    return drawn, [k for k in every if k not in drawn]


def forest_figure(summary: dict) -> bytes | None:
    """The PNG, or None when there is no variant besides the baseline or no metric. A metric where no variant has a
    verdict is left out (named once under the panels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from lora_sweep.compare.figures import drawable_labels

    rows = matrix(summary)
    keys, empty = panels(summary)
    if not rows or not keys:
        return None
    labels, font, note = drawable_labels([v["name"] for v, _ in rows], list(range(1, len(rows) + 1)))
    if empty:
        note = "; ".join(n for n in (note, f"not drawn, no variant has a value: {', '.join(empty)}") if n)
    cols = min(COLUMNS, len(keys))
    lines = math.ceil(len(keys) / cols)
    panel_in = 0.45 + 0.28 * len(rows)
    height_in = lines * (panel_in + 0.55) + 0.2
    figure = Figure(figsize=(3.2 * cols + 1.4, height_in), dpi=90)
    figure.subplots_adjust(left=1.4 / (3.2 * cols + 1.4), right=0.98, top=1 - 0.35 / height_in,
                           bottom=0.45 / height_in, wspace=0.12, hspace=0.55 / panel_in)
    FigureCanvasAgg(figure)
    positions = list(range(len(rows)))[::-1]  # the first variant on top, as in the matrix
    for panel, key in enumerate(keys):
        axes = figure.add_subplot(lines, cols, panel + 1)
        axes.axvline(0.0, color="#444444", linewidth=0.9)
        for y, (variant, verdicts) in zip(positions, rows, strict=True):
            entry = variant["vs_baseline"].get(key) or {}
            found = verdicts[key]
            colour = COLOURS[found]
            if found == "no value" or entry.get("effect") is None:  # in axes units: clear of the y labels
                diverged = bool(entry.get("not_finite"))
                text = (found if found == "not finite" else f"{found}: not finite") if diverged else "no value"
                axes.text(0.03, y, text, fontsize=7, va="center",
                          color=colour if diverged else "#888888", transform=axes.get_yaxis_transform())
                continue
            if entry.get("low") is not None:
                axes.plot([entry["low"], entry["high"]], [y, y], color=colour, linewidth=2.2, solid_capstyle="butt")
            axes.plot([entry["effect"]], [y], marker="o", markersize=5, color=colour,
                      markerfacecolor=colour if entry.get("low") is not None else "white")
        direction = {"min": " (lower is better)", "max": " (higher is better)"}.get(DIRECTIONS.get(key, ""), "")
        axes.set_title(f"{key}{direction}", fontsize=8)
        axes.set_ylim(-0.6, len(rows) - 0.4)
        axes.set_yticks(positions)
        axes.set_yticklabels(labels if panel % cols == 0 else [], fontproperties=font)
        axes.tick_params(axis="x", labelsize=7)
        axes.xaxis.set_major_locator(MaxNLocator(nbins=4))  # a 3-inch panel fits about four labels
        axes.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        axes.xaxis.get_offset_text().set_fontsize(7)
        axes.grid(axis="x", alpha=0.3)
    if note:
        figure.text(0.01, 0.005, note, fontsize=7, color="#666666")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
