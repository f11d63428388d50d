"""Reading a comparison's runs from MLflow: which runs, and what each holds. `report.py` turns them into the page.

The conventions it reads (the job writes them):
- Sweep parent run: tag `lora_sweep.role` = "sweep". Job runs: `lora_sweep.role` = "job", `mlflow.parentRunId`,
  `variant`, `config_hash`, `lora_sweep.job_num` (the sweep's order) and `lora_sweep.choice.<group>`.
- Params: the resolved config with dot keys. Metrics by optimizer step: `train/*`, `fit/loss`, `val/loss`,
  `img/<metric>`; the final fit/val points as `evaluation/{fit,val}_points.json`.
- Images: `sample_pNN` per prompt and step (`sample_pNN_sSEED` with several seeds), specs in
  `samples/prompts.json`. MLflow stores them as
  `images/{key}+step+{step}+timestamp+{ms}+{uuid}.png` ("/" as "~"; before MLflow 2.22 "%" and "#": both read);
  of a (key, step) logged twice (a resumed run) the latest wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path

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




def find_runs(client, *, experiment: str | None, sweep_run_id: str | None, all_sweeps: bool = False):
    """(parent run or None, job runs in launch order); UserError when there are none.

    A sweep's runs: its children and `reused_runs`. Neither argument: the newest sweep of the default experiment
    that has runs; an experiment without sweep runs: all its job runs. `all_sweeps`: every job run of the experiment
    (no parent), replicates from different sweeps grouped as usual.
    """
    from lora_sweep.tracking.store import read_job_runs

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
        if all_sweeps:
            return _all_jobs(client, experiment_id)
        sweeps = client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'", order_by=["start_time DESC"],
                                    max_results=100)
        parent = sweeps[0] if sweeps else None
        for sweep in sweeps:
            if client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{sweep.info.run_id}'", max_results=1) \
                    or read_job_runs(sweep.data.tags):
                parent = sweep
                break
    if parent is None:
        return _all_jobs(client, experiment_id)
    jobs = sweep_runs(client, experiment_id, parent)
    if not jobs:
        raise UserError(f"No job runs found for sweep {parent.info.run_id} in {client.tracking_uri}: nothing to "
                        "compare. Check --experiment / --sweep, or wait until the sweep has started its jobs.")
    jobs.sort(key=lambda run: (run.info.start_time or 0, run.info.run_id))
    return parent, jobs


def _all_jobs(client, experiment_id: str):
    """(None, every job run of the experiment, in launch order)."""
    jobs = client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'job'", max_results=5000)
    if not jobs:
        raise UserError(f"No job runs found for experiment {experiment_id} in {client.tracking_uri}: nothing to "
                        "compare. Check --experiment / --sweep, or wait until the sweep has started its jobs.")
    jobs.sort(key=lambda run: (run.info.start_time or 0, run.info.run_id))
    return None, jobs


def sweep_runs(client, experiment_id: str, parent) -> list:
    """A sweep's job runs, finished or not: its children, then the other runs its jobs used (`reused_runs`)."""
    jobs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'", max_results=5000)
    return jobs + reused_runs(client, parent, {run.info.run_id for run in jobs})


def reused_runs(client, parent, children: set[str]) -> list:
    """The runs of this sweep's jobs that are not its children (the parent's `lora_sweep.job_runs` tag).

    FINISHED runs of earlier sweeps its skipped jobs matched, and unfinished runs the children search misses. Each
    takes this sweep's job number, so the report orders it as this sweep's job.
    """
    from lora_sweep.compare.variants import JOB_NUM_TAG
    from lora_sweep.tracking.store import read_job_runs

    found = []
    for num, run_id in sorted(read_job_runs(parent.data.tags).items()):
        if run_id in children:
            continue
        try:
            run = client.get_run(run_id)
        except Exception:  # deleted for good since
            continue
        if run.info.lifecycle_stage == "active":
            run.data.tags[JOB_NUM_TAG] = str(num)  # this sweep's order (the run's own tag keeps its first sweep's)
            found.append(run)
    return found


def download_image(client, run_id: str, artifact_path: str, scratch: Path):
    from PIL import Image

    local = client.download_artifacts(run_id, artifact_path, str(scratch))
    with Image.open(local) as image:
        return image.convert("RGB")


def download_json(client, run_id: str, artifact_path: str, scratch: Path):
    """A run's JSON artifact, or None when it has none (or it does not parse)."""
    try:
        return json.loads(Path(client.download_artifacts(run_id, artifact_path, str(scratch))).read_text("utf-8"))
    except Exception:
        return None


def read_points(client, run_id: str, scratch: Path) -> dict[str, dict[tuple[str, int], float]]:
    """The per-point values of a run's final fit/val evaluation: {"fit/loss": {(image, t): value}}."""
    found = {}
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluation")}
    for prefix in ("fit", "val"):
        if f"{prefix}_points.json" not in names:
            continue
        payload = download_json(client, run_id, f"evaluation/{prefix}_points.json", scratch)
        if payload:
            found[payload["metric"]] = {(p["image"], int(p["t"])): float(p["value"]) for p in payload["points"]}
    return found


def column_titles(specs: list[dict] | None, image_keys: list[str]) -> dict[str, str]:
    """'p00 · seed 1234: a photo of ...' from a run's samples/prompts.json (a spec with a "key" is that key's: several
    seeds per prompt; else `sample_pNN` is spec NN)."""
    titles = {}
    keyed = {spec["key"]: spec for spec in specs or [] if "key" in spec}
    for key in image_keys if specs else []:
        match = re.fullmatch(r"sample_p(\d+)(?:_s\d+)?", key)
        if match is None:
            continue
        index = int(match[1])
        spec = keyed.get(key) if keyed else (specs[index] if index < len(specs) else None)
        if spec is not None:
            text = spec["prompt"] if len(spec["prompt"]) <= 60 else spec["prompt"][:57] + "..."
            titles[key] = f"p{index:02d} · seed {spec['seed']}: {text}"
    return titles


def read_run(client, run, scratch: Path):
    """One job run's params, tags, metric histories, evaluation points and sample specs (no images yet)."""
    from lora_sweep.compare.variants import VariantData

    run_id = run.info.run_id
    histories = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                                         key=lambda m: (m.step, m.timestamp))]
                 for key in run.data.metrics}
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "samples")}
    prompts = download_json(client, run_id, "samples/prompts.json", scratch) if "prompts.json" in names else None
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

