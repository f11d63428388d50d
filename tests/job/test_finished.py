"""Skip-finished matches FINISHED runs only: a run `sweep.stop_early` stopped (KILLED, tagged) trains again, resumed
from its state (real sqlite store, runs tagged as a job tags them)."""

from __future__ import annotations

import json
import logging

from conftest import new_store

from lora_sweep.data.fingerprint import Fingerprint
from lora_sweep.job.finished import finished_match
from lora_sweep.tracking.stopped import STOPPED_EARLY

CONFIG_HASH, SKIP_KEY = "c0ffee0123456789", "5" * 16


def test_a_run_stopped_early_is_not_finished_for_skip_finished(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(new_store(tmp_path / "mlflow.db"))
    exp = client.create_experiment("skip")
    tags = {"config_hash": CONFIG_HASH, "lora_sweep.skip_key": SKIP_KEY, "lora_sweep.role": "job"}
    stopped = client.create_run(exp, tags=tags).info.run_id
    client.set_tag(stopped, STOPPED_EARLY, json.dumps({"step": 2, "rule": "diverged", "metric": "fit/loss",
                                                       "value": float("nan"), "compared_with": 0.6, "peers": 0}))
    client.set_terminated(stopped, "KILLED")
    fingerprint = Fingerprint("0" * 16, 3, (str(tmp_path / "data"),))
    with caplog.at_level(logging.INFO, logger="lora_sweep.job.finished"):
        assert finished_match(client, exp, CONFIG_HASH, SKIP_KEY, fingerprint, "v57") is None
    assert caplog.text == ""  # not even "FINISHED as run ...": no FINISHED run of this config exists
    done = client.create_run(exp, tags=tags).info.run_id  # the same config trained to the end (e.g. the rule off)
    client.set_terminated(done, "FINISHED")
    with caplog.at_level(logging.INFO, logger="lora_sweep.job.finished"):
        run_id, line = finished_match(client, exp, CONFIG_HASH, SKIP_KEY, fingerprint, "v57")
    assert run_id == done and line == (f"config {CONFIG_HASH} with dataset {'0' * 16} (3 files in {tmp_path / 'data'}) "
                                       f"already FINISHED as run {done} (sweep.skip_finished=false to train again)")
