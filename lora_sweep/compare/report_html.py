"""The comparison report's content, from plain data to one self-contained HTML page and its PNG figures.

No MLflow here (`report.py` reads the runs and fills `ReportData`): this module only decides what a reader sees.
The layout follows the article: a parameter table with rows = parameters and columns = variants (only the rows that
differ), a sample grid with one row per variant and one column per prompt (same step, same seed), curves of every
variant on shared axes, and the final metrics with each variant's difference from a baseline.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from typing import Sequence

from PIL import Image

from lora_sweep.compare.metrics import METRIC_KEYS

PARAM_ORDER = ("precision.", "optimizer.", "loss.", "noise.", "train.", "network.", "sampling.", "data.", "model.")
CURVE_GROUPS = {"losses": ("train/loss", "val/loss", "train/lr"), "image_metrics": tuple(f"img/{k}" for k in METRIC_KEYS)}
CELL_MAX_PX = 384  # embedded grid cells are downscaled to this; full-size PNGs stay in MLflow
GRID_CELL_MAX_PX = 512  # grid.png: 12 variants x 4 prompts at 1024 px would be a ~100 MB PNG


@dataclasses.dataclass
class VariantData:
    """One compared run, as the report needs it."""

    name: str
    run_id: str
    status: str
    params: dict[str, str]
    final_metrics: dict[str, float]
    histories: dict[str, list[tuple[int, float]]]  # metric key -> [(step, value)] in step order
    cells: dict[str, Image.Image | None]  # image key (sample_pNN) -> sample at the report's step
    cell_steps: dict[str, int | None]  # image key -> the step that sample was logged at


@dataclasses.dataclass
class ReportData:
    title: str
    subtitle: str
    step: int | None
    image_keys: list[str]
    column_titles: dict[str, str]
    variants: list[VariantData]
    baseline: int = 0  # index into variants
    notes: list[str] = dataclasses.field(default_factory=list)


def _param_sort_key(key: str) -> tuple[int, str]:
    for rank, prefix in enumerate(PARAM_ORDER):
        if key.startswith(prefix):
            return rank, key
    return len(PARAM_ORDER), key


def differing_params(variants: Sequence[VariantData]) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """Split the union of params into rows that differ between variants and rows shared by all.

    A param a run lacks shows as "x", the article's mark for "off / not set". A run's status is a row too, so a
    failed variant stands out.
    """
    keys = sorted({k for v in variants for k in v.params} | {"status"}, key=_param_sort_key)
    differ, shared = [], []
    for key in keys:
        values = [v.status if key == "status" else v.params.get(key, "x") for v in variants]
        (differ if len(set(values)) > 1 else shared).append((key, values))
    return differ, [(key, values[0]) for key, values in shared]


def ordered_metric_keys(variants: Sequence[VariantData]) -> list[str]:
    """Known keys first (losses, then image metrics in their documented order), then any others alphabetically."""
    present = {k for v in variants for k in v.final_metrics}
    known = [k for group in CURVE_GROUPS.values() for k in group if k in present]
    return known + sorted(present - set(known))


def format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}"


def delta_text(value: float | None, base: float | None) -> str:
    """'+0.012 (+3.1%)': the signed difference from the baseline, and relative when the baseline is not ~0."""
    if value is None or base is None:
        return ""
    diff = value - base
    relative = f" ({diff / abs(base):+.1%})" if abs(base) > 1e-12 else ""
    return f"{diff:+.3g}{relative}"


def ema(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): diffusion losses are noisy per step."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count))
    return smoothed


def curve_figure(variants: Sequence[VariantData], keys: Sequence[str]) -> bytes | None:
    """One PNG with a panel per metric key, one line per variant on shared axes; None when no key has data."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in keys if any(v.histories.get(k) for v in variants)]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    legend_in = 0.25 * math.ceil(len(variants) / 6)  # manual margins: constrained layout doubles the time
    height_in = 3.0 * rows + legend_in + 0.2
    figure = Figure(figsize=(4.6 * cols, height_in), dpi=100)
    figure.subplots_adjust(left=0.07, right=0.98, top=1 - 0.3 / height_in, bottom=(legend_in + 0.6) / height_in,
                           wspace=0.28, hspace=0.45)
    FigureCanvasAgg(figure)
    palette = colormaps["tab10" if len(variants) <= 10 else "tab20"]
    for panel, key in enumerate(keys):
        axes = figure.add_subplot(rows, cols, panel + 1)
        for index, variant in enumerate(variants):
            history = variant.histories.get(key) or []
            if not history:
                continue
            steps, values = [s for s, _ in history], [v for _, v in history]
            color = palette(index % palette.N)
            if key == "train/loss" and len(values) > 20:
                axes.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
                axes.plot(steps, ema(values), color=color, label=variant.name, linewidth=1.6)
            else:
                axes.plot(steps, values, color=color, label=variant.name, marker="o" if len(values) < 15 else None,
                          markersize=3, linewidth=1.4)
        axes.set_title(key + (" (EMA 0.9)" if key == "train/loss" else ""), fontsize=10)
        axes.set_xlabel("optimizer step", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False,
                  bbox_to_anchor=(0.5, 0.0))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _thumbnail(image: Image.Image | None, max_px: int) -> Image.Image | None:
    if image is None:
        return None
    thumb = image.convert("RGB")
    thumb.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return thumb


def cell_data_uri(image: Image.Image) -> str:
    """A downscaled JPEG of a sample as a data: URI, so the HTML needs no files beside it and stays small."""
    thumb = _thumbnail(image, CELL_MAX_PX)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def grid_png(data: ReportData) -> bytes | None:
    """The sample grid as one labelled PNG (rows = variants, columns = prompts) for use outside the HTML."""
    from lora_sweep.compare.sampling import make_grid

    if not data.image_keys or not data.variants:
        return None
    cells = [_thumbnail(v.cells.get(k), GRID_CELL_MAX_PX) for v in data.variants for k in data.image_keys]
    labels = [f"{v.name} · {k}" for v in data.variants for k in data.image_keys]
    buffer = io.BytesIO()
    make_grid(cells, rows=len(data.variants), cols=len(data.image_keys), labels=labels).save(buffer, format="PNG")
    return buffer.getvalue()


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:1.5em;margin-bottom:0}.sub{color:#666;margin-top:4px}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}.base{background:#eef6ff}
.grid td{padding:2px;text-align:center;vertical-align:top}.grid img{width:192px;height:auto;image-rendering:auto}
.grid th.row{text-align:left;white-space:nowrap}.delta{color:#555;font-size:12px}.note{color:#8a5a00}
img.fig{max-width:100%}details{margin-bottom:16px}
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, cls: str = "", raw: bool = False) -> str:
    esc = (lambda s: s) if raw else html.escape
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def render_html(data: ReportData, figures: dict[str, bytes]) -> str:
    """The whole page; every image is embedded, so the file can be mailed or opened from anywhere."""
    names = [v.name for v in data.variants]
    differ, shared = differing_params(data.variants)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data.title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(data.title)}</h1>",
             f"<p class='sub'>{html.escape(data.subtitle)}</p>"]
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in data.notes]
    parts.append(f"<h2>1. Parameters that differ ({len(differ)} of {len(differ) + len(shared)})</h2>")
    parts.append(_table(["parameter", *names], [[key, *values] for key, values in differ], cls="params"))
    parts.append(f"<details><summary>{len(shared)} parameters shared by all variants</summary>"
                 + _table(["parameter", "value"], shared) + "</details>")

    step_text = f"step {data.step}" if data.step is not None else "each run's last sampled step"
    parts.append(f"<h2>2. Samples at {html.escape(step_text)} (same prompt and seed per column)</h2>")
    if data.image_keys:
        head = "<tr><th></th>" + "".join(f"<th>{html.escape(data.column_titles.get(k, k))}</th>"
                                         for k in data.image_keys) + "</tr>"
        body = []
        for variant in data.variants:
            cells = []
            for key in data.image_keys:
                image, step = variant.cells.get(key), variant.cell_steps.get(key)
                if image is None:
                    cells.append("<td>missing</td>")
                    continue
                title = html.escape(f"{variant.name} {key} step {step}", quote=True)
                cells.append(f'<td><img src="{cell_data_uri(image)}" alt="{title}" title="{title}" '
                             f'data-run-id="{variant.run_id}" data-key="{html.escape(key)}" data-step="{step}"></td>')
            body.append(f'<tr><th class="row">{html.escape(variant.name)}</th>{"".join(cells)}</tr>')
        parts.append(f'<table class="grid">{head}{"".join(body)}</table>')
    else:
        parts.append("<p>No sample images were logged by these runs (sampling.prompts empty?).</p>")

    parts.append("<h2>3. Curves</h2>")
    for name, png in figures.items():
        parts.append(f'<h3>{html.escape(name.replace("_", " "))}</h3><img class="fig" alt="{name}" '
                     f'src="{png_data_uri(png)}">')
    if not figures:
        parts.append("<p>No metric histories found.</p>")

    base = data.variants[data.baseline] if data.variants else None
    parts.append(f"<h2>4. Final metrics (difference from baseline "
                 f"<b>{html.escape(base.name) if base else '—'}</b>)</h2>")
    rows = []
    for key in ordered_metric_keys(data.variants):
        row = [html.escape(key)]
        for index, variant in enumerate(data.variants):
            value, reference = variant.final_metrics.get(key), base.final_metrics.get(key) if base else None
            delta = "" if index == data.baseline else delta_text(value, reference)
            row.append(f"{format_number(value)}<br><span class='delta'>{html.escape(delta)}</span>")
        rows.append(row)
    header = [f"{n} (baseline)" if i == data.baseline else n for i, n in enumerate(names)]
    parts.append(_table(["metric", *header], rows, cls="final", raw=True))
    parts.append("<p class='sub'>img/* are means over the step's sample images: luminance (noise offset), edge "
                 "energy = variance of the Laplacian (multires noise, min-SNR, debiased), colorfulness, and the "
                 "colour casts cast_yb (&gt; 0 yellow) and cast_rg (&gt; 0 red). See lora_sweep/compare/metrics.py.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
