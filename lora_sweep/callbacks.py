"""Hydra callbacks: a sweep is an MLflow parent run, whatever launcher runs its jobs.

`on_multirun_start` runs once, in the process that launches the sweep. It creates the parent run and writes its id
into the sweep directory (`.mlflow_parent_run_id`), where every job, local, Ray or Slurm, finds it on the shared
filesystem and nests its own run under it. `on_multirun_end` closes the parent with the worst child status and writes the comparison report. Hydra skips
`on_multirun_end` when a job failed or on Ctrl-C, so an atexit hook closes the parent run then too: a sweep's run is
never left RUNNING.
"""

from __future__ import annotations

import atexit
import logging
import os
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
        self.sweep_dir = sweep_dir
        write_text(sweep_dir / tracking.PARENT_FILE, self.run_id)
        self._pid = os.getpid()  # forked job processes inherit atexit hooks: only this process may close the run
        atexit.register(self._close)
        log.info("sweep parent run %s; jobs go to %s", self.run_id, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        """End the parent run with the worst status of its children (once), then write the comparison report."""
        if self.run_id is None or os.getpid() != self._pid:
            return
        run_id, self.run_id = self.run_id, None
        children = self.client.search_runs(
            [self.client.get_run(run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        )
        statuses = {r.info.status for r in children}
        status = "FAILED" if "FAILED" in statuses else "KILLED" if statuses & {"KILLED", "RUNNING"} else "FINISHED"
        if any(r.info.status == "FINISHED" for r in children):
            self._report(run_id)
        self.client.set_terminated(run_id, status=status)
        log.info("sweep parent run %s ended %s (%d job runs)", run_id, status, len(children))

    def _report(self, run_id: str) -> None:
        """The side-by-side report of the sweep's runs, logged on the parent run (a failure here fails nothing)."""
        try:
            from lora_sweep.compare.report import build_report

            path = build_report(experiment=None, sweep_run_id=run_id, step=None, out_dir=self.sweep_dir / "report",
                                baseline=None, tracking_uri=self.client.tracking_uri)
            log.info("comparison report: %s  (browse the runs with `make ui`)", path)
        except Exception as exc:  # a report problem must not turn a good sweep into a failed one
            log.warning("could not write the comparison report: %s", exc)
