"""`python -m lora_sweep compare`: read a sweep's runs from MLflow and write one self-contained comparison page.

runs.py reads the runs, variants.py groups them, effects.py and stats.py compare, summary.py summarises and
report_html.py renders. The page, `summary.json` and the figures go on the sweep's parent run under `report/`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lora_sweep.compare.runs import (
    DEFAULT_EXPERIMENT,
    PARENT_TAG,
    LoggedImage,
    column_titles,
    download_image,
    find_runs,
    logged_images,
    read_run,
)
from lora_sweep.errors import UserError


@contextlib.contextmanager
def _quiet_downloads():
    """No tqdm bar per downloaded sample: the report prints one line, its path."""
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
    from lora_sweep.tracking import store

    return store.tracking_uri(tracking_uri)



def choose_step(images_per_run: Sequence[dict[tuple[str, int], LoggedImage]], requested: int | None,
                censored: Sequence[bool] = ()) -> int | None:
    """The requested step, else the latest step at which every run that logged images has images; runs marked
    `censored` (stopped early: they sampled only up to their stop) are left out of that choice."""
    if requested is not None:
        return requested
    left_out = list(censored) + [False] * (len(images_per_run) - len(censored))
    step_sets = [{step for _, step in images} for images, out in zip(images_per_run, left_out, strict=True)
                 if images and not out]
    common = set.intersection(*step_sets) if step_sets else set()
    return max(common) if common else None


def check_step(images_per_run: Sequence[dict[tuple[str, int], LoggedImage]], requested: int | None) -> None:
    """Raise UserError (exit 2) naming the sampled steps when no compared run sampled at `--step N`.

    Why: empty cells or a silently chosen other step are not what was asked; runs lacking N get a note instead.
    """
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



def collect(client, *, experiment: str | None, sweep_run_id: str | None, step: int | None, baseline: str | None,
            all_sweeps: bool = False, select: str | None = None,
            scratch: Path):
    """Read everything the page shows from MLflow into a `ReportData` (and return the parent run too)."""
    from lora_sweep.compare.report_html import ReportData
    from lora_sweep.compare.variants import group_replicates

    parent, runs = find_runs(client, experiment=experiment, sweep_run_id=sweep_run_id, all_sweeps=all_sweeps)
    records = [read_run(client, run, scratch) for run in runs]
    groups = group_replicates(records)
    spec, best, select_notes = choose_best(client, groups, select)
    shown = [g.representative for g in groups]
    chosen, image_keys, progression_key, notes = fill_samples(client, shown, step, scratch, [g.name for g in groups])
    index, baseline_notes = choose_baseline(client, groups, baseline)
    where, scope_notes = sweep_scope(parent, runs)
    notes += baseline_notes + scope_notes + select_notes
    experiment_name = client.get_experiment(runs[0].info.experiment_id).name
    replicates = sum(g.n for g in groups)
    data = ReportData(
        title=f"lora-sweep comparison: {experiment_name}",
        subtitle=f"{len(groups)} variants ({replicates} runs), {where}, tracking {client.tracking_uri}",
        step=chosen, image_keys=image_keys,
        column_titles=column_titles(next((r.prompts for r in shown if r.prompts), None), image_keys),
        variants=records, baseline=index, notes=notes, groups=groups, experiment=experiment_name,
        sweep_run_id=parent.info.run_id if parent is not None else None, tracking_uri=str(client.tracking_uri),
        progression_key=progression_key, select=spec, best=best,
    )
    return data, parent


def choose_best(client, groups, select: str | None):
    """(the spec, each group's best step, notes): by --select, else the runs' compare.select; none when unset."""
    from lora_sweep.compare.best import best_steps, lora_artifacts, select_spec

    spec, notes = select_spec(select, groups)
    if spec is None:
        return None, [], notes
    artifacts = {r.run_id: lora_artifacts(client, r.run_id) for g in groups for r in g.finished}
    return spec, best_steps(groups, spec, artifacts), notes


def fill_samples(client, shown: list, step: int | None, scratch: Path, names: list[str] | None = None):
    """Download each shown run's samples at the chosen step, and its progression of the first prompt.

    `names`: the variants' names for the notes (default: the runs'). Returns (the chosen step, the image keys, the
    progression's key, notes for the page).
    """
    from lora_sweep.compare.figures import progression_steps

    images_per_run = [logged_images(client, run.run_id) for run in shown]
    check_step(images_per_run, step)
    censored = [run.stopped is not None for run in shown]
    chosen = choose_step(images_per_run, step, censored)
    notes = []
    if chosen is None and any(images_per_run):
        notes.append("The runs share no sampling step; each row shows its run's last sampled step.")
    stopped_early = [name for name, out, images in zip(names or [r.name for r in shown], censored, images_per_run,
                                                       strict=True)
                     if out and images and chosen not in {s for _, s in images}]
    if step is None and chosen is not None and stopped_early:
        notes.append(f"Samples and image metrics are at step {chosen}, the last step every finished run sampled: "
                     f"{', '.join(stopped_early)} stopped early before it, so "
                     f"{'its row shows its' if len(stopped_early) == 1 else 'their rows show their'} last sampled "
                     "step.")
    image_keys = sorted({key for images in images_per_run for key, _ in images})
    progression_key = image_keys[0] if image_keys else None
    columns = progression_steps([s for images in images_per_run for k, s in images if k == progression_key])
    for run, images, out in zip(shown, images_per_run, censored, strict=True):
        for key in image_keys:
            steps = sorted(s for k, s in images if k == key)
            at = chosen if chosen in steps else (steps[-1] if steps and (chosen is None or out) else chosen)
            logged = images.get((key, at)) if at is not None else None
            run.cells[key] = download_image(client, run.run_id, logged.path, scratch) if logged else None
            run.cell_steps[key] = at if logged else None
        run.progression = [(s, run.cells[progression_key] if s == run.cell_steps.get(progression_key) else
                            download_image(client, run.run_id, images[(progression_key, s)].path, scratch))
                           for s in columns if (progression_key, s) in images]
        if step is not None and image_keys and all(c is None for c in run.cells.values()):
            notes.append(f"{run.name} logged no samples at step {step}.")
    return chosen, image_keys, progression_key, notes


def choose_baseline(client, groups, baseline: str | None) -> tuple[int, list[str]]:
    """The baseline variant's index: --baseline, else the runs' `compare.baseline`, else the first; with notes."""
    from lora_sweep.compare.variants import baseline_index, baseline_note, configured_baseline

    notes = []
    if baseline:
        index = _baseline(client, groups, baseline)
        notes += [note] if (note := baseline_note(groups, index, baseline)) else []
        return index, notes
    named, disagreement = configured_baseline(groups)
    notes += [disagreement] if disagreement else []
    try:
        index = baseline_index(groups, named, option="compare.baseline")
    except UserError as exc:
        notes.append(f"{exc} The first variant is the baseline.")
        index = 0
    return index, notes


def sweep_scope(parent, runs: list) -> tuple[str, list[str]]:
    """Which runs the page covers, for its subtitle, and a note on runs that earlier sweeps trained."""
    sweeps = {r.data.tags.get(PARENT_TAG) for r in runs} - {None}
    where = (f"sweep {parent.info.run_id}" if parent is not None else
             f"all job runs of the experiment ({len(sweeps)} sweep{'s' if len(sweeps) != 1 else ''})")
    earlier = [r for r in runs if parent is not None and r.data.tags.get(PARENT_TAG) != parent.info.run_id
               and r.info.status == "FINISHED"]
    if not earlier:
        return where, []
    return where, [f"{len(earlier)} of these runs were trained by earlier sweeps: this sweep skipped those jobs as "
                   f"already FINISHED ({', '.join(r.info.run_id[:8] for r in earlier)})."]


def _baseline(client, groups, requested: str) -> int:
    """`baseline_index`, whose error says so when `requested` is a stored run that did not finish (left out)."""
    from lora_sweep.compare.variants import FAILURE_TAG, baseline_index

    try:
        return baseline_index(groups, requested)
    except UserError as exc:
        if not re.fullmatch(r"[0-9a-f]{32}", requested):
            raise
        try:
            run = client.get_run(requested)
        except Exception:
            raise exc from None
        if run.info.status == "FINISHED":
            raise
        why = run.data.tags.get(FAILURE_TAG, "").strip().splitlines()
        raise UserError(f"--baseline: run {requested} {run.info.status}{f' ({why[0]})' if why else ''}: a run that "
                        "did not finish is left out of the comparison. Name one of the variants: "
                        f"{', '.join(g.name for g in groups)}.") from None


def build_report(*, experiment: str | None = None, sweep_run_id: str | None = None, step: int | None = None,
                 all_sweeps: bool = False, select: str | None = None,
                 out_dir: Path, baseline: str | None = None, tracking_uri: str | None = None,
                 json_path: Path | None = None) -> Path:
    """Write `out_dir/report.html` (self-contained), `summary.json` and the figure PNGs; returns the HTML's path.

    They are logged on the sweep's parent run under `report/` when there is one; the summary also goes to `json_path`.
    """
    from lora_sweep.atomic import write_bytes, write_text
    from lora_sweep.compare.figures import curve_figure, curve_groups
    from lora_sweep.compare.first_screen import best_marks
    from lora_sweep.compare.forest import forest_figure
    from lora_sweep.compare.report_html import grid_png, progression_png, render_html
    from lora_sweep.compare.summary import build_summary, to_json
    from lora_sweep.tracking import store

    client = store.client(resolve_tracking_uri(tracking_uri))
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="lora_sweep_report_") as scratch, _quiet_downloads():
        data, parent = collect(client, experiment=experiment, sweep_run_id=sweep_run_id, step=step,
                               all_sweeps=all_sweeps, baseline=baseline, select=select, scratch=Path(scratch))
    runs = [r for g in data.groups for r in g.runs]
    colors = [i for i, g in enumerate(data.groups) for _ in g.runs]
    labels = [g.label for g in data.groups for _ in g.runs]
    summary = build_summary(data)
    marks = best_marks(summary)
    figures = {name: png for name, keys in curve_groups(runs).items()
               if (png := curve_figure(runs, keys, colors=colors, labels=labels, marks=marks)) is not None}
    forest = forest_figure(summary)
    written = [write_bytes(out_dir / f"{name}.png", png) for name, png in figures.items()]
    for name, png in (("grid", grid_png(data)), ("progression", progression_png(data)), ("forest", forest)):
        if png is not None:
            written.append(write_bytes(out_dir / f"{name}.png", png))
    written.append(write_text(out_dir / "summary.json", to_json(summary)))
    if json_path is not None:
        write_text(Path(json_path), to_json(summary))
    html_path = write_text(out_dir / "report.html", render_html(data, figures, summary, forest))
    if parent is not None:
        for path in [html_path, *written]:
            client.log_artifact(parent.info.run_id, str(path), artifact_path="report")
    return html_path


def default_out(experiment: str | None, sweep_run_id: str | None, all_sweeps: bool = False) -> Path:
    """Where compare writes without --out: reports/<sweep id>, reports/<experiment> or
    reports/<experiment>-all-sweeps, so the three never overwrite each other.
    """
    if sweep_run_id:
        return Path("reports") / sweep_run_id
    name = experiment or DEFAULT_EXPERIMENT
    return Path("reports") / (f"{name}-all-sweeps" if all_sweeps else name)


def _select_arg(text: str) -> str:
    """--select checked before any run is read: a bad spec is argparse's error (exit 2) with the spec's paragraph."""
    from lora_sweep.tracking.metric_spec import parse_metric_spec

    try:
        parse_metric_spec(text, "--select")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def score(args) -> None:
    """--score: `compare.score.score_runs` over the runs the report compares, one line per run on stdout."""
    from lora_sweep.compare.score import score_runs
    from lora_sweep.tracking import store

    extra = likeness_scorers(args.clip_model, args.dino_model)  # refused before any run is read
    client = store.client(resolve_tracking_uri(args.tracking_uri))
    _, runs = find_runs(client, experiment=args.experiment, sweep_run_id=args.sweep_run_id, all_sweeps=args.all_sweeps)
    with _quiet_downloads():
        for line in score_runs(client, runs, extra):
            print(f"score: {line}")


def likeness_scorers(clip_model: str | None, dino_model: str | None) -> list:
    """[the img/clip_t, img/clip_i, img/dino scorer] of --clip-model / --dino-model (sampling/embeddings.py); a
    UserError naming the option when a folder cannot load; [] when neither is given."""
    from lora_sweep.sampling.embeddings import EmbeddingScorer, folder_problem

    problems = [problem for option, path in (("--clip-model", clip_model), ("--dino-model", dino_model))
                if path and (problem := folder_problem(path, option))]
    if problems:
        raise UserError("\n".join(problems))
    scorer = EmbeddingScorer(clip_model, dino_model, [])
    return [scorer.score_step] if scorer.active else []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_sweep compare",
                                     description="Compare a sweep's variants in one HTML page.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--experiment", help=f"MLflow experiment name (default {DEFAULT_EXPERIMENT}): its newest "
                                            "sweep that has runs is compared (all its job runs when it has no sweep "
                                            "run); with --all-sweeps, every job run of the experiment")
    which.add_argument("--sweep", dest="sweep_run_id", help="run id of a sweep's parent run")
    parser.add_argument("--step", type=int, help="sampling step of the sample grid and of the image metrics img/* "
                                                 "(default: the latest step all runs sampled); losses and fitting "
                                                 "speed stay final, and each metric row says its step")
    parser.add_argument("--baseline", help="variant name or run id for the differences (default: compare.baseline "
                                           "of the runs, else the first variant in the sweep's order)")
    parser.add_argument("--select", metavar="METRIC[:max|min]", type=_select_arg,
                        help="choose each variant's best checkpoint by this metric, e.g. fit/loss or "
                             "img/diversity:max (default: compare.select of the runs; none when unset)")
    parser.add_argument("--json", dest="json_path", type=Path,
                        help="also write the comparison's numbers (the page's JSON summary) to this file")
    parser.add_argument("--all-sweeps", action="store_true",
                        help="compare every job run of the experiment, whichever sweep ran it (replicates of one "
                             "config from different sweeps group together), not only its newest sweep")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/<sweep id>, reports/<experiment>, "
                                                 "or reports/<experiment>-all-sweeps)")
    parser.add_argument("--tracking-uri", "--store", dest="tracking_uri",
                        help="MLflow tracking store URI, as `ui --tracking-uri` takes it (default: "
                             "$MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--score", action="store_true",
                        help="first compute the scorecard's image metrics (img/copying, img/diversity, img/drift) "
                             "from each compared run's logged samples and log those it lacks at their steps "
                             "(runs sampled before they existed); a second call adds nothing")
    parser.add_argument("--clip-model", help="with --score: a local transformers CLIPModel folder (as "
                                             "evaluation.clip_model) for img/clip_t and img/clip_i")
    parser.add_argument("--dino-model", help="with --score: a local transformers Dinov2Model or ViTModel folder (as "
                                             "evaluation.dino_model) for img/dino")
    args = parser.parse_args(argv)
    if (args.clip_model or args.dino_model) and not args.score:
        parser.error("--clip-model and --dino-model give --score its weights folders: add --score")
    if args.all_sweeps and args.sweep_run_id:
        parser.error("--all-sweeps compares an experiment's runs across its sweeps: give --experiment, not --sweep")
    out_dir = args.out or default_out(args.experiment, args.sweep_run_id, args.all_sweeps)
    try:
        if args.score:
            score(args)
        path = build_report(experiment=args.experiment, sweep_run_id=args.sweep_run_id, step=args.step,
                            all_sweeps=args.all_sweeps, select=args.select,
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
