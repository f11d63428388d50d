"""GpuQueueLauncher: Hydra's Launcher over the slot queue (the package docstring has the protocols).

launch() prepares every job, ends those `precheck` can (e.g. SKIPPED) without a process, starts the fork server
once, at the first job that needs one (kept for later batches), runs the queue, records the verdicts jobs could not,
prints the summary, writes gpu_queue_summary.json and returns one JobReturn per job.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins._job_outcome import STATUS_ENV, headline, record_verdict, status_path, to_job_return

from ._slots import check_choices, plan_slots

log = logging.getLogger(__name__)


def short_label(overrides: Sequence[str], value_chars: int = 32, total_chars: int = 100) -> str:
    """The overrides that tell a job from the batch's others, each value cut to `value_chars` and the whole to
    `total_chars` ("..." marks a cut)."""
    parts = []
    for override in overrides:
        key, sep, value = override.partition("=")
        parts.append(f"{key}{sep}{value[:value_chars - 3]}..." if len(value) > value_chars else override)
    label = " ".join(parts)
    return label if len(label) <= total_chars else label[:total_chars - 3] + "..."


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _json_number(value: Any) -> Any:
    """`value`, or None where JSON has no number for it (NaN, infinities)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class GpuQueueLauncher(Launcher):
    def __init__(self, gpus: Any = "auto", jobs_per_gpu: int = 1, cpu_slots: int = 1, preload: Sequence[str] = (),
                 start_method: str = "forkserver", console: str = "auto", kill_grace_s: float = 5.0,
                 refresh_s: float = 0.5, log_tail_lines: int = 20, progress_every_s: float = 60.0,
                 precheck: str | None = None) -> None:
        self.gpus, self.jobs_per_gpu, self.cpu_slots = _plain(gpus), jobs_per_gpu, cpu_slots
        self.preload: list[str] = [str(p) for p in (_plain(preload) or [])]
        check_choices(start_method, console, progress_every_s)
        self.start_method, self.console_mode = start_method, console
        self.kill_grace_s, self.refresh_s = float(kill_grace_s), float(refresh_s)
        self.log_tail_lines = int(log_tail_lines)
        self.progress_every_s = float(progress_every_s)
        self.precheck = str(precheck) if precheck else None
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self._pool: Any = None
        self._starting: Any = None  # a fork server started, not yet ready
        self._records: list = []
        self._warned_pickle = False

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ._console import Console, summary
        from ._outcome import JobRecord
        from ._queue import run_queue

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        slots = plan_slots(self.gpus, self.jobs_per_gpu, self.cpu_slots)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        work_dir = sweep_dir / ".gpu_queue"
        work_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep and self.config.hydra.sweep.mode is not None:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        common = set.intersection(*(set(o) for o in job_overrides)) if len(job_overrides) > 1 else set()
        records = [JobRecord(self._prepare(list(o), initial_job_idx + i, work_dir, common))
                   for i, o in enumerate(job_overrides)]
        log.info("gpu_queue: %d jobs on %d slots (%s); sweep dir %s", len(records), len(slots),
                 ", ".join(s.name for s in slots), sweep_dir)
        console = Console(sys.stdout, self.console_mode, slots, self.refresh_s, self.progress_every_s)
        queued = []
        for record in records:
            if not self._ended_before_start(record, console):
                queued.append(record)
                self._start_pool(work_dir)  # it preloads while the other jobs are prechecked
        pool, stopped_by = self._pool, None
        if queued:
            pool = self._ensure_pool(work_dir)
            stopped_by = run_queue(queued, slots, pool, console, start=lambda r: self._start(pool, r),
                                   kill_grace_s=self.kill_grace_s)
        console.close()
        for r in records:
            if r.job_return is None:  # died, killed or never started
                record_verdict(r.job.status_path, r.outcome())
        self._records += records
        interrupted = stopped_by is not None
        self._write_summary(sweep_dir / "gpu_queue_summary.json", pool, interrupted)
        sys.stdout.write(summary(records, self.log_tail_lines))
        sys.stdout.flush()
        if interrupted:
            self._close_pool()
            raise SystemExit(128 + stopped_by)  # as a shell reports the signal; the table above says what happened
        unfinished = sum(r.state not in ("FINISHED", "SKIPPED") and not r.stopped_early for r in records)
        note = f" ({unfinished} of {len(records)} jobs did not finish: see the summary above)" if unfinished else ""
        return [to_job_return(r.outcome(), r.job_return, overrides=r.job.overrides, working_dir=str(r.job.job_dir),
                              message=f"job #{r.job.idx} ({r.label}) {r.state}: {headline(r.reason)}{note}")
                for r in records]

    def _prepare(self, overrides: list[str], idx: int, work_dir: Path, common: set) -> Any:
        """Compose the job's config and find its directory, exactly as run_job will in the job process."""
        import cloudpickle

        from ._outcome import Job

        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        hydra_config = HydraConfig.instance()
        saved = hydra_config.cfg
        hydra_config.set_config(sweep_config)  # the ${hydra:...} resolver reads the job's own values
        try:
            job_dir = Path(str(OmegaConf.select(sweep_config, "hydra.sweep.dir")),
                           str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))).absolute()
        finally:
            hydra_config.cfg = saved  # type: ignore[assignment]
        job = {"hydra_context": self.hydra_context, "task_function": self.task_function,
               "sweep_config": sweep_config, "singleton_state": Singleton.get_state(),
               "task_filename": getattr(getattr(self.task_function, "__code__", None), "co_filename", None)}
        try:
            payload = cloudpickle.dumps(job)
        except Exception as exc:  # typically a Callback holding a client or a lock
            if not self._warned_pickle:
                log.warning("gpu_queue: the Hydra context cannot be pickled (%s: %s); each job gets fresh Callback "
                            "instances built from hydra.callbacks instead", type(exc).__name__, exc)
                self._warned_pickle = True
            job.update(hydra_context=None, config_loader=self.hydra_context.config_loader)
            payload = cloudpickle.dumps(job)
        label = short_label([o for o in filter_overrides(overrides) if o not in common]) or f"job {idx}"
        return Job(idx=idx, overrides=overrides, label=label, job_dir=job_dir, spec_path=work_dir / f"{idx}.spec",
                   result_path=work_dir / f"{idx}.result", status_path=status_path(work_dir.parent, idx),
                   payload=payload, sweep_config=sweep_config)

    def _ended_before_start(self, record: Any, console: Any) -> bool:
        """Run `precheck` (`module:function`, given the job's task config) in this process: an outcome it returns
        (e.g. SKIPPED, its status file written) ends the job without a process; None, or an error, leaves it queued."""
        if self.precheck is None:
            return False
        import importlib

        from ._outcome import verdict_before_start

        module, _, name = self.precheck.partition(":")
        job = record.job
        task_config = OmegaConf.masked_copy(job.sweep_config, [k for k in job.sweep_config if k != "hydra"])
        hydra_config = HydraConfig.instance()
        saved = hydra_config.cfg
        hydra_config.set_config(job.sweep_config)  # the precheck reads the job's own hydra values, as in the job
        try:
            outcome = getattr(importlib.import_module(module), name)(task_config)
        except Exception as exc:  # the job runs and reports whatever this was
            log.warning("gpu_queue: precheck %s of job #%d failed (%s: %s); the job decides", self.precheck, job.idx,
                        type(exc).__name__, exc)
            outcome = None
        finally:
            hydra_config.cfg = saved  # type: ignore[assignment]
        if outcome is None:
            return False
        verdict_before_start(record, outcome)
        console.event(record)
        return True

    def _start(self, pool: Any, record: Any) -> None:
        """Write the job's spec (environment pinned to its slot) and hand it to the pool."""
        from ._child import write_spec

        job = record.job
        job.job_dir.mkdir(parents=True, exist_ok=True)
        job.status_path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (job.status_path, job.result_path):
            stale.unlink(missing_ok=True)
        env = {**os.environ, **record.slot.env(), STATUS_ENV: str(job.status_path)}
        with open(job.log_path, "a") as f:
            f.write(f"=== gpu_queue: job #{job.idx} on {record.slot.name}, {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        write_spec(str(job.spec_path), {"env": env, "log_path": str(job.log_path), "argv": list(sys.argv),
                                        "cwd": os.getcwd(), "result_path": str(job.result_path),
                                        "preload": self.preload}, job.payload)
        pool.submit(job.idx, str(job.spec_path), str(job.log_path), env)

    def _start_pool(self, work_dir: Path) -> None:
        """Start the fork server without waiting for it (once; `_ensure_pool` waits)."""
        from ._pools import ForkServerPool

        if self.start_method != "forkserver" or self._starting is not None:
            return
        if self._pool is not None and self._pool.alive():
            return
        log.info("gpu_queue: starting the fork server (preload: %s)", ", ".join(self.preload) or "nothing")
        self._starting = ForkServerPool(self.preload, work_dir / "forkserver.log", wait=False)
        atexit.register(self._close_pool)

    def _ensure_pool(self, work_dir: Path) -> Any:
        from ._pools import SpawnPool

        if self._pool is not None and self._pool.alive():
            return self._pool
        self._start_pool(work_dir)
        pool, self._starting = self._starting, None
        if pool is not None:
            report = pool.wait_ready()
            for entry, error in report["failed"].items():
                log.warning("gpu_queue: preload of %r failed and was skipped: %s", entry, error)
            if report["threads"]:
                log.warning("gpu_queue: preloading left threads running (%s); forked jobs get none of them, and a "
                            "lock one of them held stays locked in the job", ", ".join(report["threads"]))
            if report.get("cuda_initialized_by"):
                log.error("gpu_queue: preloading %r initialised CUDA, which a forked job cannot use; running each "
                          "job in a fresh interpreter instead (start_method=spawn)", report["cuda_initialized_by"])
                pool.close()
                pool = None
            else:
                log.info("gpu_queue: fork server ready in %.1fs", report["seconds"])
        self._pool = pool or SpawnPool()
        atexit.register(self._close_pool)
        return self._pool

    def _close_pool(self) -> None:
        for pool in (self._starting, self._pool):
            if pool is not None:
                pool.close()
        self._starting = self._pool = None

    def _write_summary(self, path: Path, pool: Any, interrupted: bool) -> None:
        """gpu_queue_summary.json: every job's record, as strict JSON (a NaN loss is written null)."""
        jobs = [{
            "idx": r.job.idx, "label": r.label, "overrides": r.job.overrides, "state": r.state, "reason": r.reason,
            "user_error": r.user_error,
            "slot": r.slot.index if r.slot else None, "device": r.slot.device if r.slot else None,
            "pid": r.pid, "returncode": r.returncode, "duration_s": r.duration,
            "final_loss": _json_number(r.final_loss), "run_id": r.run_id or r.status.get("run_id"),
            "stopped_early": r.stopped_early,
            "job_dir": str(r.job.job_dir), "log": str(r.job.log_path), "slot_free_at": r.slot_free_at,
            "dispatched_at": r.dispatched_at, "started_at": r.started_at, "ended_at": r.ended_at,
        } for r in self._records]
        # no pool: every job ended before one was needed (`precheck`), so nothing was preloaded
        data = {"start_method": pool.start_method if pool else self.start_method,
                "preload": pool.report if pool else None, "interrupted": interrupted, "jobs": jobs}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
