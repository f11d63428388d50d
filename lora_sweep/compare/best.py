"""Each variant's best checkpoint by one metric (`compare.select` = `METRIC[:max|min]`, or `compare --select`).

Among the steps at which every finished replicate that logged the metric logged it, the step whose replicate mean
is best in the spec's direction; a tie (means equal within `stats.RESOLUTION`) goes to the earliest step, the
cheaper checkpoint. The mean carries the report's 95 % interval (`effects.estimate`'s: `stats.mean_interval`,
clipped at the metric's bounds). Each replicate's LoRA of that step is linked: the run's
`lora/checkpoints/<output_name>-stepNNNNNNNN.safetensors` (written when `train.save_every` divides the step), or
its final `lora/<output_name>.safetensors` at its last step. A best at the last step says "still improving: train
longer"; at the first, that no later checkpoint improved on it; before steps where a replicate's value is no longer
finite (it diverged), from which step on. Pure data: `report.py` lists the LoRA artifacts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from lora_sweep.compare.effects import SCALE, bounds, no_finished_reason, not_finite_since
from lora_sweep.compare.stats import Estimate, clip, mean_interval, resolved
from lora_sweep.compare.variants import VariantData, VariantGroup
from lora_sweep.errors import UserError
from lora_sweep.tracking.metric_spec import MetricSpec, parse_metric_spec

STEP_FILES, FINAL_FILES = "lora/checkpoints", "lora"  # where training/session.py logs the kohya LoRA files
STILL_IMPROVING = "still improving: train longer"
BEST_AT_FIRST = "best at the first logged step: no later checkpoint improved on it"
ONE_STEP = "one logged step: nothing to choose between"


@dataclasses.dataclass(frozen=True)
class LoraLink:
    """One replicate's LoRA file at the best step: a run-relative artifact path and its full URI, or why none."""

    run_id: str
    seed: int | None
    path: str | None  # e.g. lora/checkpoints/v53-step00000500.safetensors
    uri: str | None  # <the run's artifact root>/<path>
    missing: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BestStep:
    """A variant's best step by `metric` (a MetricSpec), or `step` None and `missing` saying why there is none.

    `steps`: the candidate steps; `estimate`: the replicate mean at `step` with its interval; `flag`: STILL_IMPROVING,
    BEST_AT_FIRST, ONE_STEP or ''.
    """

    variant: str
    metric: MetricSpec
    step: int | None
    estimate: Estimate | None
    steps: tuple[int, ...] = ()
    files: tuple[LoraLink, ...] = ()
    flag: str = ""
    note: str = ""  # replicates left out of the choice, and why
    missing: str = ""

    @property
    def at_last(self) -> bool:
        return self.step is not None and self.step == self.steps[-1]

    @property
    def at_first(self) -> bool:
        return self.step is not None and self.step == self.steps[0]

    def as_dict(self) -> dict:
        return {"variant": self.variant, "metric": self.metric.name, "direction": self.metric.direction,
                "step": self.step, "value": None if self.estimate is None else self.estimate.as_dict(),
                "steps": list(self.steps), "at_last": self.at_last, "at_first": self.at_first, "flag": self.flag,
                "files": [f.as_dict() for f in self.files], "note": self.note, "missing": self.missing}


def select_spec(requested: str | None, groups: Sequence[VariantGroup]) -> tuple[MetricSpec | None, list[str]]:
    """The spec to select by: `--select` (UserError with the spec's paragraph when bad), else the runs' recorded
    `compare.select` (the first when they disagree, a bad one skipped); None when neither is set. With notes."""
    if requested:
        try:
            return parse_metric_spec(requested, "--select"), []
        except ValueError as exc:
            raise UserError(str(exc)) from None
    named = [r.params.get("compare.select") for g in groups for r in g.runs]
    distinct = list(dict.fromkeys(n for n in named if n not in (None, "", "None", "null")))
    if not distinct:
        return None, []
    notes = [] if len(distinct) == 1 else [f"The runs select their best checkpoints by different metrics "
                                           f"(compare.select = {', '.join(distinct)}); the first, {distinct[0]}, is "
                                           "used."]
    try:
        return parse_metric_spec(distinct[0], "compare.select"), notes
    except ValueError as exc:
        return None, [*notes, f"{exc} No best checkpoint is chosen; give compare --select METRIC[:max|min]."]


def best_steps(groups: Sequence[VariantGroup], spec: MetricSpec,
               artifacts: Mapping[str, Collection[str]]) -> list[BestStep]:
    """Each group's `best_step`; `artifacts`: run id -> the run's LoRA artifact paths (`lora_artifacts`)."""
    return [best_step(group, spec, artifacts) for group in groups]


def best_step(group: VariantGroup, spec: MetricSpec, artifacts: Mapping[str, Collection[str]]) -> BestStep:
    """The step of `group` whose replicate mean of `spec.name` is best (earliest on a tie); see the module's text."""
    if not group.finished:
        return BestStep(group.name, spec, None, None, missing=no_finished_reason(group))
    logged = [r for r in group.finished if _history(r, spec.name)]
    if not logged:
        return BestStep(group.name, spec, None, None, missing=not_logged_reason(group.finished[0], spec.name))
    by_step = [dict(_history(r, spec.name)) for r in logged]
    steps = tuple(sorted(set.intersection(*(set(h) for h in by_step))))
    note = _left_out_note(group, logged, spec.name)
    if not steps:
        return BestStep(group.name, spec, None, None, note=note,
                        missing=f"its {len(logged)} runs logged {spec.name} at no common step")
    scale = SCALE.get(spec.name, 0.0)
    best, best_mean = None, math.nan
    for step in steps:
        mean = float(np.mean([h[step] for h in by_step]))  # NaN when a replicate's value is: never best
        if best is None or (spec.better(mean, best_mean) and resolved(best_mean, mean, scale) != 0.0):
            best, best_mean = step, mean
    if not math.isfinite(best_mean):
        return BestStep(group.name, spec, None, None, steps, note=note,
                        missing=f"no step where every run's {spec.name} is finite")
    found = clip(mean_interval([h[best] for h in by_step], scale=scale), *bounds(spec.name, logged))
    files = tuple(lora_link(run, best, artifacts.get(run.run_id, ())) for run in logged)
    diverged = min((s for r in logged if (s := not_finite_since(r, spec.name)) is not None), default=None)
    flag = ONE_STEP if len(steps) == 1 else STILL_IMPROVING if best == steps[-1] else \
        BEST_AT_FIRST if best == steps[0] else ""
    if diverged is not None and diverged > best:
        flag = f"{spec.name} not finite from step {diverged} on (diverged): no later checkpoint is usable"
    return BestStep(group.name, spec, best, found, steps, files, flag, note)


def _history(run: VariantData, metric: str) -> list[tuple[int, float]]:
    return run.histories.get(metric) or []


def _left_out_note(group: VariantGroup, logged: Sequence[VariantData], metric: str) -> str:
    """'1 of 3 runs logged no fit/loss (seed 3) and is left out' when only some finished replicates logged it."""
    lacking = [r for r in group.finished if r not in logged]
    if not lacking:
        return ""
    seeds = ", ".join("?" if r.seed is None else str(r.seed) for r in lacking)
    verb = "is" if len(lacking) == 1 else "are"
    return (f"{len(lacking)} of {len(group.finished)} runs logged no {metric} (seed{'s' if len(lacking) > 1 else ''} "
            f"{seeds}) and {verb} left out")


def not_logged_reason(run: VariantData, metric: str) -> str:
    """Why a finished run has no `metric` history, from its recorded settings where they tell."""
    params = run.params
    if metric == "fit/loss" and params.get("validation.fit_images") == "0":
        why = "validation.fit_images is 0"
    elif metric == "val/loss" and params.get("data.validation_split") in ("0", "0.0") \
            and params.get("data.validation_dir") in (None, "", "None"):
        why = "no held-out images: data.validation_split is 0 and data.validation_dir unset"
    elif metric.startswith("img/") and params.get("sampling.prompts") in ("[]", None) \
            and params.get("sampling.prompt_file") in (None, "", "None"):
        why = "no sample prompts: sampling.prompts and sampling.prompt_file unset"
    elif metric in ("img/clip_t", "img/clip_i") and params.get("evaluation.clip_model") in (None, "", "None"):
        why = "evaluation.clip_model unset"
    elif metric == "img/dino" and params.get("evaluation.dino_model") in (None, "", "None"):
        why = "evaluation.dino_model unset"
    else:
        why = f"its runs logged no metric of that name (they log: {', '.join(sorted(run.histories)) or 'none'})"
    return f"{metric} not logged ({why})"


def lora_link(run: VariantData, step: int, paths: Collection[str]) -> LoraLink:
    """`run`'s kohya LoRA of `step` among its artifact `paths`: the step file, or the final file at its last step."""
    name = run.params.get("train.output_name", "")
    step_path = f"{STEP_FILES}/{name}-step{step:08d}.safetensors"
    final_path = f"{FINAL_FILES}/{name}.safetensors"
    last = max((s for history in run.histories.values() for s, _ in history), default=None)
    path = step_path if step_path in paths else final_path if step == last and final_path in paths else None
    if path is not None:
        return LoraLink(run.run_id, run.seed, path, f"{run.artifact_uri.rstrip('/')}/{path}")
    every = run.params.get("train.save_every", "0")
    if step == 0:
        why = "step 0 is the base model: no LoRA was trained yet"
    elif every in ("0", ""):
        why = f"no LoRA file at step {step}: train.save_every is 0 (only the final LoRA is saved)"
    elif step % int(every):
        why = f"no LoRA file at step {step}: train.save_every = {every} does not divide it"
    else:
        why = f"no LoRA file at step {step} among the run's artifacts ({STEP_FILES}/)"
    return LoraLink(run.run_id, run.seed, None, None, why)


def lora_artifacts(client, run_id: str) -> list[str]:
    """The run-relative paths of a run's kohya LoRA files (step checkpoints and the final file)."""
    return [a.path for folder in (FINAL_FILES, STEP_FILES) for a in client.list_artifacts(run_id, folder)
            if not a.is_dir and a.path.endswith(".safetensors")]


def at_best(groups: Sequence[VariantGroup], best: Sequence[BestStep]) -> list[VariantGroup]:
    """The groups as they stood at each variant's best step, for the one-knob effects there.

    Every history is cut after that step, so each metric's value is its last one logged at or before it; final-only
    data (the final evaluation's points, the report's samples, final metrics) is dropped. A variant without a best
    step keeps no history (its values: no value).
    """
    def cut(run: VariantData, step: int | None) -> VariantData:
        histories = {} if step is None else {k: [(s, v) for s, v in h if s <= step] for k, h in run.histories.items()}
        return dataclasses.replace(run, histories={k: h for k, h in histories.items() if h}, final_metrics={},
                                   points={}, cells={}, cell_steps={})

    return [dataclasses.replace(group, runs=[cut(r, found.step) for r in group.runs])
            for group, found in zip(groups, best, strict=True)]
