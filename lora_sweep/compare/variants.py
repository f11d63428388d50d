"""From runs to variants: replicates grouped, variants in their natural order, the baseline chosen.

Pure data (`report.py` fills `VariantData` from MLflow). A *run* is one job run (`VariantData`). *Replicates*
differ only in `train.seed` (and keys that never change a training): equal `replicate_key`. A *variant*
(`VariantGroup`) is a set of replicates, named by the runs' `variant` tag less its `train.seed=N` part (tags are
space-separated overrides; older ones comma-separated). *Natural order*: the Hydra job number when every run has
one, else the names in natural order (v9 < v53 < v64), then start time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence

from PIL import Image

from lora_sweep.config import is_hash_excluded
from lora_sweep.errors import UserError
from lora_sweep.tracking.stopped import StopRecord, stop_record

SEED_KEY = "train.seed"
JOB_NUM_TAG = "lora_sweep.job_num"
CHOICE_TAG = "lora_sweep.choice."
NOT_CONFIG = ("compare.",)  # params that are settings of the comparison itself
FAILURE_TAG = "lora_sweep.failure"  # = lora_sweep.tracking.FAILURE (not imported: this module stays MLflow-free)
FAILURE_CHARS = 200


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
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    start_time: int = 0
    points: dict[str, dict[tuple[str, int], float]] = dataclasses.field(default_factory=dict)  # fit/loss -> points
    prompts: list[dict] | None = None  # samples/prompts.json: the (prompt, seed, size, ...) of each sample_pNN
    progression: list[tuple[int, Image.Image]] = dataclasses.field(default_factory=list)  # (step, first prompt)
    artifact_uri: str = ""  # the run's artifact root (MLflow's run.info.artifact_uri)
    warnings_text: str | None = None  # data/warnings.txt: the pre-flight's fallbacks, when the run has any

    @property
    def seed(self) -> int | None:
        try:
            return int(float(self.params[SEED_KEY]))
        except (KeyError, ValueError):
            return None

    @property
    def job_num(self) -> int | None:
        value = self.tags.get(JOB_NUM_TAG)
        return int(value) if value is not None and value.isdigit() else None

    @property
    def failure(self) -> str:
        """Why the run did not finish (the `lora_sweep.failure` tag), its first line cut to FAILURE_CHARS; '' if none.
        """
        lines = (self.tags.get(FAILURE_TAG) or "").strip().splitlines()
        first = lines[0].strip() if lines else ""
        return first if len(first) <= FAILURE_CHARS else first[:FAILURE_CHARS - 3] + "..."

    @property
    def stopped(self) -> StopRecord | None:
        """Why `sweep.stop_early` stopped this run (a KILLED run with its tag), else None: a censored run, whose
        curves end at its step and whose values enter no mean."""
        return stop_record(self.tags) if self.status == "KILLED" else None

    @property
    def choices(self) -> dict[str, str]:
        """Hydra config-group choices recorded by sweep.py ({"noise": "offset_ip", ...}); empty for older runs."""
        return {k[len(CHOICE_TAG):]: v for k, v in self.tags.items() if k.startswith(CHOICE_TAG)}


@dataclasses.dataclass
class VariantGroup:
    """The replicates of one variant, sorted by seed."""

    name: str
    key: str
    runs: list[VariantData]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def label(self) -> str:
        """The name with the finished replicates, for legends: 'noise=none (n = 3, seeds 1, 2, 3)'.

        The name alone for one finished run; '(no finished run)' added when none finished ('(stopped early)' when
        the rule stopped them all).
        """
        finished = self.finished
        if not finished:
            return f"{self.name} ({'stopped early' if all(r.stopped for r in self.runs) else 'no finished run'})"
        if len(finished) == 1:
            return self.name
        seeds = ", ".join(str(r.seed) for r in finished if r.seed is not None)
        return f"{self.name} (n = {len(finished)}{', seeds ' + seeds if seeds else ''})"

    @property
    def representative(self) -> VariantData:
        """The run shown in picture grids (and whose points stand for a one-run variant): the finished
        replicate with the lowest seed, else the first run.
        """
        return (self.finished or self.runs)[0]

    @property
    def finished(self) -> list[VariantData]:
        """The replicates that ran to the end: only their values are final, so only they enter the statistics."""
        return [r for r in self.runs if r.status == "FINISHED"]

    @property
    def unfinished(self) -> list[VariantData]:
        """Replicates that did not finish, named on the page since they change n and the pairing.

        A run whose seed also has a finished run (trained again later) lost nothing and is not listed.
        """
        done = {r.seed for r in self.runs if r.status == "FINISHED"}
        return [r for r in self.runs if r.status != "FINISHED" and (r.seed is None or r.seed not in done)]

    @property
    def n_text(self) -> str:
        """'n = 2 · seeds 1, 2 · 1 failed (seed 3)': the finished replicates, then those that did not finish (a run
        the rule stopped: '1 stopped early')."""
        seeds = [str(r.seed) for r in self.finished if r.seed is not None]
        text = f"n = {len(self.finished)}" + (f" · seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}"
                                             if seeds else "")
        lost = [str(r.seed) for r in self.unfinished if r.seed is not None]
        if self.unfinished:
            lost_runs = [{"status": r.status, "stopped_early": r.stopped} for r in self.unfinished]
            text += (f" · {unfinished_text(lost_runs)}"
                     + (f" (seed{'s' if len(lost) > 1 else ''} {', '.join(lost)})" if lost else ""))
        return text

    @property
    def params(self) -> dict[str, str]:
        return self.representative.params

    @property
    def status(self) -> str:
        """FINISHED when every replicate finished, else the statuses seen (e.g. 'FAILED, FINISHED')."""
        statuses = sorted({r.status for r in self.runs})
        return statuses[0] if len(statuses) == 1 else ", ".join(statuses)


def unfinished_text(runs: Sequence[dict]) -> str:
    """'1 failed', '1 failed, 1 killed, 1 stopped early': the statuses of unfinished runs ({"status": ...,
    "stopped_early": its stop or None}), counted."""
    counts: dict[str, int] = {}
    for run in runs:
        status = "stopped early" if run.get("stopped_early") else run["status"].lower()
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{k} {status}" for status, k in sorted(counts.items()))


def is_config_key(key: str) -> bool:
    return not is_hash_excluded(key) and not key.startswith(NOT_CONFIG)


def replicate_key(params: dict[str, str]) -> str:
    """A 16-hex hash of the params that define a training, less `train.seed`: equal for replicates."""
    kept = {k: v for k, v in params.items() if k != SEED_KEY and is_config_key(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def natural_key(name: str) -> tuple:
    """'v9' < 'v53' < 'v64': digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name))


SEED_PART = re.compile(r"[ ,]\+{0,2}" + re.escape(SEED_KEY) + r"=[^ ,]*|^\+{0,2}" + re.escape(SEED_KEY)
                       + r"=[^ ,]*[ ,]?")  # the seed override with one separator next to it
CUT_HASH = re.compile(r" #[0-9a-f]{6,}$")  # job.names.run_label's mark of a cut name: a hash of all the overrides


def strip_seed(name: str) -> str:
    """A variant tag without its seed override ('noise=multires train.seed=2' -> 'noise=multires'); else 'default'."""
    return SEED_PART.sub("", name).strip() or "default"


def group_replicates(runs: Sequence[VariantData]) -> list[VariantGroup]:
    """Replicates grouped into variants, in natural order; duplicate names get the first run id's 6 characters."""
    by_key: dict[str, list[VariantData]] = {}
    for run in runs:
        by_key.setdefault(replicate_key(run.params), []).append(run)
    groups = []
    for key, members in by_key.items():
        members.sort(key=lambda r: (r.seed if r.seed is not None else 0, r.start_time, r.run_id))
        names = {strip_seed(r.name) for r in members}
        if len(names) > 1 and len({CUT_HASH.sub("", n) for n in names}) == 1:
            names = {CUT_HASH.sub("", n) for n in names}  # cut names whose hashes covered the seed too
        groups.append(VariantGroup(sorted(names, key=natural_key)[0], key, members))
    with_job_num = all(r.job_num is not None for g in groups for r in g.runs)

    def order(group: VariantGroup) -> tuple:
        first_start = min(r.start_time for r in group.runs)
        if with_job_num:
            return (min(r.job_num for r in group.runs), (), first_start)
        return (0, natural_key(group.name), first_start)

    groups.sort(key=order)
    for group in groups:
        if sum(g.name == group.name for g in groups) > 1:
            group.name = f"{group.name} ({group.representative.run_id[:6]})"
    return groups


def baseline_index(groups: Sequence[VariantGroup], requested: str | None, *, option: str = "--baseline") -> int:
    """The index of the variant named by `requested` (its name, or a run id or its prefix); None: the first
    variant with a finished run (else 0).

    Raises UserError naming `option` when nothing matches, or when the named run did not finish and its variant
    has no finished run. Otherwise an unfinished run names its variant (`baseline_note` says so).
    """
    if not requested:  # the first variant that has a finished run: one whose runs all failed compares nothing
        return next((index for index, group in enumerate(groups) if group.finished), 0)
    for index, group in enumerate(groups):
        if requested == group.name or strip_seed(requested) == group.name:
            return index
        run = _named_run(group, requested)
        if run is None:
            continue
        if run.status != "FINISHED" and not group.finished:
            raise UserError(f"{option}: run {run.run_id} {run.status}{_why(run)}: runs that did not finish are left "
                            f"out of the numbers, and its variant {group.name} has no finished run. Name one of "
                            f"the variants that have: {', '.join(g.name for g in groups if g.finished) or 'none'}.")
        return index
    raise UserError(f"{option}: '{requested}' is neither a variant name nor a run id of the compared runs "
                    f"(variants: {', '.join(g.name for g in groups)}).")


def baseline_note(groups: Sequence[VariantGroup], index: int, requested: str | None) -> str | None:
    """A note when `requested` names a run that did not finish: it is left out, its variant is the baseline."""
    group = groups[index]
    run = _named_run(group, requested) if requested and requested != group.name else None
    if run is None or run.status == "FINISHED":
        return None
    return (f"--baseline {requested}: run {run.run_id[:8]} {run.status}{_why(run)} and is left out of the numbers; "
            f"the baseline is its variant {group.name}, {group.n_text}.")


def _named_run(group: VariantGroup, requested: str) -> VariantData | None:
    return next((r for r in group.runs if requested in (r.run_id, r.name) or r.run_id.startswith(requested)), None)


def _why(run: VariantData) -> str:
    return f" ({run.failure})" if run.failure else ""


def configured_baseline(groups: Sequence[VariantGroup]) -> tuple[str | None, str | None]:
    """(`compare.baseline` the runs were configured with, a note when runs disagree); --baseline overrides it."""
    named = [r.params.get("compare.baseline") for g in groups for r in g.runs]
    named = [n for n in named if n not in (None, "", "None", "null")]
    if not named:
        return None, None
    distinct = list(dict.fromkeys(named))
    note = None if len(distinct) == 1 else (f"The runs name different baselines (compare.baseline = "
                                            f"{', '.join(distinct)}); the first, {distinct[0]}, is used.")
    return distinct[0], note
