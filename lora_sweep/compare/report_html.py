"""The comparison report's content, from plain data to one self-contained HTML page (no MLflow here).

In a reader's order: which variant is better by more than the noise (first_screen.py), the pictures, the curves,
the settings that differ, and the numbers one click away. Every number is rendered from the summary
(`summary.build_summary`) the page also embeds as JSON.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence

from lora_sweep.compare.best import BestStep
from lora_sweep.compare.cells import (
    CLIPPED_MARK,
    EVAL_NOISE_MARK,
    effect_text,
    estimate_text,
    row_decimals,
    start_text,
)
from lora_sweep.compare.figures import (
    cell_data_uri,
    labelled_grid_png,
    png_data_uri,
)
from lora_sweep.compare.first_screen import first_screen
from lora_sweep.compare.footnotes import Footnotes
from lora_sweep.compare.params import cut, parameter_table, row_label
from lora_sweep.compare.stats import REPLICATE_HINT
from lora_sweep.compare.summary import WARNINGS_ARTIFACT, build_summary, script_block
from lora_sweep.compare.variants import VariantData, VariantGroup, group_replicates, unfinished_text
from lora_sweep.compare.verdicts import css as verdict_css
from lora_sweep.tracking.metric_spec import MetricSpec


@dataclasses.dataclass
class ReportData:
    title: str
    subtitle: str
    step: int | None
    image_keys: list[str]
    column_titles: dict[str, str]
    variants: list[VariantData]  # every compared run
    baseline: int = 0  # index into groups
    notes: list[str] = dataclasses.field(default_factory=list)
    groups: list[VariantGroup] = dataclasses.field(default_factory=list)  # replicates grouped, natural order
    experiment: str = ""
    sweep_run_id: str | None = None
    tracking_uri: str = ""
    progression_key: str | None = None  # the prompt shown over the steps
    select: MetricSpec | None = None  # compare.select / --select: what each variant's best checkpoint is chosen by
    best: list[BestStep] = dataclasses.field(default_factory=list)  # per group, in groups' order; [] without select

    def __post_init__(self):
        if not self.groups:
            self.groups = group_replicates(self.variants)


def grid_png(data: ReportData) -> bytes | None:
    """The sample grid as one labelled PNG (rows = variants, columns = prompts) for use outside the HTML."""
    if not data.image_keys or not data.groups:
        return None
    cells = [g.representative.cells.get(k) for g in data.groups for k in data.image_keys]
    labels = [f"{g.name} · {k}" for g in data.groups for k in data.image_keys]
    return labelled_grid_png(cells, len(data.groups), len(data.image_keys), labels)


def progression_columns(data: ReportData) -> list[int]:
    from lora_sweep.compare.figures import progression_steps

    return progression_steps([s for g in data.groups for s, _ in g.representative.progression])


def progression_png(data: ReportData) -> bytes | None:
    """Variants x steps for one prompt and seed, as one labelled PNG."""
    steps = progression_columns(data)
    if not steps:
        return None
    cells = [dict(g.representative.progression).get(s) for g in data.groups for s in steps]
    labels = [f"{g.name} · step {s}" for g in data.groups for s in steps]
    return labelled_grid_png(cells, len(data.groups), len(steps), labels)


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:1.5em;margin-bottom:0}.sub{color:#666;margin-top:4px}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}.base{background:#eef6ff}
.grid td{padding:2px;text-align:center;vertical-align:top}.grid img{width:160px;height:auto;image-rendering:auto}
.grid th.row{text-align:left;white-space:nowrap}.delta{font-size:12px;display:block}.note{color:#8a5a00}
.noise{color:#777}.diff{color:#1d3f8f;font-weight:600}.same{color:#2a6a2a}.none{color:#999}.n{color:#888;font-size:11px}
.start{color:#8a5a00;font-size:11px;display:block}.compound{color:#8a5a00;font-weight:600}
img.fig{max-width:100%}details{margin-bottom:8px}code{font-size:12px}
details.config{display:inline-block;vertical-align:top;margin:0 10px 4px 0}.configs{margin-bottom:12px}
details.config td,.shared td{max-width:70em;overflow-wrap:anywhere}pre.warnings{font-size:12px;white-space:pre-wrap}
h2{font-size:1.25em;margin:18px 0 6px}table.verdicts{margin:6px 0 4px}
table.verdicts td.v{text-align:center;font-size:12px}
table.verdicts th.metric{font-size:11px;font-weight:600;padding:2px 4px}td.best{font-size:12px;white-space:nowrap}
.flag{color:#b00020;font-size:11px;display:inline-block;max-width:20em;white-space:normal}
.legend{font-size:12px;margin:2px 0 8px}.swatch{display:inline-block;width:10px;
height:10px;border:1px solid #aaa}sup.fn{color:#8a5a00;font-size:10px}ol.footnotes{font-size:12px;color:#555}
details>summary{cursor:pointer;font-weight:600}
""" + verdict_css()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, cls: str = "", raw: bool = False) -> str:
    esc = (lambda s: s) if raw else html.escape
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _column_heads(summary: dict) -> list[str]:
    return [f"{v['name']} (baseline)" if v["is_baseline"] else v["name"] for v in summary["variants"]]


def _cut_cell(value: str) -> str:
    """A table cell's value, cut when long (the full value in its title and in the resolved configs)."""
    shown = cut(value)
    if shown == value:
        return html.escape(value)
    return f"<span class='cut' title='{html.escape(value, quote=True)}'>{html.escape(shown)}</span>"


def _parameters(data: ReportData) -> tuple[str, list[str]]:
    from lora_sweep.compare.table import OPTIMIZER_ABBREVIATIONS

    differ, shared = parameter_table(data.groups)
    total = len(differ) + len(shared)
    used = {v for key, values in differ if key == "optimizer.name" for v in values if v in OPTIMIZER_ABBREVIATIONS}
    rows = [[html.escape(row_label(key)),
             *[_cut_cell(OPTIMIZER_ABBREVIATIONS.get(v, v) if key == "optimizer.name" else v) for v in values]]
            for key, values in differ]
    heads = "".join(f"<th>{html.escape(g.name)}<br><span class='n'>{html.escape(g.n_text)}</span></th>"
                    for g in data.groups)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    legend = ", ".join(f"{OPTIMIZER_ABBREVIATIONS[name]} = {name}" for name in sorted(used))
    parts = ["<p class='sub'>The article's table: a value only where it has an effect, x where the knob is off, "
             "v where a switch is on. Columns in the sweep's order; n = replicates (runs that differ only in "
             f"train.seed).{(' Optimizers as the article writes them: ' + html.escape(legend) + '.') if legend else ''}"
             " Long values are cut (hover for the whole value; it is also in the resolved configs below).</p>",
             f'<table class="params"><tr><th>parameter</th>{heads}</tr>{body}</table>',
             f"<details><summary>{len(shared)} parameters shared by all variants</summary>"
             + _table(["parameter", "value"], [[html.escape(k), _cut_cell(v)] for k, v in shared], cls="shared",
                      raw=True) + "</details>"]
    configs = []
    for group in data.groups:
        config = sorted(group.params.items())
        title = html.escape(f"{len(config)} params of run {group.representative.run_id}", quote=True)
        configs.append(f"<details class='config'><summary title='{title}'>{html.escape(group.name)}</summary>"
                       + _table(["key", "value"], config) + "</details>")
    parts.append(f"<div class='configs'>Full resolved config of each variant: {''.join(configs)}</div>")
    return f"Parameters that differ ({len(differ)} of {total})", parts


def _start_span(entry: dict | None, attributes: str) -> str:
    text = start_text(entry)
    return f"<span class='start' {attributes} data-kind='at-start'>{html.escape(text)}</span>" if text else ""


def _mean_text(entry: dict, decimals: int | None) -> str:
    """`estimate_text`, a mean without a value as 'no value: <why>', so its why is footnoted like a difference's."""
    text = estimate_text(entry, decimals)
    return f"no value: {text}" if entry["mean"] is None and text != "—" else text


def _final_metrics(summary: dict, notes: Footnotes) -> tuple[str, list[str]]:
    rows = []
    for metric in summary["metrics"]:
        key = metric["key"]
        at = f"<br><span class='n' data-metric='{key}' data-kind='step'>at {html.escape(metric['at'])}</span>" \
            if metric.get("at") else ""
        row = [f"<b>{html.escape(key)}</b><br><span class='n'>{html.escape(metric['note'])}</span>{at}"]
        decimals = row_decimals(v["metrics"][key] for v in summary["variants"])
        for variant in summary["variants"]:
            entry = variant["metrics"][key]
            name = html.escape(variant["name"], quote=True)
            lost = f" · {unfinished_text(variant['unfinished'])}" if variant.get("unfinished") else ""
            # n is in the column's head; a cell says it only where fewer runs have a value
            n = (f" <span class='n'>n = {entry['n']}{html.escape(lost)}</span>"
                 if entry["n"] and (entry["n"] != variant["n"] or lost) else "")
            cell = (f"<span data-variant='{name}' data-metric='{key}' data-kind='mean' "
                    f"title='{html.escape(entry['note'], quote=True)}'>"
                    f"{notes.cell(_mean_text(entry, decimals))}</span>{n}")
            if not variant["is_baseline"]:
                found = variant["vs_baseline"].get(key)
                text, cls = effect_text(found)
                basis = "; ".join(t for t in ((found or {}).get("basis"), (found or {}).get("note")) if t)
                cell += (f"<span class='delta {cls}' data-variant='{name}' data-metric='{key}' data-kind='vs-baseline'"
                         f" title='{html.escape(basis, quote=True)}'>{notes.cell(text)}</span>"
                         + _start_span(found, f"data-variant='{name}' data-metric='{key}'"))
            row.append(cell)
        rows.append(row)
    final = all(m.get("final", True) for m in summary["metrics"])
    title = "Final metrics" if final else f"Metrics (image metrics at step {summary['step']}, the rest final)"
    heads = [f"{head} ({v['n_text']})" for head, v in zip(_column_heads(summary), summary["variants"], strict=True)]
    return (f"{title} on a common yardstick (difference from baseline {summary['baseline']}, 95 % intervals)",
            ["<p class='sub'>Mean over replicates [95 % t interval]; below it, the difference from the baseline: "
             "always the difference of the two means shown, with its interval paired over seeds when both have the "
             "same seeds, Welch's over runs when their seeds differ, over the same (image, t, eps) points or "
             "(prompt, seed) images when both have one run, and none when one run faces several (hover for the "
             "basis). <i>no difference</i>: identical values (differences below floating-point "
             "resolution, 1e-9 of the values, count as none); <i>within noise</i>: the interval covers zero. "
             f"{EVAL_NOISE_MARK} one run each: the interval holds the evaluation points' noise, not run-to-run noise "
             f"(add train.seed=1,2,3 for that). {CLIPPED_MARK} interval clipped at the metric's natural bounds (steps "
             "within the run, an MSE at 0), which keeps its 95 % coverage: the true value lies within them. "
             "<i>differs at step 0</i>: the two already differ before training (e.g. fp8 vs fp16 base weights), "
             "so the final difference is not training's alone; the change from step 0 is. Numbered notes are "
             "under the table.</p>",
             _table(["metric", *heads], rows, cls="final", raw=True)])


def _one_knob(summary: dict, notes: Footnotes) -> tuple[str, list[str]]:
    parts = ["<p class='sub'>Pairs of variants whose configs differ in exactly one knob (a config-group choice or "
             "one value); the effect of going from the first to the second on every common metric. A group choice "
             "can change several values at once: those pairs are marked <span class='compound'>compound</span>, "
             "listed after the single-value ones, with every value the choice changes.</p>"]
    pairs = summary["one_knob_pairs"]
    if not pairs:
        return "One-knob effects", parts + ["<p>No two compared variants differ in exactly one knob.</p>"]
    rows = []
    for pair in pairs:
        change = html.escape(f"{pair['knob']}: {pair['from']} → {pair['to']}")
        same = [v["key"] for v in pair["values"]] == [pair["knob"]]  # a value knob: its row already says it
        values = "" if same else html.escape(pair["entails"].replace(" -> ", " → "))
        mark = (f"<span class='compound'>compound ({len(pair['values'])} values)</span>: " if pair["compound"]
                else "")
        row = [f"<b>{html.escape(pair['a'])} → {html.escape(pair['b'])}</b>",
               f"{change}<br><span class='n'>{mark}{values}</span>"]
        for metric in summary["metrics"]:
            entry = pair["effects"].get(metric["key"])
            text, cls = effect_text(entry)
            basis = html.escape((entry or {}).get("basis", ""), quote=True)
            where = (f"data-a='{html.escape(pair['a'], quote=True)}' data-b='{html.escape(pair['b'], quote=True)}' "
                     f"data-metric='{metric['key']}'")
            row.append(f"<span class='{cls}' {where} title='{basis}'>{notes.cell(text)}</span>"
                       + _start_span(entry, where))
        rows.append(row)
    return "One-knob effects", parts + [_table(["pair", "knob", *[m["key"] for m in summary["metrics"]]], rows,
                                               cls="knobs", raw=True)]


def _numbers(summary: dict) -> tuple[str, list[str]]:
    """The final metrics and the one-knob effects as tables, one click away, their notes numbered once below."""
    notes = Footnotes()
    body = []
    for title, parts in (_final_metrics(summary, notes), _one_knob(summary, notes)):
        body += [f"<h3>{html.escape(title)}</h3>", *parts]
    summary_line = "Show the numbers: each variant's means, its differences from the baseline, the one-knob effects"
    return "The numbers", [f"<details class='numbers'><summary>{summary_line}</summary>{''.join(body)}"
                           f"<p class='sub'>Notes:</p>{notes.legend()}</details>"]


def _samples(data: ReportData) -> tuple[str, list[str]]:
    step_text = f"step {data.step}" if data.step is not None else "each run's last sampled step"
    title = f"Samples at {step_text} (same prompt and seed per column)"
    if not data.image_keys:
        return title, ["<p>No sample images were logged by these runs (sampling.prompts empty?).</p>"]
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(data.column_titles.get(k, k))}</th>"
                                     for k in data.image_keys) + "</tr>"
    body = []
    for group in data.groups:
        variant, cells = group.representative, []
        for key in data.image_keys:
            image, step = variant.cells.get(key), variant.cell_steps.get(key)
            if image is None:
                cells.append("<td>missing</td>")
                continue
            alt = html.escape(f"{group.name} {key} step {step}", quote=True)
            cells.append(f'<td><img src="{cell_data_uri(image)}" alt="{alt}" title="{alt}" '
                         f'data-run-id="{variant.run_id}" data-key="{html.escape(key)}" data-step="{step}"></td>')
        label = group.name + (f" (seed {variant.seed})" if group.n > 1 else "")
        body.append(f'<tr><th class="row">{html.escape(label)}</th>{"".join(cells)}</tr>')
    return title, [f'<table class="grid">{head}{"".join(body)}</table>']


def _progression(data: ReportData) -> tuple[str, list[str]] | None:
    steps = progression_columns(data)
    if not steps or data.progression_key is None:
        return None
    title = data.column_titles.get(data.progression_key, data.progression_key)
    head = "<tr><th></th>" + "".join(f"<th>step {s}</th>" for s in steps) + "</tr>"
    body = []
    for group in data.groups:
        by_step = dict(group.representative.progression)
        cells = []
        for step in steps:
            image = by_step.get(step)
            alt = html.escape(f"{group.name} {data.progression_key} step {step}", quote=True)
            cells.append(f'<td><img src="{cell_data_uri(image)}" alt="{alt}" title="{alt}" '
                         f'data-progress-run="{group.representative.run_id}" data-progress-step="{step}"></td>'
                         if image is not None else "<td>—</td>")
        body.append(f'<tr><th class="row">{html.escape(group.name)}</th>{"".join(cells)}</tr>')
    return (f"Fitting over the steps: {title}",
            ["<p class='sub'>One prompt and seed, each variant's checkpoints in order (the article compares "
             "v62's epoch 5 with v61 at 6,000 steps this way).</p>",
             f'<table class="grid progression">{head}{"".join(body)}</table>'])


def _curves(figures: dict[str, bytes], summary: dict) -> tuple[str, list[str]]:
    select = summary.get("select")
    marked = (f" A star marks each variant's best step by {html.escape(select['metric'])} (its replicate mean)."
              if select else "")
    parts = ["<p class='sub'>fit/loss and val/loss compare across variants; train/loss is each variant's own "
             "objective (l2, Huber, min-SNR or debiased weighted) and does not; the step size is d*lr for "
             "D-Adaptation and Prodigy. Every img/* metric logged is drawn at its sampled steps. Replicates share "
             f"their variant's colour.{marked}</p>"]
    for name, png in figures.items():
        parts.append(f'<h3>{html.escape(name.replace("_", " "))}</h3><img class="fig" alt="{name}" '
                     f'src="{png_data_uri(png)}">')
    if not figures:
        parts.append("<p>No metric histories found.</p>")
    return "Curves", parts


def _data_warnings(data: ReportData, summary: dict) -> list[str]:
    """A note per distinct data/warnings.txt (runs on the same data share one): count, variants, its text when
    read, and a link to the first run's artifact where it is a local file.
    """
    runs = {r.run_id: r for g in data.groups for r in g.runs}
    total = len(runs)
    shared: dict[tuple[int, str], list[dict]] = {}
    for found in summary.get("data_warnings", []):
        run = runs.get(found["run_id"])
        shared.setdefault((found["count"], (run.warnings_text if run else None) or ""), []).append(found)
    parts = []
    for (count, text), founds in shared.items():
        first = runs.get(founds[0]["run_id"])
        where = f"{first.artifact_uri.rstrip('/')}/{WARNINGS_ARTIFACT}" if first and first.artifact_uri else ""
        link = (f"<a href='{html.escape(where, quote=True)}'>{WARNINGS_ARTIFACT}</a>" if where.startswith("file:")
                else WARNINGS_ARTIFACT)
        names = ", ".join(dict.fromkeys(f["variant"] for f in founds))
        plural = "s" if len(founds) > 1 else ""
        which = f"all {total} runs" if len(founds) == total else f"{len(founds)} run{plural} ({names})"
        ids = " ".join(f["run_id"] for f in founds)
        parts.append(f"<div class='note' data-warnings-runs='{ids}'>⚠ {count} data warning{'s' if count != 1 else ''}"
                     f" (fallbacks the pre-flight allowed) in {html.escape(which)}: see {link} of run "
                     f"{founds[0]['run_id'][:8]}"
                     + (f"<details><summary>show</summary><pre class='warnings'>{html.escape(text)}</pre></details>"
                        if text else "") + "</div>")
    return parts


def render_html(data: ReportData, figures: dict[str, bytes], summary: dict | None = None,
                forest: bytes | None = None) -> str:
    """The whole page, every image embedded; sections with nothing to show are left out, numbering stays continuous.

    `figures`: the curve PNGs by name; `forest`: the forest plot's PNG (forest.forest_figure).
    """
    summary = summary if summary is not None else build_summary(data)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data.title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(data.title)}</h1>",
             f"<p class='sub'>{html.escape(data.subtitle)}</p>"]
    notes = [f"<p class='note'>{html.escape(note)}</p>" for note in summary["notes"]]
    notes += _data_warnings(data, summary)
    if any(g.n == 1 for g in data.groups):
        notes.append(f"<p class='note'>Variants with n = 1 have no interval of their own; {REPLICATE_HINT} "
                     "(python sweep.py -m ... train.seed=1,2,3).</p>")
    title, first = first_screen(summary, png_data_uri(forest) if forest else None)
    # the notes follow the matrix: they qualify it, and must not push it below the first screen
    sections = [(title, first[:-1] + notes + first[-1:] if forest else first + notes), _samples(data),
                _progression(data), _curves(figures, summary), _parameters(data), _numbers(summary)]
    for number, (title, body) in enumerate((s for s in sections if s is not None), start=1):
        parts.append(f"<h2>{number}. {html.escape(title)}</h2>")
        parts += body
    parts.append("<p class='sub'>img/* are means over the step's sample images: luminance (noise offset), edge "
                 "energy = variance of the Laplacian (multires noise, min-SNR, debiased), colorfulness, and the "
                 "colour casts cast_yb (&gt; 0 yellow) and cast_rg (&gt; 0 red). See lora_sweep/sampling/metrics.py. "
                 f"The numbers of this page are in the JSON block #{html.escape('lora-sweep-summary')}.</p>")
    parts.append(script_block(summary))
    parts.append("</body></html>")
    return "\n".join(parts)
