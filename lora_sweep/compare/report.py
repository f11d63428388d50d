"""`python -m lora_sweep compare`: read a sweep's runs from MLflow and write one self-contained comparison page.

MLflow conventions of lora-sweep (run.py writes them, this module reads them):
- Tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (artifacts in <cwd>/mlruns). Experiment =
  `tracking.experiment` (default "lora-sweep").
- Sweep parent run: tag `lora_sweep.role` = "sweep". Job runs: tags `lora_sweep.role` = "job",
  `mlflow.parentRunId` = the parent's id (when in a sweep), `variant` (e.g. "v57"), `config_hash`, and from
  sweep.py `lora_sweep.job_num` (the Hydra job number: the sweep's order) and `lora_sweep.choice.<group>`.
- Params: the resolved config flattened with dot keys (`noise.offset`, `loss.type`, `optimizer.name`, ...).
- Metrics, step = optimizer step: `train/loss`, `train/lr`, `fit/loss`, `val/loss`, and `img/<metric>` (the mean
  over the step's sample images of `lora_sweep.compare.metrics.image_metrics`); per-point values of the final
  fit/val evaluation as artifacts `evaluation/fit_points.json`, `evaluation/val_points.json`.
- Images: `log_image(key="sample_pNN", step=step)` per prompt (the seed is fixed per prompt), one grid per
  sampling step as artifact `samples/grid_stepNNNNNN.png`, and the prompt specs as `samples/prompts.json`.

How MLflow 3 stores `log_image(key=..., step=...)`: two artifacts per call under `images/`, named
`{key}+step+{step}+timestamp+{ms}+{uuid4}.png` (full size) and `...+compressed.webp` (a <= 256 px preview),
with "/" in the key written as "~". MLflow before 2.22 / 3.0 used "%" as the separator and "#" for "/"; both
spellings are read here. When one (key, step) was logged twice (a resumed run), the latest timestamp wins.

Runs are grouped into variants (replicates: configs equal but for train.seed) by `variants.py`, compared by
`effects.py` with `stats.py`, summarised by `summary.py` and rendered by `report_html.py`. The page, its
`summary.json` and figure PNGs are logged on the sweep's parent run as artifacts under `report/`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from lora_sweep.errors import UserError

ROLE_TAG, PARENT_TAG, VARIANT_TAG = "lora_sweep.role", "mlflow.parentRunId", "variant"
DEFAULT_EXPERIMENT = "lora-sweep"
IMAGE_ARTIFACT = re.compile(
    r"^(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%](?P<timestamp>\d+)[+%](?P<uuid>[0-9A-Fa-f-]+)\.png$"
)


@dataclasses.dataclass(frozen=True)
class LoggedImage:
    key: str
    step: int
    timestamp: int
    path: str  # run-relative artifact path


def parse_image_artifact(path: str) -> LoggedImage | None:
    """A `log_image(key, step)` artifact path -> its key/step/timestamp; None for anything else (e.g. previews)."""
    match = IMAGE_ARTIFACT.match(path.rsplit("/", 1)[-1])
    if match is None:
        return None
    key = match.group("key").replace("~", "/").replace("#", "/")
    return LoggedImage(key, int(match.group("step")), int(match.group("timestamp")), path)


def logged_images(client, run_id: str) -> dict[tuple[str, int], LoggedImage]:
    """Every time-stepped image of a run, by (key, step); the newest of duplicates wins."""
    found: dict[tuple[str, int], LoggedImage] = {}
    for info in client.list_artifacts(run_id, "images"):
        image = None if info.is_dir else parse_image_artifact(info.path)
        if image is not None:
            previous = found.get((image.key, image.step))
            if previous is None or image.timestamp > previous.timestamp:
                found[(image.key, image.step)] = image
    return found


@contextlib.contextmanager
def _quiet_downloads():
    """No tqdm bar per downloaded sample (one per file otherwise): the report prints one line, its path."""
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    from lora_sweep import tracking

    return tracking.tracking_uri(tracking_uri)


def find_runs(client, *, experiment: str | None, sweep_run_id: str | None):
    """(parent run or None, job runs in launch order). A sweep's runs are its children and the FINISHED runs its
    skipped jobs matched (`reused_runs`). With neither argument: the newest sweep of the default experiment that
    has runs (one stopped or refused before any job ran has none); with an experiment that has no sweep run: all
    its job runs."""
    from lora_sweep import tracking

    if sweep_run_id:
        try:
            parent = client.get_run(sweep_run_id)
        except Exception as exc:
            raise UserError(f"--sweep: no run with id '{sweep_run_id}' in the store {client.tracking_uri} "
                            f"({type(exc).__name__}). Use the sweep's parent run id printed by the sweep.") from exc
        experiment_id = parent.info.experiment_id
    else:
        name = experiment or DEFAULT_EXPERIMENT
        found = client.get_experiment_by_name(name)
        if found is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise UserError(f"--experiment: no MLflow experiment named '{name}' in {client.tracking_uri} "
                            f"(experiments there: {names}). Run a sweep first, or name one of those.")
        experiment_id = found.experiment_id
        sweeps = client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'", order_by=["start_time DESC"],
                                    max_results=100)
        parent = sweeps[0] if sweeps else None
        for sweep in sweeps:
            if client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{sweep.info.run_id}'", max_results=1) \
                    or tracking.read_job_runs(sweep.data.tags):
                parent = sweep
                break
    if parent is not None:
        jobs = sweep_runs(client, experiment_id, parent)
    else:
        jobs = client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'job'", max_results=5000)
    if not jobs:
        where = f"sweep {parent.info.run_id}" if parent is not None else f"experiment {experiment_id}"
        raise UserError(f"No job runs found for {where} in {client.tracking_uri}: nothing to compare. "
                        "Check --experiment / --sweep, or wait until the sweep has started its jobs.")
    jobs.sort(key=lambda run: (run.info.start_time or 0, run.info.run_id))
    return parent, jobs


def sweep_runs(client, experiment_id: str, parent) -> list:
    """A sweep's job runs: its children, then the runs of earlier sweeps its skipped jobs matched."""
    jobs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'", max_results=5000)
    return jobs + reused_runs(client, parent, {run.info.run_id for run in jobs})


def reused_runs(client, parent, children: set[str]) -> list:
    """The FINISHED runs of earlier sweeps that this sweep's skipped jobs matched (the parent's
    `lora_sweep.job_runs` tag, written when the sweep ended): part of its results, though not its children. Each
    takes this sweep's job number (`lora_sweep.job_num`), so the report orders it as this sweep's job."""
    from lora_sweep import tracking
    from lora_sweep.compare.variants import JOB_NUM_TAG

    found = []
    for num, run_id in sorted(tracking.read_job_runs(parent.data.tags).items()):
        if run_id in children:
            continue
        try:
            run = client.get_run(run_id)
        except Exception:  # deleted for good since
            continue
        if run.info.lifecycle_stage == "active" and run.info.status == "FINISHED":
            run.data.tags[JOB_NUM_TAG] = str(num)  # this sweep's order (the run's own tag keeps its first sweep's)
            found.append(run)
    return found


def variant_names(runs) -> list[str]:
    """The `variant` tag (else the run name); duplicates (reruns) get the run id's first 6 characters."""
    names = [run.data.tags.get(VARIANT_TAG) or run.info.run_name or run.info.run_id[:8] for run in runs]
    return [f"{n} ({run.info.run_id[:6]})" if names.count(n) > 1 else n for n, run in zip(names, runs)]


def choose_step(images_per_run: Sequence[dict[tuple[str, int], LoggedImage]], requested: int | None) -> int | None:
    """The requested step, else the latest step at which every run that logged images has images."""
    if requested is not None:
        return requested
    step_sets = [{step for _, step in images} for images in images_per_run if images]
    common = set.intersection(*step_sets) if step_sets else set()
    return max(common) if common else None


def check_step(images_per_run: Sequence[dict[tuple[str, int], LoggedImage]], requested: int | None) -> None:
    """Refuse `--step N` when no compared run logged samples at N, naming the steps that exist: a page of empty
    cells (or a silently chosen other step) would not be what was asked for. Runs that lack N while others have
    it are noted on the page instead (a run that stopped early).

    Raises UserError (exit 2)."""
    if requested is None or any(step == requested for images in images_per_run for _, step in images):
        return
    step_sets = [{s for _, s in images} for images in images_per_run if images]
    if not step_sets:
        raise UserError(f"--step {requested}: the compared runs logged no samples at all (sampling.prompts or "
                        "sampling.prompt_file unset?); leave --step out to compare their numbers.")
    common = sorted(set.intersection(*step_sets))
    every = sorted(set.union(*step_sets))
    shared = f"; at every run: {', '.join(map(str, common))}" if common and common != every else ""
    raise UserError(f"--step {requested}: no compared run logged samples at step {requested}. Sampled steps: "
                    f"{', '.join(map(str, every))}{shared}. Pick one of them, or leave --step out for the latest "
                    "step every run sampled.")


def _download_image(client, run_id: str, artifact_path: str, scratch: Path):
    from PIL import Image

    local = client.download_artifacts(run_id, artifact_path, str(scratch))
    with Image.open(local) as image:
        return image.convert("RGB")


def _download_json(client, run_id: str, artifact_path: str, scratch: Path):
    """A run's JSON artifact, or None when it has none (or it does not parse)."""
    try:
        return json.loads(Path(client.download_artifacts(run_id, artifact_path, str(scratch))).read_text("utf-8"))
    except Exception:
        return None


def read_points(client, run_id: str, scratch: Path) -> dict[str, dict[tuple[str, int], float]]:
    """The per-point values of a run's final fit/val evaluation (`evaluation/<prefix>_points.json`, written by
    training/evaluate.py): {"fit/loss": {(image, t): value}}."""
    found = {}
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluation")}
    for prefix in ("fit", "val"):
        if f"{prefix}_points.json" not in names:
            continue
        payload = _download_json(client, run_id, f"evaluation/{prefix}_points.json", scratch)
        if payload:
            found[payload["metric"]] = {(p["image"], int(p["t"])): float(p["value"]) for p in payload["points"]}
    return found


def column_titles(specs: list[dict] | None, image_keys: list[str]) -> dict[str, str]:
    """'p00 · seed 1234: a photo of ...' from a run's samples/prompts.json."""
    titles = {}
    for key in image_keys if specs else []:
        index = int(key[len("sample_p"):]) if re.fullmatch(r"sample_p\d+", key) else None
        if index is not None and index < len(specs):
            text = specs[index]["prompt"]
            text = text if len(text) <= 60 else text[:57] + "..."
            titles[key] = f"p{index:02d} · seed {specs[index]['seed']}: {text}"
    return titles


def read_run(client, run, scratch: Path):
    """One job run's params, tags, metric histories, evaluation points and sample specs (no images yet)."""
    from lora_sweep.compare.variants import VariantData

    run_id = run.info.run_id
    histories = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                                         key=lambda m: (m.step, m.timestamp))]
                 for key in run.data.metrics}
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "samples")}
    prompts = _download_json(client, run_id, "samples/prompts.json", scratch) if "prompts.json" in names else None
    warnings_text = None
    if run.data.params.get("data.warnings", "0") not in ("0", ""):
        with contextlib.suppress(Exception):  # the count is shown anyway; the text is a courtesy
            local = client.download_artifacts(run_id, "data/warnings.txt", str(scratch))
            warnings_text = Path(local).read_text("utf-8")
    return VariantData(
        name=run.data.tags.get(VARIANT_TAG) or run.info.run_name or run_id[:8], run_id=run_id, status=run.info.status,
        params=dict(run.data.params), final_metrics=dict(run.data.metrics), histories=histories, cells={},
        cell_steps={}, tags=dict(run.data.tags), start_time=run.info.start_time or 0,
        points=read_points(client, run_id, scratch), prompts=prompts, artifact_uri=run.info.artifact_uri or "",
        warnings_text=warnings_text)


def collect(client, *, experiment: str | None, sweep_run_id: str | None, step: int | None, baseline: str | None,
            scratch: Path):
    """Read everything the page shows from MLflow into a `ReportData` (and return the parent run too)."""
    from lora_sweep.compare.figures import progression_steps
    from lora_sweep.compare.report_html import ReportData
    from lora_sweep.compare.variants import baseline_index, configured_baseline, group_replicates

    parent, runs = find_runs(client, experiment=experiment, sweep_run_id=sweep_run_id)
    records = [read_run(client, run, scratch) for run in runs]
    groups = group_replicates(records)
    shown = [g.representative for g in groups]
    images_per_run = [logged_images(client, run.run_id) for run in shown]
    check_step(images_per_run, step)
    chosen = choose_step(images_per_run, step)
    notes = []
    if chosen is None and any(images_per_run):
        notes.append("The runs share no sampling step; each row shows its run's last sampled step.")
    image_keys = sorted({key for images in images_per_run for key, _ in images})
    progression_key = image_keys[0] if image_keys else None
    columns = progression_steps([s for images in images_per_run for k, s in images if k == progression_key])
    for run, images in zip(shown, images_per_run):
        for key in image_keys:
            steps = sorted(s for k, s in images if k == key)
            at = chosen if chosen is not None else (steps[-1] if steps else None)
            logged = images.get((key, at)) if at is not None else None
            run.cells[key] = _download_image(client, run.run_id, logged.path, scratch) if logged else None
            run.cell_steps[key] = at if logged else None
        run.progression = [(s, run.cells[progression_key] if s == run.cell_steps.get(progression_key) else
                            _download_image(client, run.run_id, images[(progression_key, s)].path, scratch))
                           for s in columns if (progression_key, s) in images]
        if step is not None and image_keys and all(c is None for c in run.cells.values()):
            notes.append(f"{run.name} logged no samples at step {step}.")
    if baseline:
        index = baseline_index(groups, baseline)
    else:
        named, disagreement = configured_baseline(groups)
        notes += [disagreement] if disagreement else []
        try:
            index = baseline_index(groups, named, option="compare.baseline")
        except UserError as exc:
            notes.append(f"{exc} The first variant is the baseline.")
            index = 0
    where = f"sweep {parent.info.run_id}" if parent is not None else "all job runs"
    earlier = [r for r in runs if parent is not None and r.data.tags.get(PARENT_TAG) != parent.info.run_id]
    if earlier:
        notes.append(f"{len(earlier)} of these runs were trained by earlier sweeps: this sweep skipped those jobs as "
                     f"already FINISHED ({', '.join(r.info.run_id[:8] for r in earlier)}).")
    experiment_name = client.get_experiment(runs[0].info.experiment_id).name
    replicates = sum(g.n for g in groups)
    data = ReportData(
        title=f"lora-sweep comparison: {experiment_name}",
        subtitle=f"{len(groups)} variants ({replicates} runs), {where}, tracking {client.tracking_uri}",
        step=chosen, image_keys=image_keys,
        column_titles=column_titles(next((r.prompts for r in shown if r.prompts), None), image_keys),
        variants=records, baseline=index, notes=notes, groups=groups, experiment=experiment_name,
        sweep_run_id=parent.info.run_id if parent is not None else None, tracking_uri=str(client.tracking_uri),
        progression_key=progression_key,
    )
    return data, parent


def build_report(*, experiment: str | None = None, sweep_run_id: str | None = None, step: int | None = None,
                 out_dir: Path, baseline: str | None = None, tracking_uri: str | None = None,
                 json_path: Path | None = None) -> Path:
    """Write `out_dir/report.html` (self-contained), `out_dir/summary.json` (the numbers, as embedded in the page)
    and the figures as PNGs beside it; log them on the sweep's parent run under `report/` when there is one; also
    write the summary to `json_path` when given. Returns the HTML's path."""
    from mlflow.tracking import MlflowClient

    from lora_sweep.atomic import write_bytes, write_text
    from lora_sweep.compare.figures import CURVE_GROUPS, curve_figure
    from lora_sweep.compare.report_html import grid_png, progression_png, render_html
    from lora_sweep.compare.summary import build_summary, to_json

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="lora_sweep_report_") as scratch, _quiet_downloads():
        data, parent = collect(client, experiment=experiment, sweep_run_id=sweep_run_id, step=step,
                               baseline=baseline, scratch=Path(scratch))
    runs = [r for g in data.groups for r in g.runs]
    colors = [i for i, g in enumerate(data.groups) for _ in g.runs]
    labels = [g.label for g in data.groups for _ in g.runs]
    figures = {name: png for name, keys in CURVE_GROUPS.items()
               if (png := curve_figure(runs, keys, colors=colors, labels=labels)) is not None}
    written = [write_bytes(out_dir / f"{name}.png", png) for name, png in figures.items()]
    for name, png in (("grid", grid_png(data)), ("progression", progression_png(data))):
        if png is not None:
            written.append(write_bytes(out_dir / f"{name}.png", png))
    summary = build_summary(data)
    written.append(write_text(out_dir / "summary.json", to_json(summary)))
    if json_path is not None:
        write_text(Path(json_path), to_json(summary))
    html_path = write_text(out_dir / "report.html", render_html(data, figures, summary))
    if parent is not None:
        for path in [html_path, *written]:
            client.log_artifact(parent.info.run_id, str(path), artifact_path="report")
    return html_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_sweep compare",
                                     description="Compare a sweep's variants in one HTML page.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--experiment", help=f"MLflow experiment name (default {DEFAULT_EXPERIMENT}); its newest "
                                            "sweep is compared, or all its job runs when it has no sweep run")
    which.add_argument("--sweep", dest="sweep_run_id", help="run id of a sweep's parent run")
    parser.add_argument("--step", type=int, help="sampling step of the grid (default: the latest all runs share)")
    parser.add_argument("--baseline", help="variant name or run id for the differences (default: compare.baseline "
                                           "of the runs, else the first variant in the sweep's order)")
    parser.add_argument("--json", dest="json_path", type=Path,
                        help="also write the comparison's numbers (the page's JSON summary) to this file")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/<sweep id or experiment>)")
    parser.add_argument("--tracking-uri", "--store", dest="tracking_uri",
                        help="MLflow tracking store URI, as `ui --tracking-uri` takes it (default: "
                             "$MLFLOW_TRACKING_URI, else ./mlflow.db)")
    args = parser.parse_args(argv)
    out_dir = args.out or Path("reports") / (args.sweep_run_id or args.experiment or DEFAULT_EXPERIMENT)
    try:
        path = build_report(experiment=args.experiment, sweep_run_id=args.sweep_run_id, step=args.step,
                            out_dir=out_dir, baseline=args.baseline, tracking_uri=args.tracking_uri,
                            json_path=args.json_path)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path.resolve()}")
    if args.json_path:
        print(f"summary: {args.json_path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
