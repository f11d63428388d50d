"""Skip-finished: a FINISHED run counts only if it trained the same config on the same files (`skip_key`)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from hydra_plugins._job_outcome import JobOutcome
from lora_sweep.data.dataset import FolderScan
from lora_sweep.data.fingerprint import Fingerprint, dataset_fingerprint
from lora_sweep.paths import cache_root

log = logging.getLogger(__name__)


def dataset_of(cfg, scans: Sequence[FolderScan]) -> Fingerprint:
    """The content fingerprint of the job's scans (training scans, then the validation folder's, each with its own
    caption extension) and of data.dataset_config's and network.network_weights' files, reusing the cache's digests:
    a file changed at the same path makes another run."""
    files = [cfg.data.dataset_config, cfg.network.network_weights]
    return dataset_fingerprint(scans, memo_dir=cache_root(cfg) / ".hashes",
                               files=[Path(f).expanduser() for f in files if f])


def skip_key(cfg, chash: str, fingerprint: Fingerprint) -> str:
    """16 hex digits over the config hash, the absolute model, dataset, validation and prompt-file paths, and the
    dataset's content fingerprint."""
    paths = {}
    for field in ("model.path", "data.dir", "data.validation_dir", "sampling.prompt_file"):
        group, key = field.split(".")
        value = cfg[group][key]
        paths[field] = str(Path(str(value)).expanduser().resolve()) if value else None
    blob = json.dumps({"config_hash": chash, "paths": paths, "dataset": fingerprint.digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finished_match(client, exp_id: str, chash: str, key: str, fingerprint: Fingerprint,
                   label: str) -> tuple[str, str] | None:
    """(run id, skip line) of a FINISHED run with this config and skip key; else None, logging why a FINISHED run of
    the same config does not count."""
    from lora_sweep.tracking.store import finished_runs

    runs = finished_runs(client, exp_id, chash)
    for run in runs:
        if run.data.tags.get("lora_sweep.skip_key") == key:
            line = (f"config {chash} with {fingerprint.describe()} already FINISHED as run {run.info.run_id} "
                    "(sweep.skip_finished=false to train again)")
            log.info("skipped %s: %s", label, line)
            return run.info.run_id, line
    if runs:
        old = runs[0].data.tags.get("lora_sweep.dataset")
        why = (f"its dataset was {old} and is now {fingerprint.describe()}" if old and old != fingerprint.digest
               else "a model, dataset or prompt-file path differs" if old
               else "it predates dataset fingerprints")
        log.info("config %s FINISHED as run %s, but %s: training again", chash, runs[0].info.run_id, why)
    return None


def skip_before_start(cfg) -> JobOutcome | None:
    """The gpu_queue launcher's `precheck`, in the sweep process: SKIPPED (status file written, as `run_job` would)
    when skip-finished matches a FINISHED run, so an all-finished sweep never starts the fork server; else None, and
    the job decides (a problem found here is the job's to report). Reads only: no lock, no replay, no new experiment,
    so it can only skip less than the job, never more."""
    from hydra.core.hydra_config import HydraConfig

    from lora_sweep.checks.preflight import Memo, scan_dataset, training_scans
    from lora_sweep.config import config_hash
    from lora_sweep.data.photos import data_folder
    from lora_sweep.errors import UserError
    from lora_sweep.job.names import read_swept_keys, run_label
    from lora_sweep.job.status import StatusFile, status_file_path
    from lora_sweep.paths import make_paths_absolute
    from lora_sweep.tracking import store

    if not cfg.sweep.skip_finished or cfg.train.resume not in ("auto", "never"):
        return None
    hc = HydraConfig.get()
    make_paths_absolute(cfg)  # as sweep.py's main: the hash and skip key see absolute paths
    try:
        client = store.client(store.tracking_uri(cfg.tracking.uri))
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            return None
        d, memo = cfg.data, Memo()
        folder = None if d.datasets or d.dataset_config else data_folder(cfg)
        _, scans = training_scans(cfg, folder, memo, skip_missing=False)
        if d.validation_dir:
            scans = [*scans, scan_dataset(Path(d.validation_dir), d.caption_extension, "data.validation_dir", memo)]
        if any(scan.problems for scan in scans):
            return None
        chash = config_hash(cfg)  # train.max_steps, which the job resolves from epochs, is outside it then
        sweep_dir = Path(hc.sweep.dir)
        label = run_label(cfg.tracking.variant, list(hc.overrides.task), read_swept_keys(sweep_dir))
        fingerprint = dataset_of(cfg, scans)
        done = finished_match(client, experiment.experiment_id, chash, skip_key(cfg, chash, fingerprint),
                              fingerprint, label)
    except UserError as exc:
        log.debug("the job decides: %s", exc)
        return None
    if done is None:
        return None
    status = StatusFile(label, status_file_path(sweep_dir, hc.job.num))
    status.update(force=True, state="skipped", run_id=done[0], reason=done[1])
    return JobOutcome("SKIPPED", done[0], reason=done[1], label=label)
