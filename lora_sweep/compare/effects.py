"""What the report compares, and how: common metrics only, each with its interval, paired where the design pairs.

Common metrics are the same measurement on the same inputs for every variant: `fit/loss`, `val/loss`, the fitting
speed from the fit/loss curve, and the sample images' `img/*` (the image statistics and the scorecard's). Only
finished runs count: a run `sweep.stop_early` stopped is censored (its curves are drawn to its step;
`no_finished_reason` says so where a side has no value). A difference b - a is always the difference of the two means
shown beside it; its interval follows `between` (the table in docs/comparing.md, "Intervals and verdicts"). Variants
measured on other inputs are "not comparable", with the reason. Variants that already differ at step 0 (only the base
model can: fp8 vs fp16) also carry that difference (`at_start`) and the difference of their changes from step 0
(`change`).
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
from lora_sweep.sampling import scorecard
from lora_sweep.sampling.metrics import METRIC_KEYS, fitting_speed, image_metrics

POINT_METRICS = ("fit/loss", "val/loss")
SPEED_METRICS = ("fit/loss_auc", "fit/steps_to_half")
IMAGE_METRICS = tuple(f"img/{k}" for k in METRIC_KEYS)  # per-sample statistics: one-run differences pair by sample
SAMPLED_METRICS = (*IMAGE_METRICS, *scorecard.METRICS)  # logged at the sampling steps, read at the report's step
COMMON_METRICS = (*POINT_METRICS, *SPEED_METRICS, *SAMPLED_METRICS)
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
            **{m: m for m in SAMPLED_METRICS}}
# The size of the terms each metric is made of (stats.resolved); colourfulness is on Hasler-Suesstrunk's 0..255.
SCALE = {"fit/loss": 1.0, "val/loss": 1.0, "fit/loss_auc": 1.0, **{m: 1.0 for m in SAMPLED_METRICS},
         "img/colorfulness": 255.0, "img/clip_t": 100.0}
BOUNDS = {  # the values a metric can take (lora_sweep.sampling.metrics for the image statistics)
    "fit/loss": (0.0, math.inf), "val/loss": (0.0, math.inf), "fit/loss_auc": (0.0, math.inf),
    "img/luminance_mean": (0.0, 1.0), "img/luminance_std": (0.0, 0.5), "img/edge_energy": (0.0, math.inf),
    "img/colorfulness": (0.0, math.inf), "img/cast_yb": (-1.0, 1.0), "img/cast_rg": (-1.0, 1.0),
    # lora_sweep.sampling.scorecard (SSIM, 1 - SSIM) and sampling.embeddings (cosines; CLIP score 0..100)
    "img/copying": (-1.0, 1.0), "img/copying_max": (-1.0, 1.0), "img/diversity": (0.0, 2.0), "img/drift": (0.0, 2.0),
    "img/clip_t": (0.0, 100.0), "img/clip_i": (-1.0, 1.0), "img/dino": (-1.0, 1.0),
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
    """A run's final value of a common metric: the last logged value (image metrics at the report's `step` if
    logged there); the fitting speed recomputed from the whole fit/loss history (a resumed run's too).
    """
    if metric in SPEED_METRICS:
        speed = fitting_speed(run.histories.get("fit/loss") or [])
        if speed is None:
            return _finite(run.final_metrics.get(metric))
        return _finite(speed.loss_auc if metric == "fit/loss_auc" else speed.steps_to_half)
    history = run.histories.get(metric) or []
    if metric in SAMPLED_METRICS and step is not None:
        at = [v for s, v in history if s == step]
        if at:
            return _finite(at[-1])
    if history:
        return _finite(history[-1][1])
    return _finite(run.final_metrics.get(metric))


def value_step(run: VariantData, metric: str, step: int | None = None) -> int | None:
    """The step `run_value`'s value comes from (the fitting speed's: the last fit/loss evaluation)."""
    history = run.histories.get(START_OF.get(metric, metric) if metric in SPEED_METRICS else metric) or []
    if metric in SAMPLED_METRICS and step is not None and any(s == step for s, _ in history):
        return step
    return history[-1][0] if history else None


def row_steps(groups: Sequence[VariantGroup], metric: str, step: int | None = None) -> dict:
    """Which steps a final-metrics row shows: {"steps", "final" (every value is its run's last), "at"}.

    "at" is "final (step 8)", "step 4" or "steps 4, 8": `--step N` moves only the image metrics, so each row says.
    """
    found, final = set(), True
    for run in (r for g in groups for r in g.finished if run_value(r, metric, step) is not None):
        at = value_step(run, metric, step)
        if at is not None:
            found.add(at)
            final = final and at == value_step(run, metric)
    steps = sorted(found)
    listed = f"step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}" if steps else ""
    return {"steps": steps, "final": final, "at": (f"final ({listed})" if listed else "final") if final else listed}


def read_steps(group: VariantGroup, metric: str) -> list[int]:
    """The steps the finished runs' values of `metric` are read from (`value_step`), sorted, once each."""
    return sorted({at for r in group.finished if run_value(r, metric) is not None
                   and (at := value_step(r, metric)) is not None})


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def present_metrics(groups: Sequence[VariantGroup], step: int | None = None) -> list[str]:
    """The common metrics at least one run has, in COMMON_METRICS order."""
    return [m for m in COMMON_METRICS if any(run_value(r, m, step) is not None for g in groups for r in g.finished)]


def start_value(run: VariantData, metric: str) -> float | None:
    """The run's step-0 value of what `metric` is measured from (fit/loss for the fitting speed), else None."""
    key = START_OF.get(metric)
    at = [v for s, v in (run.histories.get(key) or []) if s == 0] if key else []
    return _finite(at[-1]) if at else None


def not_finite_since(run: VariantData, metric: str) -> int | None:
    """The step from which the run's last values of `metric` (fit/loss for the fitting speed) are all NaN or
    infinite (a diverged run), or None when its last logged value is finite."""
    history = run.histories.get(START_OF.get(metric, metric) if metric in SPEED_METRICS else metric) or []
    since = None
    for step, value in reversed(history):
        if math.isfinite(value):
            break
        since = step
    return since


def missing_reason(run: VariantData, metric: str) -> str:
    """Why a finished run has no value of `metric` (run_value gave None), in a few words."""
    if (since := not_finite_since(run, metric)) is not None:
        return f"{START_OF.get(metric, metric)} not finite from step {since}"
    if metric in SPEED_METRICS:
        history = sorted((s, v) for s, v in run.histories.get("fit/loss") or [] if math.isfinite(v))
        if len({s for s, _ in history}) < 2:
            return "fewer than two fit/loss evaluations"
        speed = fitting_speed(history)
        if metric == "fit/steps_to_half" and speed is not None and speed.why_none:
            return speed.why_none
    return f"{metric} not logged"


def bounds(metric: str, runs: Sequence[VariantData]) -> tuple[float, float]:
    """The values `metric` can take; the steps to half lie within [0, the runs' last fit/loss step]."""
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
    """(values of the finished runs, why runs lack one): the reasons when none has a value, else
    '1 of 3 runs: did not decrease (not in the mean)'.
    """
    if not group.finished:
        return [], no_finished_reason(group)
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


def no_finished_reason(group: VariantGroup) -> str:
    """Why a variant has no value: 'no finished run', or which of its runs the rule stopped and where: 'all
    replicates stopped early at step 400' (censored runs enter no mean)."""
    stopped = [r.stopped for r in group.runs if r.stopped]
    if not stopped:
        return "no finished run"
    steps = sorted({s.step for s in stopped if s.step is not None})
    at = f" at step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}" if steps else ""
    if len(stopped) == len(group.runs):
        return f"{'all replicates' if len(stopped) > 1 else 'its run'} stopped early{at}"
    return f"no finished run ({len(stopped)} of {len(group.runs)} stopped early{at})"


def estimate(group: VariantGroup, metric: str, step: int | None = None) -> Estimate:
    """Mean over the variant's finished runs with its t interval (none for n = 1), clipped at `bounds`.

    `missing` says why runs lack a value: a mean over the rest favours the variant, so the page shows the note.
    """
    values, reasons = _reasons(group, metric, step)
    found = mean_interval(values, scale=SCALE.get(metric, 0.0))
    found = dataclasses.replace(found, note=reasons if not values else _join(found.note, reasons), missing=reasons)
    return clip(found, *bounds(metric, group.finished))


def comparable(a: VariantGroup, b: VariantGroup, metric: str) -> NotComparable | None:
    """Why a and b are not measured on the same inputs for `metric`, or None."""
    if metric in SAMPLED_METRICS:
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
    """Both sides have the same known seeds, each once: the runs pair one to one by seed."""
    sa, sb = [r.seed for r, _ in va], [r.seed for r, _ in vb]
    return None not in sa and len(set(sa)) == len(sa) and sorted(sa) == sorted(sb)


def between(name_a: str, va: Values, name_b: str, vb: Values, scale: float, *,
            one_each: Callable[[VariantData, VariantData], Difference | None] | None = None,
            bare_note: str = NO_INTERVAL_N1) -> Difference:
    """b - a, the difference of the two means shown, with the interval the runs allow.

    1. same seeds, n >= 2: paired over seeds (the mean of pair differences is the difference of the means);
    2. n >= 2 each, other seeds: Welch's (pairing the common seeds only would change the means shown);
    3. one run each: `one_each(run_a, run_b)`, else no interval (`bare_note`);
    4. one run against several: no interval, and the note says why.
    `identical` only when the values themselves are.
    """
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
    """One run each: b - a paired over the two runs' evaluation points (evaluation noise only)."""
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
    """b - a for `metric` (`between`), its interval clipped at the metric's bounds.

    A side without a value gives a valueless Difference whose note says why. Variants that differ at step 0 carry
    `at_start` and `change`. `images` caches `image_values` by run id.
    """
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
        note = _join(*(f"{', '.join(n)}: {r}" for r, n in sides.items()))
        return Difference(float("nan"), None, None, 0, "", note, not_finite=_not_finite_side(a, va, b, vb, metric))
    found = between(a.name, va, b.name, vb, SCALE.get(metric, 0.0), one_each=_points_difference(metric, images))
    found = clip(found, *_difference_bounds(metric, [*a.finished, *b.finished]))
    start = start_difference(a, b, metric)
    if start is None:
        return found
    return dataclasses.replace(found, at_start=start, change=change_difference(a, b, metric, step))


def _not_finite_side(a: VariantGroup, va: Values, b: VariantGroup, vb: Values, metric: str) -> str:
    """'a' or 'b' when that side's every finished run ended not finite (diverged) and the other side has values."""
    for side, group, values, other in (("a", a, va, vb), ("b", b, vb, va)):
        if not values and other and group.finished and all(not_finite_since(r, metric) is not None
                                                            for r in group.finished):
            return side
    return ""


def start_difference(a: VariantGroup, b: VariantGroup, metric: str) -> Difference | None:
    """b - a at step 0 when it is not zero, else None.

    Every LoRA is zero at step 0, so a difference there comes from the base model (fp8 vs fp16) and the final
    difference is not training's alone. `of` names what was measured (fit/loss for the fitting speed).
    """
    sa = [(r, v) for r in a.finished if (v := start_value(r, metric)) is not None]
    sb = [(r, v) for r in b.finished if (v := start_value(r, metric)) is not None]
    if not sa or not sb:
        return None
    found = between(a.name, sa, b.name, sb, SCALE.get(START_OF[metric], 0.0), bare_note="one run each: no interval")
    return None if found.identical else dataclasses.replace(found, of=START_OF[metric])


def change_difference(a: VariantGroup, b: VariantGroup, metric: str, step: int | None = None) -> Difference | None:
    """(b_final - b_0) - (a_final - a_0) by `between`: training's effect without the starting difference.

    None for the steps to half (already from each run's start) or without step-0 values.
    """
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
    """Every pair (a before b) differing in exactly one knob; single-value knobs first, then compound ones."""
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
    """Pairs of variants that train the same config under two names (they differ in no knob)."""
    return [(i, j) for i, a in enumerate(groups) for j in range(i + 1, len(groups))
            if not knobs(a.params, groups[j].params, a.representative.choices, groups[j].representative.choices)]


def effect_dict(found: Difference | NotComparable | None) -> dict | None:
    if found is None:
        return None
    return found.as_dict() if isinstance(found, NotComparable) else {"comparable": True, **found.as_dict()}
