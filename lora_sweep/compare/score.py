"""`compare --score`: the scorecard's metrics computed afterwards from a run's logged samples, for runs that sampled
before they existed (or before a weights folder was given), logged to the run at its sampled steps.

Each run's samples are read back by key and step (`runs.logged_images`), its training images from the folders of
its `data/datasets.json` by the training's listing rule (regularization subsets left out), img/drift's reference
from its step-0 samples. A metric the run already has at a step is not logged again: a second call changes nothing.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

from lora_sweep.compare.runs import download_image, download_json, logged_images
from lora_sweep.paths import subset_images
from lora_sweep.sampling import scorecard

log = logging.getLogger(__name__)

SAMPLE_KEY = re.compile(r"sample_p(?P<prompt>\d+)(?:_s(?P<seed>\d+))?")


def training_paths(client, run_id: str, scratch: Path) -> list[Path]:
    """The image files of the run's training subsets (not regularization) as `data/datasets.json` names their
    folders, listed as the training listed them (`record_paths`); [] when the run has no record (then no
    img/copying)."""
    return record_paths(download_json(client, run_id, "data/datasets.json", scratch) or [])


def record_paths(record: list[dict]) -> list[Path]:
    """The training images of a datasets record: each training subset's `paths.subset_images`, less the files PIL
    cannot read (the training skipped them too; each is logged); a folder that is gone adds none."""
    from PIL import Image

    paths: list[Path] = []
    for dataset in record:
        for subset in dataset.get("subsets", []):
            folder = Path(subset.get("image_dir") or "")
            if not subset.get("is_reg") and folder.is_dir():
                paths += subset_images(folder)
    readable = []
    for path in paths:
        try:
            with Image.open(path):
                readable.append(path)
        except Exception as error:  # PIL raises many types for files it cannot identify; the OS, OSErrors
            log.warning("skipping unreadable training image '%s': %s", path, error)
    return readable


def sample_order(keys: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """The sample keys in prompt-major order and the indices of each prompt's seeds (`sample_pNN_sSEED` keys of one
    NN form a group; a `sample_pNN` key is a group of its own)."""
    parsed = sorted((int(m["prompt"]), int(m["seed"] or -1), key) for key in keys if (m := SAMPLE_KEY.fullmatch(key)))
    ordered = [key for _, _, key in parsed]
    groups: dict[tuple[int, int | None], list[int]] = {}
    for index, (prompt, seed, _) in enumerate(parsed):
        groups.setdefault((prompt, index if seed < 0 else None), []).append(index)  # a seedless key stands alone
    return ordered, list(groups.values())


def prompt_texts(specs: list[dict] | None, keys: Sequence[str]) -> list[str]:
    """Each key's prompt text from the run's samples/prompts.json ("" when it is not there)."""
    keyed = {spec["key"]: spec["prompt"] for spec in specs or [] if "key" in spec}
    texts = []
    for key in keys:
        index = int(SAMPLE_KEY.fullmatch(key)["prompt"])
        plain = specs[index]["prompt"] if specs and not keyed and index < len(specs) else ""
        texts.append(keyed.get(key, plain))
    return texts


def score_logged_run(client, run, extra_scorers: Sequence[scorecard.Scorer] = (), *,
                     scratch: Path) -> dict[int, dict[str, float]]:
    """Compute the pixel metrics (and each extra scorer's) at every step the run sampled and log those the run lacks
    at that step; returns {step: {metric: value}} of what was logged ({} when nothing was missing)."""
    run_id = run.info.run_id
    images = logged_images(client, run_id)
    keys, groups = sample_order({key for key, _ in images})
    if not keys:
        return {}
    paths = training_paths(client, run_id, scratch)
    training = scorecard.training_thumbnails(paths)
    texts = prompt_texts(download_json(client, run_id, "samples/prompts.json", scratch), keys)
    logged_steps: dict[str, set[int]] = {}

    def logged(name: str) -> set[int]:
        if name not in logged_steps:
            logged_steps[name] = {m.step for m in client.get_metric_history(run_id, name)}
        return logged_steps[name]

    reference = None
    added: dict[int, dict[str, float]] = {}
    for step in sorted({step for key, step in images if key in keys}):
        present = [key for key in keys if (key, step) in images]
        if present != keys:  # a step cut short: its samples do not compare with the others'
            continue
        pictures = [download_image(client, run_id, images[(key, step)].path, scratch) for key in keys]
        if step == 0:
            reference = {key: scorecard.thumbnail(image) for key, image in zip(keys, pictures, strict=True)}
        samples = scorecard.StepSamples(step, keys, pictures, texts, groups)
        values = scorecard.pixel_scores(samples, training, reference)
        for scorer in extra_scorers:
            values |= scorer(samples, paths)
        missing = {name: value for name, value in values.items() if step not in logged(name)}
        if missing:
            added[step] = missing
    _log(client, run_id, added)
    return added


def _log(client, run_id: str, added: dict[int, dict[str, float]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(name, value, now, step) for step, values in added.items() for name, value in values.items()]
    for start in range(0, len(metrics), 1000):  # MLflow's log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def score_runs(client, runs: Sequence, extra_scorers: Sequence[scorecard.Scorer] = ()) -> list[str]:
    """`score_logged_run` of each run that is not running (its own Sampler logs its steps); one line per run saying
    what was logged."""
    import tempfile

    lines = []
    for run in runs:
        if run.info.status == "RUNNING":
            lines.append(f"{run.info.run_name or run.info.run_id[:8]}: still running, left to its training")
            continue
        with tempfile.TemporaryDirectory(prefix="lora_sweep_score_") as scratch:
            added = score_logged_run(client, run, extra_scorers, scratch=Path(scratch))
        names = sorted({name for values in added.values() for name in values})
        name = run.info.run_name or run.info.run_id[:8]
        lines.append(f"{name}: logged {', '.join(names)} at {len(added)} sampled steps" if added else
                     f"{name}: nothing to add (no samples, or every metric already logged)")
    return lines
