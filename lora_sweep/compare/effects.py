"""What the report compares, and how: common metrics only, each with its interval, paired where the design pairs.

Common metrics (the same measurement on the same inputs for every variant, whatever its loss or optimizer):
`fit/loss` and `val/loss` (fixed (image, t, eps) points, plain MSE), the fitting speed derived from the `fit/loss`
curve (`fit/loss_auc`, `fit/steps_to_half`, lora_sweep.compare.stats.fitting_speed) and the image metrics of the
samples (`img/*`, same prompts and seeds). `train/loss` (each variant's own objective), the loss weights and
huber_c, the learning rate (d*lr for D-Adaptation/Prodigy) stay curves; cache counts and other bookkeeping are
not compared at all.

Only finished runs enter the numbers (a failed or stopped run's last value is not a final one). A difference b - a
(`difference`) is computed on the most honest basis the runs allow:
1. paired over seeds, when both variants have replicates with at least two seeds in common;
2. unpaired (Welch) over runs, when both have at least two replicates but fewer than two seeds in common;
3. otherwise (one run each) paired over the evaluation points of the two shown runs: the (image, t, eps) points of
   fit/val loss, the (prompt, seed) images of the image metrics; this interval holds evaluation noise only, not
   run-to-run noise, and says so;
4. otherwise the bare difference, with no interval.
Two variants measured on different inputs (other sample prompts, other validation or data settings) are "not
comparable" for those metrics, with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from lora_sweep.compare.metrics import METRIC_KEYS, image_metrics
from lora_sweep.compare.params import knobs, Knob
from lora_sweep.compare.stats import (
    Difference, Estimate, fitting_speed, mean_interval, no_interval, paired_difference, unpaired_difference,
)
from lora_sweep.compare.variants import VariantData, VariantGroup

POINT_METRICS = ("fit/loss", "val/loss")
SPEED_METRICS = ("fit/loss_auc", "fit/steps_to_half")
IMAGE_METRICS = tuple(f"img/{k}" for k in METRIC_KEYS)
COMMON_METRICS = (*POINT_METRICS, *SPEED_METRICS, *IMAGE_METRICS)
METRIC_NOTES = {
    "fit/loss": "MSE on fixed training images x timesteps x noise (the common yardstick)",
    "val/loss": "MSE on held-out images x timesteps x noise",
    "fit/loss_auc": "area under the fit/loss curve / steps (lower: fits sooner)",
    "fit/steps_to_half": "steps to half of the run's fit/loss decrease (lower: fits faster)",
}
EVAL_NOISE_ONLY = "1 run each: evaluation noise only, not run-to-run noise"
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


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def present_metrics(groups: Sequence[VariantGroup], step: int | None = None) -> list[str]:
    """The common metrics at least one run has, in COMMON_METRICS order."""
    return [m for m in COMMON_METRICS if any(run_value(r, m, step) is not None for g in groups for r in g.finished)]


def estimate(group: VariantGroup, metric: str, step: int | None = None) -> Estimate:
    """Mean over the variant's finished replicates with its t interval (none for n = 1)."""
    return mean_interval([v for r in group.finished if (v := run_value(r, metric, step)) is not None])


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


def difference(a: VariantGroup, b: VariantGroup, metric: str, step: int | None = None,
               images: dict[str, dict[str, dict[str, float]]] | None = None) -> Difference | NotComparable | None:
    """b - a for `metric` on the most honest basis available (see the module docstring); None when a side has no
    value. `images` caches `image_values` by run id."""
    why = comparable(a, b, metric)
    if why is not None:
        return why
    va = {r.seed: v for r in a.finished if (v := run_value(r, metric, step)) is not None}
    vb = {r.seed: v for r in b.finished if (v := run_value(r, metric, step)) is not None}
    if not va or not vb:
        return None
    common = sorted(s for s in set(va) & set(vb) if s is not None)
    if len(common) >= 2:
        return paired_difference([va[s] for s in common], [vb[s] for s in common], unit="seeds")
    if len(va) >= 2 and len(vb) >= 2:
        return unpaired_difference(list(va.values()), list(vb.values()), unit="runs")
    ra, rb = a.representative, b.representative
    if metric in POINT_METRICS:
        pa, pb = ra.points.get(metric) or {}, rb.points.get(metric) or {}
        shared = sorted(set(pa) & set(pb))
        if len(shared) >= 2:
            found = paired_difference([pa[k] for k in shared], [pb[k] for k in shared], unit="(image, t, eps) points")
            return dataclasses.replace(found, note=EVAL_NOISE_ONLY)
    if metric in IMAGE_METRICS:
        images = images if images is not None else {}
        for run in (ra, rb):
            if run.run_id not in images:
                images[run.run_id] = image_values(run)
        ia, ib = images[ra.run_id].get(metric, {}), images[rb.run_id].get(metric, {})
        shared = sorted(set(ia) & set(ib))
        if len(shared) >= 2:
            found = paired_difference([ia[k] for k in shared], [ib[k] for k in shared], unit="(prompt, seed) images")
            return dataclasses.replace(found, note=EVAL_NOISE_ONLY)
    first_a, first_b = run_value(ra, metric, step), run_value(rb, metric, step)
    if first_a is None or first_b is None:
        return None
    return no_interval(first_a, first_b)


@dataclasses.dataclass
class OneKnobPair:
    """Two variants that differ in exactly one knob, and b's effect (b - a) on every common metric."""

    a: int  # index into the groups
    b: int
    knob: Knob
    effects: dict[str, Difference | NotComparable | None]


def one_knob_pairs(groups: Sequence[VariantGroup], metrics: Sequence[str], step: int | None = None,
                   images: dict | None = None) -> list[OneKnobPair]:
    """Every pair (a before b in the natural order) whose configs differ in exactly one knob."""
    images = images if images is not None else {}
    pairs = []
    for i, a in enumerate(groups):
        for j in range(i + 1, len(groups)):
            b = groups[j]
            found = knobs(a.params, b.params, a.representative.choices, b.representative.choices)
            if len(found) == 1:
                effects = {m: difference(a, b, m, step, images) for m in metrics}
                pairs.append(OneKnobPair(i, j, found[0], effects))
    return pairs


def same_training(groups: Sequence[VariantGroup]) -> list[tuple[int, int]]:
    """Pairs of variants that train the same config under two names (they differ in no knob, e.g. v61 and v62 of
    `make demo`, whose only difference, the step budget, the demo sets to the same value)."""
    return [(i, j) for i, a in enumerate(groups) for j in range(i + 1, len(groups))
            if not knobs(a.params, groups[j].params, a.representative.choices, groups[j].representative.choices)]


def effect_dict(found: Difference | NotComparable | None) -> dict | None:
    if found is None:
        return None
    return found.as_dict() if isinstance(found, NotComparable) else {"comparable": True, **found.as_dict()}
