"""A sweep job's peers for `sweep.stop_early`: the other runs of its sweep and their values at a step.

The sweep's runs are its parent run's children (tag `mlflow.parentRunId`) and the finished runs its skipped jobs
matched (their run id in the job's status file, as `callbacks.sweep_summary` counts them). Every call may block on
the store: the caller (training.stop_early.EarlyStop) waits on it with a timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class SweepPeers:
    """`client`'s view of run `run_id`'s sweep (`parent_id` None: not in a sweep; `sweep_dir` holds the status
    files of its skipped jobs)."""

    client: Any
    run_id: str
    parent_id: str | None = None
    sweep_dir: Path | None = None

    def run_ids(self) -> list[str]:
        """The sweep's other runs: the parent's children, then the runs its skipped jobs matched."""
        from hydra_plugins._job_outcome import read_statuses

        experiment = self.client.get_run(self.parent_id).info.experiment_id
        children = self.client.search_runs([experiment], max_results=5000,
                                           filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'")
        ids = [c.info.run_id for c in children]
        if self.sweep_dir is not None:
            ids += [str(s["run_id"]) for s in read_statuses(self.sweep_dir).values()
                    if str(s.get("state") or "").lower() == "skipped" and s.get("run_id")]
        return [i for i in dict.fromkeys(ids) if i != self.run_id]

    def values_at(self, metric: str, step: int) -> list[float] | None:
        """The other runs' values of `metric` at `step` (those that logged it); None outside a sweep."""
        if self.parent_id is None:
            return None
        values = []
        for run_id in self.run_ids():
            value = value_at(self.client, run_id, metric, step)
            if value is not None:
                values.append(value)
        return values

    def own_value(self, metric: str, step: int) -> float | None:
        return value_at(self.client, self.run_id, metric, step)


def value_at(client, run_id: str, metric: str, step: int) -> float | None:
    """Run `run_id`'s value of `metric` at `step` (the last one logged there), or None."""
    found = [m.value for m in client.get_metric_history(run_id, metric) if m.step == step]
    return float(found[-1]) if found else None
