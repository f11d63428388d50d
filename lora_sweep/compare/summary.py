"""The comparison as plain data: the JSON the page embeds and `compare --json PATH` writes; the page's tables
are rendered from it, so the two never disagree.

Shape (schema "lora-sweep-summary/1"; numbers are floats or null, never NaN):
{
  "schema", "title", "experiment", "sweep_run_id", "tracking_uri", "step", "confidence": 0.95,
  "baseline": "<variant name>",
  "metrics": [{"key": "fit/loss", "note": "...",                   # the common metrics compared, in order,
               "steps": [8], "final": true, "at": "final (step 8)"}], # with the step(s) their values are from
  "curves_only": ["train/loss", ...],                               # shown as curves, never compared as numbers
  "select": {"metric": "fit/loss", "direction": "min"} | null,    # compare.select / --select: the best checkpoints
  "variants": [{"name", "label", "tag", "n", "seeds", "n_text", "run_ids", "status", "replicate_key", "is_baseline",
                "unfinished": [{"run_id", "seed", "status", "reason", "stopped_early"}],  # left out: n and seeds
                                                                    # are the finished; stopped_early: null or
                                                                    # {"step", "rule", "metric", "value",
                                                                    #  "compared_with", "peers", "why"}
                "data_warnings",                                    # the pre-flight's fallbacks (most of a run)
                "metrics": {"fit/loss": {"mean", "low", "high", "n", "note", "clipped", "missing"}},
                "vs_baseline": {"fit/loss": {"comparable": true, "effect", "low", "high", "n", "basis", "note",
                                             "within_noise", "verdict", "identical", "clipped",
                                             ["at_start", "change"]} | {"comparable": false, "reason"}},
                "best": {"variant", "metric", "direction", "step", "value": {as "metrics"}, "steps", "at_last",
                         "at_first", "flag", "files": [{"run_id", "seed", "path", "uri", "missing"}], "note",
                         "missing"} | null}],                          # best.BestStep.as_dict(); null: no select
  "one_knob_pairs": [{"a", "b", "knob", "from", "to", "detail", "values": [{"key", "from", "to"}], "compound",
                      "entails", "effects": {"fit/loss": <as vs_baseline>},
                      ["best_steps": {"a", "b"},                    # with select: each side's best step, and
                       "effects_at_best": {"fit/loss": {<as vs_baseline>, # the effects there, each value read at
                                           "read_at": {"a": [175], "b": [100]}}}]}],  # its last step <= best
  "data_warnings": [{"variant", "run_id", "count", "artifact"}],   # runs whose data had fallbacks
  "stopped_early": [{"variant", "run_id", "seed", "step", "rule", "metric", "value", "compared_with", "peers",
                     "why"}],                                       # runs sweep.stop_early stopped (censored)
  "notes": [...]
}
verdict: "no difference", "different", "within noise", "no interval" or "no value" (stats.Difference.verdict).
"at_start" (its "metric": what step 0 measured) and "change" appear only when the variants differ before training.
"""

from __future__ import annotations

import json
from typing import Any

from lora_sweep.compare.best import at_best
from lora_sweep.compare.effects import (
    METRIC_NOTES,
    difference,
    effect_dict,
    estimate,
    one_knob_pairs,
    present_metrics,
    read_steps,
    row_steps,
    same_training,
)
from lora_sweep.compare.stats import CONFIDENCE
from lora_sweep.compare.variants import strip_seed

SCHEMA = "lora-sweep-summary/1"
SCRIPT_ID = "lora-sweep-summary"
WARNINGS_ARTIFACT = "data/warnings.txt"
CURVES_ONLY = ("train/loss", "train/loss_weight", "train/huber_c", "train/lr", "train/d_lr")


def build_summary(data) -> dict[str, Any]:
    """The summary of a `ReportData` (its `groups` and `baseline` set)."""
    groups, step = data.groups, data.step
    metrics = present_metrics(groups, step)
    base = groups[data.baseline]
    images: dict = {}  # per-run image metrics, computed once
    variants = []
    for index, group in enumerate(groups):
        is_base = index == data.baseline
        variants.append({
            "name": group.name, "label": group.label,
            "tag": strip_seed(group.representative.tags.get("variant", group.name)),  # the variant's, not a seed's
            "n": len(group.finished), "seeds": [r.seed for r in group.finished], "n_text": group.n_text,
            "run_ids": [r.run_id for r in group.runs], "status": group.status,
            "unfinished": [{"run_id": r.run_id, "seed": r.seed, "status": r.status, "reason": r.failure,
                            "stopped_early": r.stopped.as_dict() if r.stopped else None} for r in group.unfinished],
            "replicate_key": group.key, "is_baseline": is_base,
            "data_warnings": max((data_warnings(r) for r in group.runs), default=0),
            "metrics": {m: estimate(group, m, step).as_dict() for m in metrics},
            "vs_baseline": {} if is_base else {m: effect_dict(difference(base, group, m, step, images))
                                               for m in metrics},
            "best": data.best[index].as_dict() if data.best else None,
        })
    pairs = [{"a": groups[p.a].name, "b": groups[p.b].name, **p.knob.as_dict(), **p.knob.values_dict(),
              "effects": {m: effect_dict(e) for m, e in p.effects.items()}}
             for p in one_knob_pairs(groups, metrics, step, images)]
    if data.best:
        cut = at_best(groups, data.best)
        for pair, at in zip(pairs, one_knob_pairs(cut, metrics), strict=True):
            pair["best_steps"] = {"a": data.best[at.a].step, "b": data.best[at.b].step}
            pair["effects_at_best"] = {m: {**effect_dict(e), "read_at": {"a": read_steps(cut[at.a], m),
                                                                          "b": read_steps(cut[at.b], m)}}
                                       for m, e in at.effects.items()}
    notes = list(data.notes)
    notes += [unfinished_note(g) for g in groups if any(not r.stopped for r in g.unfinished)]
    notes += [stopped_note(g) for g in groups if any(r.stopped for r in g.runs)]
    notes += [f"{groups[i].name} and {groups[j].name} train the same config (they differ only in their name, "
              "sampling or evaluation settings)." for i, j in same_training(groups)]
    return {
        "schema": SCHEMA, "title": data.title, "experiment": data.experiment, "sweep_run_id": data.sweep_run_id,
        "tracking_uri": data.tracking_uri, "step": step, "confidence": CONFIDENCE, "baseline": base.name,
        "select": None if data.select is None else {"metric": data.select.name, "direction": data.select.direction},
        "metrics": [{"key": m, "note": METRIC_NOTES.get(m, ""), **row_steps(groups, m, step)} for m in metrics],
        "curves_only": [k for k in CURVES_ONLY if any(k in r.histories for g in groups for r in g.runs)],
        "variants": variants, "one_knob_pairs": pairs, "notes": notes,
        "data_warnings": [{"variant": g.name, "run_id": r.run_id, "count": data_warnings(r),
                           "artifact": WARNINGS_ARTIFACT} for g in groups for r in g.runs if data_warnings(r) > 0],
        "stopped_early": [{"variant": g.name, "run_id": r.run_id, "seed": r.seed, **r.stopped.as_dict()}
                          for g in groups for r in g.runs if r.stopped],
    }


def unfinished_note(group) -> str:
    """'xb: 1 of 3 runs did not finish and is left out of the numbers: seed 3 FAILED (...), run 9b2515ab.'"""
    runs = [r for r in group.unfinished if not r.stopped]
    each = "; ".join(f"{'seed ' + str(r.seed) if r.seed is not None else 'a run'} {r.status}"
                     + (f" ({r.failure})" if r.failure else "") + f", run {r.run_id[:8]}" for r in runs)
    verb = "is" if len(runs) == 1 else "are"
    return f"{group.name}: {len(runs)} of {group.n} runs did not finish and {verb} left out of the numbers: {each}."


def stopped_note(group) -> str:
    """'v57: 1 of 2 runs was stopped early by sweep.stop_early and is left out of the final and best-step numbers
    (censored: its curves end where it stopped): seed 2 at step 400: fit/loss 1.23 > median 1.1 (rule median,
    3 peers), run 9b2515ab.'"""
    runs = [r for r in group.runs if r.stopped]
    each = "; ".join(f"{'seed ' + str(r.seed) if r.seed is not None else 'a run'} {r.stopped.describe()} "
                     f"({_rule_text(r.stopped)}), run {r.run_id[:8]}" for r in runs)
    verb, its = ("was", "its curves end") if len(runs) == 1 else ("were", "their curves end")
    return (f"{group.name}: {len(runs)} of {group.n} runs {verb} stopped early by sweep.stop_early and "
            f"{'is' if len(runs) == 1 else 'are'} left out of the final and best-step numbers (censored: {its} "
            f"where {'it' if len(runs) == 1 else 'they'} stopped): {each}.")


def _rule_text(stop) -> str:
    return f"rule {stop.rule}" + (f", {stop.peers} peer{'s' if stop.peers != 1 else ''}" if stop.peers else "")


def data_warnings(run) -> int:
    """How many fallbacks the pre-flight allowed in the run's data (its `data.warnings` param; 0 when absent)."""
    try:
        return int(float(run.params.get("data.warnings", 0)))
    except ValueError:
        return 0


def to_json(summary: dict) -> str:
    return json.dumps(summary, indent=1, allow_nan=False)


def script_block(summary: dict) -> str:
    """The summary as an inline JSON script; '</' is escaped so no string can close the script early."""
    text = json.dumps(summary, allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{SCRIPT_ID}">{text}</script>'
