"""Skip-finished: a FINISHED run counts only if it trained the same config on the same files (`skip_key`)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

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
