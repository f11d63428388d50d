"""The report's pictures: curves on shared axes (matplotlib Agg PNGs), labelled sample grids, and downscaled
JPEG data URIs that keep the HTML self-contained. Replicates of a variant share its colour and legend entry.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

from PIL import Image

from lora_sweep.sampling.metrics import METRIC_KEYS

STEP_SIZE = "train/step_size"  # a derived curve: train/d_lr (d*lr of D-Adaptation/Prodigy) where logged, else train/lr
CURVE_GROUPS = {
    "losses": ("fit/loss", "val/loss", "train/loss", STEP_SIZE),
    "image_metrics": tuple(f"img/{k}" for k in METRIC_KEYS),  # first, in this order; then every other img/* logged
}
CURVE_TITLES = {
    "fit/loss": "fit/loss: fixed training points (comparable)",
    "val/loss": "val/loss: held-out points (comparable)",
    "train/loss": "train/loss (EMA 0.9): own objective,\nnot comparable across loss types",
    STEP_SIZE: "step size: d*lr (D-Adaptation, Prodigy), else lr",
}
CELL_MAX_PX = 384  # embedded grid cells are downscaled to this; full-size PNGs stay in MLflow
GRID_CELL_MAX_PX = 512  # grid.png: 12 variants x 4 prompts at 1024 px would be a ~100 MB PNG


def ema(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): diffusion losses are noisy per step."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count))
    return smoothed


def curve(variant, key: str) -> list[tuple[int, float]]:
    """A run's history of `key`; STEP_SIZE is d*lr where the optimizer logs it, else lr."""
    if key == STEP_SIZE:
        return variant.histories.get("train/d_lr") or variant.histories.get("train/lr") or []
    return variant.histories.get(key) or []


def curve_groups(variants: Sequence) -> dict[str, tuple[str, ...]]:
    """CURVE_GROUPS with every img/* metric the runs logged (the scorecard's, whatever their names) in its images."""
    logged = sorted({k for v in variants for k in v.histories if k.startswith("img/")})
    known = CURVE_GROUPS["image_metrics"]
    return {**CURVE_GROUPS, "image_metrics": (*known, *(k for k in logged if k not in known))}


def curve_figure(variants: Sequence, keys: Sequence[str], *, colors: Sequence[int] | None = None,
                 labels: Sequence[str] | None = None,
                 marks: dict[str, Sequence[tuple[int, int, float]]] | None = None) -> bytes | None:
    """One PNG with a panel per metric key, one line per run on shared axes; None when no key has data.

    `colors[i]`/`labels[i]`: run i's colour index and legend label (default: one per run). `marks[key]`: (colour
    index, step, value) stars on that key's panel (each variant's best step).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in keys if any(curve(v, k) for v in variants)]
    if not keys:
        return None
    colors = list(colors) if colors is not None else list(range(len(variants)))
    labels = list(labels) if labels is not None else [v.name for v in variants]
    labels, legend_font, note = drawable_labels(labels, colors)
    n_colors = max(colors) + 1 if colors else 1
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    legend_in = 0.25 * math.ceil(n_colors / 6)  # manual margins: constrained layout doubles the time
    height_in = 3.2 * rows + legend_in + 0.2
    figure = Figure(figsize=(4.6 * cols, height_in), dpi=100)
    figure.subplots_adjust(left=0.07, right=0.98, top=1 - 0.45 / height_in, bottom=(legend_in + 0.6) / height_in,
                           wspace=0.28, hspace=0.6)
    FigureCanvasAgg(figure)
    palette = colormaps["tab10" if n_colors <= 10 else "tab20"]
    handles = {}
    for panel, key in enumerate(keys):
        axes = figure.add_subplot(rows, cols, panel + 1)
        for variant, index, label in zip(variants, colors, labels, strict=True):
            history = curve(variant, key)
            if not history:
                continue
            steps, values = [s for s, _ in history], [v for _, v in history]
            color = palette(index % palette.N)
            if key == "train/loss" and len(values) > 20:
                axes.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
                line, = axes.plot(steps, ema(values), color=color, linewidth=1.6)
            else:
                line, = axes.plot(steps, values, color=color, marker="o" if len(values) < 15 else None,
                                  markersize=3, linewidth=1.4)
            handles.setdefault(label, line)
        for index, step, value in (marks or {}).get(key, ()):
            axes.plot([step], [value], marker="*", markersize=13, color=palette(index % palette.N),
                      markeredgecolor="black", markeredgewidth=0.6, zorder=5)
        axes.set_title(CURVE_TITLES.get(key, key), fontsize=9)
        axes.set_xlabel("optimizer step", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
    figure.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6),
                  prop=legend_font, frameon=False, bbox_to_anchor=(0.5, 0.0))
    if note:
        figure.text(0.01, 0.005, note, fontsize=7, color="#666666")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def drawable_labels(labels: Sequence[str], colors: Sequence[int]):
    """(labels, legend FontProperties, note) for matplotlib: a label its default font cannot draw (CJK) brings a font
    that can (sampling/fonts.py; matplotlib falls back glyph by glyph along the family list), else it becomes its
    variant's number `#N` (colour index + 1, the report's variant order) and the note says so."""
    from matplotlib import font_manager

    from lora_sweep.sampling.fonts import covers, font_file_for

    default = font_manager.findfont(font_manager.FontProperties())
    families = [font_manager.FontProperties(fname=default).get_name()]
    shown, numbered = [], []
    for label, color in zip(labels, colors, strict=True):
        found = label if covers(default, label) else font_file_for(label)
        if found is None:
            numbered.append(f"#{color + 1}")
            shown.append(numbered[-1])
            continue
        if found != label and (name := font_manager.FontProperties(fname=found).get_name()) not in families:
            families.append(name)
        shown.append(label)
    numbered = list(dict.fromkeys(numbered))
    note = (f"{', '.join(numbered)}: the report's variant of that number (no font on this machine draws its name)"
            if numbered else "")
    return shown, font_manager.FontProperties(family=families, size=8), note


def thumbnail(image: Image.Image | None, max_px: int) -> Image.Image | None:
    if image is None:
        return None
    thumb = image.convert("RGB")
    thumb.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return thumb


def cell_data_uri(image: Image.Image) -> str:
    """A downscaled JPEG of a sample as a data: URI, so the HTML needs no files beside it and stays small."""
    thumb = thumbnail(image, CELL_MAX_PX)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def labelled_grid_png(cells: Sequence[Image.Image | None], rows: int, cols: int, labels: Sequence[str]) -> bytes:
    """Cells (row-major, None = blank) as one labelled PNG, each downscaled to GRID_CELL_MAX_PX."""
    from lora_sweep.sampling.images import make_grid

    buffer = io.BytesIO()
    make_grid([thumbnail(c, GRID_CELL_MAX_PX) for c in cells], rows=rows, cols=cols,
              labels=list(labels)).save(buffer, format="PNG")
    return buffer.getvalue()


def progression_steps(steps: Sequence[int], most: int = 8) -> list[int]:
    """At most `most` of the sampled steps, evenly spread, always the first and the last."""
    steps = sorted(set(steps))
    if len(steps) <= most:
        return steps
    picks = {steps[round(i * (len(steps) - 1) / (most - 1))] for i in range(most)}
    return sorted(picks)
