"""Hydra callbacks: a sweep is an MLflow parent run, whatever launcher runs its jobs.

`on_multirun_start` runs once, in the process that launches the sweep. It creates the parent run and writes its id
into the sweep directory (`.mlflow_parent_run_id`), where every job, local, Ray or Slurm, finds it on the shared
filesystem and nests its own run under it. `on_multirun_end` closes the parent with the worst child status.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.client = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lora_sweep import tracking
        from lora_sweep.atomic import write_text

        self.client = tracking.client(tracking.tracking_uri(config.tracking.uri))
        exp_id = tracking.experiment_id(self.client, config.tracking.experiment)
        sweep_dir = Path(config.hydra.sweep.dir)
        run = self.client.create_run(exp_id, run_name=f"sweep {sweep_dir.name}", tags={
            tracking.ROLE: "sweep", "sweep_dir": str(sweep_dir.resolve()),
            "overrides": " ".join(config.hydra.overrides.task),
        })
        self.run_id = run.info.run_id
        write_text(sweep_dir / tracking.PARENT_FILE, self.run_id)
        log.info("sweep parent run %s; jobs go to %s", self.run_id, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        children = self.client.search_runs(
            [self.client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
        )
        statuses = {r.info.status for r in children}
        status = "FAILED" if "FAILED" in statuses else "KILLED" if "KILLED" in statuses else "FINISHED"
        self.client.set_terminated(self.run_id, status=status)
        log.info("sweep parent run %s ended %s (%d job runs)", self.run_id, status, len(children))
