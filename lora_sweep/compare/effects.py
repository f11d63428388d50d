"""What the report compares, and how: common metrics only, each with its interval, paired where the design pairs.

Common metrics (the same measurement on the same inputs for every variant, whatever its loss or optimizer):
`fit/loss` and `val/loss` (fixed (image, t, eps) points, plain MSE), the fitting speed derived from the `fit/loss`
curve (`fit/loss_auc`, `fit/steps_to_half`, lora_sweep.sampling.metrics.fitting_speed) and the image metrics of the
samples (`img/*`, same prompts and seeds). `train/loss` (each variant's own objective), the loss weights and
huber_c, the learning rate (d*lr for D-Adaptation/Prodigy) stay curves; cache counts and other bookkeeping are
not compared at all.

Only finished runs enter the numbers (a failed or stopped run's last value is not a final one). A difference b - a
(`difference`, `between`) is always the difference of the two means shown beside it (every finished run of each
variant), with the interval the runs allow:
1. paired over seeds, when both variants have the same seeds and at least two;
2. Welch's interval over runs, when both have at least two runs but other seeds (a pairing over the common seeds
   only would be the difference of other means than those shown);
3. one run each: paired over the evaluation points of the two runs: the (image, t, eps) points of fit/val loss,
   the (prompt, seed) images of the image metrics; this interval holds evaluation noise only, not run-to-run
   noise, and says so ("1 run each");
4. otherwise (one run against several, or nothing to pair) the bare difference, with no interval and a note that
   says why ("no interval: seeds differ (xb: 1, 2; xc: 1), and xc has one run").
Two variants measured on different inputs (other sample prompts, other validation or data settings) are "not
comparable" for those metrics, with the reason. A variant without a value says why (`missing_reason`: a run whose
final fit/loss is not below its start, or whose fit/loss was evaluated only at the start and the end, has no steps
to half: see sampling.metrics.fitting_speed). Intervals are clipped at the metric's `bounds`.

Two variants that already differ at step 0, before any training (every LoRA starts at zero, so only the base
model can make them differ there: fp8 vs fp16 base weights), are flagged: the difference carries the step-0
difference (`at_start`) and the difference of the changes from step 0 (`change`), the effect of training with
the base model's difference taken out; the final difference alone would confound the two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from lora_sweep.compare.params import Knob, knobs
from lora_sweep.compare.stats import (
    NO_INTERVAL_N1,
    Difference,
    Estimate,
    clip,
    mean_interval,
    no_interval,
    paired_difference,
    resolved,
    unpaired_difference,
)
from lora_sweep.compare.variants import VariantData, VariantGroup
from lora_sweep.sampling.metrics import METRIC_KEYS, fitting_speed, image_metrics

POINT_METRICS = ("fit/loss", "val/loss")
SPEED_METRICS = ("fit/loss_auc", "fit/steps_to_half")
IMAGE_METRICS = tuple(f"img/{k}" for k in METRIC_KEYS)
COMMON_METRICS = (*POINT_METRICS, *SPEED_METRICS, *IMAGE_METRICS)
METRIC_NOTES = {
    "fit/loss": "MSE on fixed training images x timesteps x noise (the common yardstick)",
    "val/loss": "MSE on held-out images x timesteps x noise",
    "fit/loss_auc": "area under the fit/loss curve / steps (lower: fits sooner)",
    "fit/steps_to_half": "steps until fit/loss first reaches half of the run's total decrease, start - final "
                         "(lower: fits faster)",
}
EVAL_NOISE_ONLY = "1 run each: evaluation noise only, not run-to-run noise"
# What each metric is measured from at step 0 (before training): see start_difference.
START_OF = {"fit/loss": "fit/loss", "val/loss": "val/loss", "fit/loss_auc": "fit/loss", "fit/steps_to_half": "fit/loss",
            **{m: m for m in IMAGE_METRICS}}
# The size of the terms a metric is computed from (stats.resolved): an MSE of unit-variance noise, a statistic of
# [0, 1] pixels (colourfulness on Hasler and Suesstrunk's 0..255 scale); the steps to half have none (0).
SCALE = {"fit/loss": 1.0, "val/loss": 1.0, "fit/loss_auc": 1.0, **{m: 1.0 for m in IMAGE_METRICS},
         "img/colorfulness": 255.0}
BOUNDS = {  # the values a metric can take (lora_sweep.sampling.metrics for the image statistics)
    "fit/loss": (0.0, math.inf), "val/loss": (0.0, math.inf), "fit/loss_auc": (0.0, math.inf),
    "img/luminance_mean": (0.0, 1.0), "img/luminance_std": (0.0, 0.5), "img/edge_energy": (0.0, math.inf),
    "img/colorfulness": (0.0, math.inf), "img/cast_yb": (-1.0, 1.0), "img/cast_rg": (-1.0, 1.0),
}
# Settings that define the fit/val points; two runs that differ in one of them are not measured on the same points.
YARDSTICK_PREFIXES = ("validation.", "model.", "data.")
YARDSTICK_FREE = ("data.cache_dir", "data.shuffle_caption", "data.keep_tokens", "data.caption_separator",
                  "data.flip_aug")


@dataclasses.dataclass(frozen=True)
class NotComparable:
    reason: str

    def as_dict(self) -> dict:
        return {"comparable": False, "reason": self.reason}


def run_value(run: VariantData, metric: str, step: int | None = None) -> float | None:
    """A run's final value of a common metric: the last logged value; image metrics at the report's `step` when
    the run logged that step; fitting speed recomputed from the whole fit/loss history (a resumed run's too)."""
    if metric in SPEED_METRICS:
        speed = fitting_speed(run.histories.get("fit/loss") or [])
        if speed is None:
            return _finite(run.final_metrics.get(metric))
        return _finite(speed.loss_auc if metric == "fit/loss_auc" else speed.steps_to_half)
    history = run.histories.get(metric) or []
    if metric in IMAGE_METRICS and step is not None:
        at = [v for s, v in history if s == step]
        if at:
            return _finite(at[-1])
    if history:
        return _finite(history[-1][1])
    return _finite(run.final_metrics.get(metric))


def value_step(run: VariantData, metric: str, step: int | None = None) -> int | None:
    """The step `run_value`'s value is from: the report's `step` for an image metric the run logged there, else
    the metric's last logged step (for the fitting speed, the last fit/loss evaluation, the curve's end)."""
    history = run.histories.get(START_OF.get(metric, metric) if metric in SPEED_METRICS else metric) or []
    if metric in IMAGE_METRICS and step is not None and any(s == step for s, _ in history):
        return step
    return history[-1][0] if history else None


def row_steps(groups: Sequence[VariantGroup], metric: str, step: int | None = None) -> dict:
    """Which steps a row of the final metrics shows: {"steps": [...], "final": every value is its run's last,
    "at": "final (step 8)" | "step 4" | "steps 4, 8"}. `--step N` moves the image metrics to step N while the
    losses stay final; the page says so per row rather than letting one title claim "final" for both."""
    found, final = set(), True
    for run in (r for g in groups for r in g.finished if run_value(r, metric, step) is not None):
        at = value_step(run, metric, step)
        if at is not None:
            found.add(at)
            final = final and at == value_step(run, metric)
    steps = sorted(found)
    listed = f"step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}" if steps else ""
    return {"steps": steps, "final": final, "at": (f"final ({listed})" if listed else "final") if final else listed}


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def present_metrics(groups: Sequence[VariantGroup], step: int | None = None) -> list[str]:
    """The common metrics at least one run has, in COMMON_METRICS order."""
    return [m for m in COMMON_METRICS if any(run_value(r, m, step) is not None for g in groups for r in g.finished)]


def start_value(run: VariantData, metric: str) -> float | None:
    """The run's value before any training (step 0) of what `metric` is measured from: fit/loss for the fitting
    speed, the metric itself otherwise; None when the run has no step-0 value or the metric has no start."""
    key = START_OF.get(metric)
    at = [v for s, v in (run.histories.get(key) or []) if s == 0] if key else []
    return _finite(at[-1]) if at else None


def missing_reason(run: VariantData, metric: str) -> str:
    """Why a finished run has no value of `metric` (run_value gave None), in a few words."""
    if metric in SPEED_METRICS:
        history = sorted((s, v) for s, v in run.histories.get("fit/loss") or [] if math.isfinite(v))
        if len({s for s, _ in history}) < 2:
            return "fewer than two fit/loss evaluations"
        speed = fitting_speed(history)
        if metric == "fit/steps_to_half" and speed is not None and speed.why_none:
            return speed.why_none
    return f"{metric} not logged"


def bounds(metric: str, runs: Sequence[VariantData]) -> tuple[float, float]:
    """The values `metric` can take: an MSE or an area is >= 0, an image statistic has its range, the steps to
    half lie within the runs' fit/loss evaluations [0, last step]."""
    if metric == "fit/steps_to_half":
        last = max((s for r in runs for s, _ in r.histories.get("fit/loss") or []), default=math.inf)
        return 0.0, float(last)
    return BOUNDS.get(metric, (-math.inf, math.inf))


def _difference_bounds(metric: str, runs: Sequence[VariantData]) -> tuple[float, float]:
    low, high = bounds(metric, runs)
    return low - high, high - low


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _reasons(group: VariantGroup, metric: str, step: int | None) -> tuple[list[float], str]:
    """(the values of the finished runs, why runs have none: 'did not decrease (...)' when none has a value,
    '1 of 3 runs: did not decrease (not in the mean)' when some have)."""
    if not group.finished:
        return [], "no finished run"
    values, missing = [], []
    for run in group.finished:
        value = run_value(run, metric, step)
        (values.append(value) if value is not None else missing.append(missing_reason(run, metric)))
    if not missing:
        return values, ""
    if not values:
        return values, "; ".join(dict.fromkeys(missing))
    short = "; ".join(dict.fromkeys(m.split(" (")[0] for m in missing))
    return values, f"{len(missing)} of {len(group.finished)} runs: {short} (not in the mean)"


def estimate(group: VariantGroup, metric: str, step: int | None = None) -> Estimate:
    """Mean over the variant's finished replicates with its t interval (none for n = 1), clipped at the metric's
    `bounds`; `missing` (and the note) says why runs have no value (e.g. fit/loss did not decrease). A mean over
    the runs that have a value favours the variant: the page shows that note beside it."""
    values, reasons = _reasons(group, metric, step)
    found = mean_interval(values, scale=SCALE.get(metric, 0.0))
    found = dataclasses.replace(found, note=reasons if not values else _join(found.note, reasons), missing=reasons)
    return clip(found, *bounds(metric, group.finished))


def comparable(a: VariantGroup, b: VariantGroup, metric: str) -> NotComparable | None:
    """Why a and b are not measured on the same inputs for `metric`, or None."""
    if metric in IMAGE_METRICS:
        pa, pb = a.representative.prompts, b.representative.prompts
        if pa is not None and pb is not None and pa != pb:
            return NotComparable("different sample prompts or settings")
        return None
    ka, kb = _yardstick(a.params), _yardstick(b.params)
    if ka != kb:
        keys = sorted(k for k in set(ka) | set(kb) if ka.get(k) != kb.get(k))
        return NotComparable(f"different evaluation inputs ({', '.join(keys[:3])})")
    return None


def _yardstick(params: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items() if k.startswith(YARDSTICK_PREFIXES) and k not in YARDSTICK_FREE
            and not k.startswith(("data.images", "data.skipped", "data.entries", "data.validation_images"))}


def image_values(run: VariantData) -> dict[str, dict[str, float]]:
    """img/<metric> -> {sample key: value} of the run's samples at the report's step."""
    per_key = {key: image_metrics(image) for key, image in run.cells.items() if image is not None}
    return {f"img/{m}": {key: values[m] for key, values in per_key.items()} for m in METRIC_KEYS}


Values = list[tuple[VariantData, float]]  # a variant's finished runs that have a value, with it


def _seeds(values: Values) -> str:
    return ", ".join("?" if r.seed is None else str(r.seed) for r, _ in values)


def _pairable(va: Values, vb: Values) -> bool:
    """Both sides have the same seeds, each once (and known): the runs pair one to one by seed."""
    sa, sb = [r.seed for r, _ in va], [r.seed for r, _ in vb]
    return None not in sa and len(set(sa)) == len(sa) and sorted(sa) == sorted(sb)


def between(name_a: str, va: Values, name_b: str, vb: Values, scale: float, *,
            one_each: Callable[[VariantData, VariantData], Difference | None] | None = None,
            bare_note: str = NO_INTERVAL_N1) -> Difference:
    """b - a: always the difference of the two means the page shows beside it (every finished run of each side
    that has a value), with the interval those runs allow:
    1. paired over seeds when both sides have the same seeds (each once) and n >= 2: the mean of the pairs'
       differences is then exactly the difference of the means;
    2. Welch's interval over runs when both have n >= 2 but other seeds (pairing the common seeds only would show
       the difference of other means than those shown, which can even have the other sign);
    3. one run each: `one_each(run_a, run_b)` (paired over the two runs' evaluation points), else no interval
       (`bare_note`);
    4. one run against several: no interval, and the note says why (the seeds differ, one side has one run).
    `identical` ("no difference") only when the values themselves are identical."""
    effect = resolved(float(np.mean([v for _, v in va])), float(np.mean([v for _, v in vb])), scale)
    seeds = f"seeds differ ({name_b}: {_seeds(vb)}; {name_a}: {_seeds(va)})"
    if len(va) >= 2 and len(vb) >= 2:
        if _pairable(va, vb):
            by_seed = {r.seed: v for r, v in vb}
            found = paired_difference([v for _, v in va], [by_seed[r.seed] for r, _ in va], unit="seeds", scale=scale)
            return dataclasses.replace(found, effect=0.0 if found.identical else effect)
        found = unpaired_difference([v for _, v in va], [v for _, v in vb], unit="runs", scale=scale)
        return dataclasses.replace(found, note=_join(seeds, found.note))
    if len(va) == 1 and len(vb) == 1:
        found = one_each(va[0][0], vb[0][0]) if one_each is not None else None
        if found is None:
            return no_interval(va[0][1], vb[0][1], note=bare_note, scale=scale)
        return dataclasses.replace(found, effect=effect, identical=found.identical and effect == 0.0)
    single = name_a if len(va) == 1 else name_b
    identical = all(resolved(va[0][1], v, scale) == 0.0 for _, v in (*va, *vb))
    return Difference(effect, None, None, len(va) + len(vb), f"unpaired, {len(va)} + {len(vb)} runs",
                      f"no interval: {seeds}, and {single} has one run", identical=identical)


def _points_difference(metric: str, images: dict) -> Callable[[VariantData, VariantData], Difference | None]:
    """For one run each: b - a paired over the evaluation points of the two runs (the (image, t, eps) points of
    fit/val loss, the (prompt, seed) images of the image metrics), an interval of evaluation noise only."""
    scale = SCALE.get(metric, 0.0)

    def paired(ra: VariantData, rb: VariantData) -> Difference | None:
        if metric in POINT_METRICS:
            pa, pb, unit = ra.points.get(metric) or {}, rb.points.get(metric) or {}, "(image, t, eps) points"
        elif metric in IMAGE_METRICS:
            for run in (ra, rb):
                if run.run_id not in images:
                    images[run.run_id] = image_values(run)
            pa, pb = images[ra.run_id].get(metric, {}), images[rb.run_id].get(metric, {})
            unit = "(prompt, seed) images"
        else:
            return None
        shared = sorted(set(pa) & set(pb))
        if len(shared) < 2:
            return None
        found = paired_difference([pa[k] for k in shared], [pb[k] for k in shared], unit=unit, scale=scale)
        return dataclasses.replace(found, note=EVAL_NOISE_ONLY)

    return paired


def difference(a: VariantGroup, b: VariantGroup, metric: str, step: int | None = None,
               images: dict[str, dict[str, dict[str, float]]] | None = None) -> Difference | NotComparable:
    """b - a for `metric` (`between`: the difference of the two means shown, with the interval the runs allow),
    its interval clipped at the metric's bounds. A side without a value gives a Difference with no value whose
    note says why ("v59: did not decrease (the final fit/loss is not below its start)"). When the two already
    differ at step 0 (`start_difference`), the result carries that difference (`at_start`) and the difference of
    the changes from step 0 (`change`). `images` caches `image_values` by run id."""
    why = comparable(a, b, metric)
    if why is not None:
        return why
    images = images if images is not None else {}
    va = [(r, v) for r in a.finished if (v := run_value(r, metric, step)) is not None]
    vb = [(r, v) for r in b.finished if (v := run_value(r, metric, step)) is not None]
    if not va or not vb:
        sides: dict[str, list[str]] = {}  # the same reason on both sides is said once: "v58, v60: did not decrease"
        for group in (g for g, v in ((a, va), (b, vb)) if not v):
            sides.setdefault(_reasons(group, metric, step)[1], []).append(group.name)
        return Difference(float("nan"), None, None, 0, "", _join(*(f"{', '.join(n)}: {r}" for r, n in sides.items())))
    found = between(a.name, va, b.name, vb, SCALE.get(metric, 0.0), one_each=_points_difference(metric, images))
    found = clip(found, *_difference_bounds(metric, [*a.finished, *b.finished]))
    start = start_difference(a, b, metric)
    if start is None:
        return found
    return dataclasses.replace(found, at_start=start, change=change_difference(a, b, metric, step))


def start_difference(a: VariantGroup, b: VariantGroup, metric: str) -> Difference | None:
    """b - a at step 0, before any training, when it is not zero; None when the two start alike (or a side has
    no step-0 value). At step 0 every LoRA is zero, so two variants on the same base model measure the same
    points alike; a difference there comes from the base model itself (fp8 vs fp16 base weights: quantisation),
    and a final difference between them is not an effect of training alone. `of` names what was measured at
    step 0 (fit/loss for the fitting speed), so the page labels it in its own units."""
    sa = [(r, v) for r in a.finished if (v := start_value(r, metric)) is not None]
    sb = [(r, v) for r in b.finished if (v := start_value(r, metric)) is not None]
    if not sa or not sb:
        return None
    found = between(a.name, sa, b.name, sb, SCALE.get(START_OF[metric], 0.0), bare_note="one run each: no interval")
    return None if found.identical else dataclasses.replace(found, of=START_OF[metric])


def change_difference(a: VariantGroup, b: VariantGroup, metric: str, step: int | None = None) -> Difference | None:
    """The difference of the changes from step 0: (b_final - b_0) - (a_final - a_0), on the same basis as any
    difference (`between`), the effect of training with the starting difference taken out. None for the steps to
    half (already measured from each run's own start) or without step-0 values."""
    if metric == "fit/steps_to_half":
        return None

    def changes(group: VariantGroup) -> Values:
        return [(r, v - s) for r in group.finished
                if (v := run_value(r, metric, step)) is not None and (s := start_value(r, metric)) is not None]

    ca, cb = changes(a), changes(b)
    if not ca or not cb:
        return None
    return between(a.name, ca, b.name, cb, SCALE.get(metric, 0.0), bare_note="one run each: no interval")


@dataclasses.dataclass
class OneKnobPair:
    """Two variants that differ in exactly one knob, and b's effect (b - a) on every common metric."""

    a: int  # index into the groups
    b: int
    knob: Knob
    effects: dict[str, Difference | NotComparable | None]


def one_knob_pairs(groups: Sequence[VariantGroup], metrics: Sequence[str], step: int | None = None,
                   images: dict | None = None) -> list[OneKnobPair]:
    """Every pair (a before b in the natural order) whose configs differ in exactly one knob: first those whose
    knob changes one value, then the compound ones (a group choice that changes several values), each in the
    natural order."""
    images = images if images is not None else {}
    pairs = []
    for i, a in enumerate(groups):
        for j in range(i + 1, len(groups)):
            b = groups[j]
            found = knobs(a.params, b.params, a.representative.choices, b.representative.choices)
            if len(found) == 1:
                effects = {m: difference(a, b, m, step, images) for m in metrics}
                pairs.append(OneKnobPair(i, j, found[0], effects))
    return sorted(pairs, key=lambda pair: pair.knob.compound)


def same_training(groups: Sequence[VariantGroup]) -> list[tuple[int, int]]:
    """Pairs of variants that train the same config under two names (they differ in no knob, e.g. v61 and v62 of
    `make demo`, whose only difference, the step budget, the demo sets to the same value)."""
    return [(i, j) for i, a in enumerate(groups) for j in range(i + 1, len(groups))
            if not knobs(a.params, groups[j].params, a.representative.choices, groups[j].representative.choices)]


def effect_dict(found: Difference | NotComparable | None) -> dict | None:
    if found is None:
        return None
    return found.as_dict() if isinstance(found, NotComparable) else {"comparable": True, **found.as_dict()}
