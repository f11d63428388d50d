"""The sweep's MLflow parent run (a Hydra callback), whatever launcher runs its jobs.

`on_multirun_start`, once in the launching process: checks the store (exit 2 if unusable), closes stale runs,
creates the parent run and writes its id (`.mlflow_parent_run_id`) and the swept keys into the sweep folder, where
every job finds them. The parent is closed once (`on_multirun_end`, or atexit when Hydra skips it) from its jobs'
child runs and the status files of jobs without a run (`sweep_summary`): KILLED if stopped, else FAILED if any job
failed, else FINISHED (a job `sweep.stop_early` stopped counts as "stopped early", not as killed); tags
`lora_sweep.jobs_*`, `lora_sweep.failure` and `lora_sweep.job_runs` (skipped jobs' matched runs too); then the
comparison report, if any job finished or matched a FINISHED run.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
LEFT_OPEN = "its job process ended without closing the run (killed, or it crashed)"
ENDED = ("FINISHED", "FAILED", "KILLED", "SKIPPED", "CANCELLED")
STOPPED_EARLY = "STOPPED_EARLY"  # a job's end in the parent's counts: KILLED by sweep.stop_early's rule


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.client = None
        self._ended_normally = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lora_sweep.errors import UserError

        try:
            self._start(config)
        except UserError as exc:  # an unusable store: exit 2 before any job starts
            log.error("%s", exc)
            sys.exit(2)

    def _start(self, config: DictConfig) -> None:
        from hydra_plugins._job_outcome import remove_statuses
        from lora_sweep.atomic import write_text
        from lora_sweep.checks.preflight import SWEEP_DATASETS, SWEEP_TRACKING
        from lora_sweep.checks.sweep import tracking_target
        from lora_sweep.job.names import swept_keys, write_datasets_seen, write_swept_keys
        from lora_sweep.paths import state_root
        from lora_sweep.tracking import store
        from lora_sweep.tracking.stale import close_stale_runs

        sweep_dir = Path(config.hydra.sweep.dir)
        # the jobs' own experiment (experiment files may set it): MLflow nests runs only within one
        uri, experiment = SWEEP_TRACKING.get(str(sweep_dir)) or tracking_target(config)
        self.client = store.client(uri)
        exp_id = store.experiment_id(self.client, experiment)
        close_stale_runs(self.client, exp_id, by=f"the sweep in {sweep_dir}", state_root=state_root(config))
        task = list(config.hydra.overrides.task)
        run = self.client.create_run(exp_id, run_name=f"sweep {sweep_dir.name}", tags={
            store.ROLE: "sweep", "sweep_dir": str(sweep_dir.resolve()),
            "overrides": store.fit(" ".join(task), store.MAX_TAG_CHARS, f"{sweep_dir}/multirun.yaml"),
            **store.process_tags(),
        })
        self.run_id = run.info.run_id
        self.sweep_dir, self.experiment, self.experiment_id = sweep_dir, experiment, exp_id
        write_text(sweep_dir / store.PARENT_FILE, self.run_id)
        remove_statuses(sweep_dir)  # an earlier sweep's
        write_datasets_seen(sweep_dir, SWEEP_DATASETS.pop(str(sweep_dir), {}))  # replaces an earlier sweep's
        try:
            write_swept_keys(sweep_dir, swept_keys(task))
        except Exception as exc:  # names fall back to every override
            log.debug("could not parse the sweep's overrides: %s", exc)
        self._pid = os.getpid()  # forked jobs inherit atexit hooks: only this process closes the run
        atexit.register(self._close)
        log.info("sweep parent run %s; jobs go to %s", self.run_id, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._ended_normally = True
        self._close()

    def _close(self) -> None:
        """End the parent run (once) with what happened to its jobs, then write the comparison report."""
        if self.run_id is None or os.getpid() != self._pid:
            return
        run_id, self.run_id = self.run_id, None
        try:
            summary = sweep_summary(self.client, run_id, self.sweep_dir, ended_normally=self._ended_normally)
        except Exception as exc:  # never leave the parent RUNNING because the bookkeeping failed
            log.warning("could not read the sweep's job outcomes: %s", exc)
            summary = {"status": "FAILED", "counts": {}, "failure": f"the sweep's outcome is unknown: {exc}",
                       "any_finished": True}
        from lora_sweep.tracking import store

        tags = {f"lora_sweep.jobs_{k}": str(v) for k, v in summary["counts"].items()}
        tags.update(store.job_runs_tags(summary.get("job_runs", {})))
        if summary["failure"]:
            tags[store.FAILURE] = store.fit(summary["failure"], store.MAX_TAG_CHARS, "the sweep's console")
        if not self._end_parent(run_id, tags, summary):
            return
        log.info("sweep parent run %s ended %s (%s)", run_id, summary["status"], jobs_line(summary))

    def _end_parent(self, run_id: str, tags: dict[str, str], summary: dict[str, Any]) -> bool:
        """Tag the parent, write the report, close it; a store that does not take it gets a pending file that
        `python -m lora_sweep replay` sends later (False then)."""
        from mlflow.entities import RunTag

        from lora_sweep.tracking.replay import PENDING_NAME, spill
        from lora_sweep.tracking.store import first_line

        tag_list = [RunTag(k, v) for k, v in tags.items()]
        try:
            self.client.log_batch(run_id, tags=tag_list)
            if summary["any_finished"]:
                self._report(run_id)
            self.client.set_terminated(run_id, status=summary["status"])
        except Exception as exc:
            pending = self.sweep_dir / PENDING_NAME
            spill(pending, run_id, self.client.tracking_uri, [("tags", tag_list), ("end", (summary["status"], None))])
            log.error("MLflow store %s did not take the end of the sweep's parent run %s (%s): it shows RUNNING until "
                      "`python -m lora_sweep replay %s`", self.client.tracking_uri, run_id, first_line(exc), pending)
            return False
        return True

    def _report(self, run_id: str) -> None:
        """The side-by-side report of the sweep's runs, logged on the parent run (a failure here fails nothing)."""
        try:
            from lora_sweep.compare.report import build_report

            path = build_report(experiment=None, sweep_run_id=run_id, step=None, out_dir=self.sweep_dir / "report",
                                baseline=None, tracking_uri=self.client.tracking_uri)
            from lora_sweep.tracking.ui import browse_command

            log.info("comparison report: %s  (browse the runs with `%s`)", path,
                     browse_command(self.client.tracking_uri, self.experiment, self.experiment_id))
        except Exception as exc:  # a report problem must not turn a good sweep into a failed one
            log.warning("could not write the comparison report: %s", exc)


def sweep_summary(client, run_id: str, sweep_dir: Path, *, ended_normally: bool) -> dict[str, Any]:
    """{status, counts, failure, job_runs ({job number: run id}), stopped_early ([{job, label, run_id, why}]),
    any_finished} of the sweep, from the parent's child runs and the status files of jobs without a run; closes
    child runs a dead job left RUNNING. Jobs the rule stopped fail nothing: they count as "stopped_early"."""
    from hydra_plugins._job_outcome import read_statuses

    experiment = client.get_run(run_id).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                                  max_results=5000)
    jobs = _jobs(children, read_statuses(sweep_dir))
    interrupted = any((job.get("verdict") or job["status"]) in ("KILLED", "CANCELLED") for job in jobs.values())
    for job in jobs.values():
        if job["status"] == "RUNNING":
            _close_left_open(client, job, interrupted)
    counts = {"total": len(jobs)}
    for name in ("finished", "stopped_early", "failed", "skipped", "killed", "cancelled"):
        counts[name] = sum(job["status"] == name.upper() for job in jobs.values())
    if interrupted:
        status = "KILLED"
    elif counts["failed"] or not ended_normally:
        status = "FAILED"
    else:
        status = "FINISHED"
    how = "stopped" if interrupted else "ended" if ended_normally or counts["failed"] else "broke off"
    job_runs = {num: job["run_id"] for num, job in jobs.items() if isinstance(num, int) and job.get("run_id")}
    reused = any(job["status"] == "SKIPPED" and job.get("run_id") for job in jobs.values())  # matched FINISHED runs
    stopped = [{"job": num, "label": job.get("label"), "run_id": job["run_id"], "why": job["stopped"].describe()}
               for num, job in sorted(jobs.items(), key=lambda item: str(item[0])) if job["status"] == STOPPED_EARLY]
    return {"status": status, "counts": counts, "failure": _failure_text(jobs, counts, how), "job_runs": job_runs,
            "stopped_early": stopped, "any_finished": reused or any(c.info.status == "FINISHED" for c in children)}


def jobs_line(summary: Mapping[str, Any]) -> str:
    """'12 jobs: 9 finished, 2 stopped early (v57 at step 400: fit/loss 1.23 > median 1.10; ...), 1 failed'."""
    counts = summary.get("counts") or {}
    if not counts.get("total"):
        return "no job ran"
    parts = []
    for name, value in counts.items():
        if name == "total" or not value:
            continue
        if name == "stopped_early":
            stopped = summary.get("stopped_early", [])
            whys = "; ".join(f"{s['label'] or '#' + str(s['job'])} {s['why']}" for s in stopped)
            parts.append(f"{value} stopped early" + (f" ({whys})" if whys else ""))
        else:
            parts.append(f"{value} {name}")
    return f"{counts['total']} jobs: {', '.join(parts)}"


def _jobs(children: list, statuses: Mapping[int, Mapping[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Each job's end by job number ("run <id>" without one): its run's status and failure tag, else its status
    file's; a run left RUNNING gets the launcher's verdict from the status file, if any. A KILLED run the rule
    stopped (`stop_record`) is STOPPED_EARLY."""
    from lora_sweep.compare.variants import JOB_NUM_TAG
    from lora_sweep.tracking.stopped import stop_record
    from lora_sweep.tracking.store import FAILURE

    jobs: dict[Any, dict[str, Any]] = {}
    for child in sorted(children, key=lambda c: c.info.start_time or 0):  # a job's newest run counts
        num = _number(child.data.tags.get(JOB_NUM_TAG))
        stopped = stop_record(child.data.tags) if child.info.status == "KILLED" else None
        jobs[num if num is not None else f"run {child.info.run_id}"] = {
            "status": STOPPED_EARLY if stopped else child.info.status, "run_id": child.info.run_id,
            "label": child.info.run_name, "reason": child.data.tags.get(FAILURE, ""), "stopped": stopped}
    for num, written in statuses.items():
        state, reason = str(written.get("state") or "").upper(), str(written.get("reason") or "")
        if num in jobs:  # its run is its record
            if jobs[num]["status"] == "RUNNING" and state in ENDED:
                jobs[num].update(verdict=state, reason=reason)
            continue
        if state not in ENDED:  # no run, no end written: its process ended before it could say anything
            state, reason = "FAILED", reason or "its job process ended without a result"
        jobs[num] = {"status": state, "run_id": written.get("run_id"), "label": written.get("label"),
                     "reason": reason}
    return jobs


def _number(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _close_left_open(client, job: dict[str, Any], interrupted: bool) -> None:
    """Close a run its dead job left open: KILLED if the sweep was stopped or the launcher says so, else FAILED;
    reason: the launcher's, else LEFT_OPEN."""
    from lora_sweep.tracking import store

    status = "KILLED" if interrupted or job.get("verdict") in ("KILLED", "CANCELLED") else "FAILED"
    reason = job.get("reason") or LEFT_OPEN
    client.set_tag(job["run_id"], store.FAILURE, store.fit(reason, store.MAX_TAG_CHARS, "the log"))
    client.set_terminated(job["run_id"], status=status)
    job.update(status=status, reason=reason)


def _failure_text(jobs: dict[Any, dict[str, Any]], counts: dict[str, int], how: str) -> str:
    """Each distinct failure reason (first line) with the jobs it hit, after how the sweep ended (`how`: ended,
    stopped or broke off)."""
    groups: dict[str, list[str]] = {}
    for num, job in sorted(jobs.items(), key=lambda item: str(item[0])):
        if job["status"] == "FAILED":
            head = (job.get("reason") or "no reason recorded").strip().splitlines()[0]
            groups.setdefault(head, []).append(f"#{num} {job.get('label') or ''}".strip())
    lines = {"stopped": ["the sweep was stopped (Ctrl-C or a signal) before all its jobs ran."],
             "broke off": ["the sweep process ended before its launcher returned (see its console)."],
             "ended": []}[how]
    if groups:
        lines.append(f"{counts['failed']} of {counts['total']} jobs failed:")
        lines += [f"- {head} ({', '.join(names)})" for head, names in groups.items()]
    return "\n".join(lines)
