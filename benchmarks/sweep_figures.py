"""Sweep figures of `make bench`: 3 queue overhead and 5 sweep makespan, through real `python sweep.py -m` runs.

Each sweep runs N copies of the tiny job (train.seed=range(N), a few steps) on K fake CPU slots of the gpu_queue
launcher (`hydra.launcher.gpus=[] cpu_slots=K`), in a temporary working directory with its own MLflow sqlite store
and lora-sweep cache. Per job the times come from two independent clocks on the same machine:
- the launcher's `gpu_queue_summary.json`: slot_free_at, started_at (process forked / spawned), ended_at;
- the job's MLflow run: start_time (run created), and the timestamps of `cache/hits` at step 0 (data ready) and
  `train/loss` at steps 1 and last (MLflow metric timestamps are milliseconds).
The analysis functions below are pure, so the smoke test checks them on hand-made records.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, median

# Added to the default preload in the "extended" measurement of figure 3: MLflow's SQLAlchemy store (sqlalchemy,
# alembic), which every job otherwise imports when it opens the sqlite store (1.2-1.8 s measured).
EXTRA_PRELOAD = ("mlflow.store.tracking.sqlalchemy_store",)


def default_preload() -> list[str]:
    """The fork server's preload list as conf/ sets it (`hydra.launcher.preload`): what `make demo` gets."""
    from hydra import compose, initialize_config_dir

    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", return_hydra_config=True)
    return [str(p) for p in cfg.hydra.launcher.get("preload", [])]


def hydra_list(entries) -> str:
    """A Hydra override list of quoted strings (entries such as `diffusers:X` hold a colon)."""
    return "[" + ",".join(f"'{e}'" for e in entries) + "]"


def sweep_command(sweep_dir: Path, *, jobs: int, slots: int, start_method: str, max_steps: int,
                  experiment: str, preload=None) -> list[str]:
    """`python sweep.py -m` for `jobs` tiny jobs on `slots` CPU slots; `preload` None keeps conf/'s list."""
    extra = [] if preload is None else [f"hydra.launcher.preload={hydra_list(preload)}"]
    return [sys.executable, str(ROOT / "sweep.py"), "-m", f"train.seed=range({jobs})",
            f"train.max_steps={max_steps}", "sweep.skip_finished=false", f"tracking.experiment={experiment}",
            "hydra/launcher=gpu_queue", "hydra.launcher.gpus=[]", f"hydra.launcher.cpu_slots={slots}",
            f"hydra.launcher.start_method={start_method}", *extra, "hydra.launcher.console=plain",
            f"hydra.sweep.dir={sweep_dir}"]


def sweep_env(workdir: Path, cache_dir: Path, threads: int) -> dict[str, str]:
    """A private MLflow store and cache; `threads` torch/OpenMP threads per job (one core per fake slot)."""
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
            "LORA_SWEEP_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_sweep(workdir: Path, name: str, *, jobs: int, slots: int, start_method: str, max_steps: int,
              cache_dir: Path, threads: int = 1, preload=None, timeout_s: float = 900) -> dict:
    """Run one sweep and return {"wall_s", "jobs": [job records]} (see `job_records`)."""
    sweep_dir = workdir / name
    cmd = sweep_command(sweep_dir, jobs=jobs, slots=slots, start_method=start_method, max_steps=max_steps,
                        experiment=f"bench-{name}", preload=preload)
    started = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=sweep_env(workdir, cache_dir, threads), capture_output=True,
                          text=True, timeout=timeout_s)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    summary = json.loads((sweep_dir / "gpu_queue_summary.json").read_text())
    return {"name": name, "jobs_n": jobs, "slots": slots, "start_method": start_method, "wall_s": wall,
            "preload_s": (summary.get("preload") or {}).get("seconds"),
            "jobs": job_records(summary, f"sqlite:///{(workdir / 'mlflow.db').resolve()}")}


def _timestamps(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.timestamp / 1000 for m in client.get_metric_history(run_id, key)}


def job_records(summary: dict, tracking_uri: str) -> list[dict]:
    """One record per job: the launcher's times plus the MLflow run's (epoch seconds) and its cache misses."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    records = []
    for job in summary["jobs"]:
        rec = {k: job.get(k) for k in ("idx", "state", "slot", "slot_free_at", "started_at", "ended_at", "run_id")}
        if job.get("run_id"):
            run = client.get_run(job["run_id"])
            losses = _timestamps(client, job["run_id"], "train/loss")
            misses = client.get_metric_history(job["run_id"], "cache/misses")
            rec.update(run_start=run.info.start_time / 1000,
                       data_ready=_timestamps(client, job["run_id"], "cache/hits").get(0),
                       first_step=losses.get(1), last_step=losses.get(max(losses)) if losses else None,
                       cache_misses=int(misses[0].value) if misses else None)
        records.append(rec)
    return records


def _diff(later: float | None, earlier: float | None) -> float | None:
    return later - earlier if later is not None and earlier is not None else None


def job_phases(rec: dict) -> dict:
    """Seconds of each phase of one job, from its slot becoming free to the slot being free again."""
    return {
        "launch": _diff(rec.get("started_at"), rec.get("slot_free_at")),  # queue + fork/spawn
        "to_run": _diff(rec.get("run_start"), rec.get("started_at")),  # Hydra job set-up, imports, MLflow run
        "to_data": _diff(rec.get("data_ready"), rec.get("run_start")),  # model load + cached latents/text
        "to_first_step": _diff(rec.get("first_step"), rec.get("data_ready")),  # LoRA, optimizer, first step
        "slot_to_first_step": _diff(rec.get("first_step"), rec.get("slot_free_at")),
        "training": _diff(rec.get("last_step"), rec.get("first_step")),
        "tail": _diff(rec.get("ended_at"), rec.get("last_step")),  # save LoRA, artifacts, end run, exit
        "occupancy": _diff(rec.get("ended_at"), rec.get("slot_free_at")),
    }


def median_phases(records: list[dict]) -> dict:
    phases = [job_phases(r) for r in records]
    return {key: median(p[key] for p in phases) for key in phases[0]} if phases else {}


def makespan(records: list[dict]) -> float:
    """First slot free to last job ended (the sweep process's own start-up and the fork server's preload are
    before the first slot_free_at: reported apart)."""
    return max(r["ended_at"] for r in records) - min(r["slot_free_at"] for r in records)


def slot_idle_gaps(records: list[dict]) -> list[float]:
    """For consecutive jobs on one slot: seconds from the earlier job's process exit to the next one's start."""
    gaps = []
    for slot in {r["slot"] for r in records}:
        on_slot = sorted((r for r in records if r["slot"] == slot), key=lambda r: r["started_at"])
        gaps += [b["started_at"] - a["ended_at"] for a, b in itertools.pairwise(on_slot)]
    return gaps


def ideal_makespan(jobs: int, slots: int, job_s: float) -> float:
    """ceil(jobs / slots) waves of one job each."""
    return math.ceil(jobs / slots) * job_s


def makespan_figure(sweeps: list[dict], job_s: float) -> list[dict]:
    """Figure 5 rows: makespan vs ceil(N/K) x `job_s` (the median slot occupancy of the K=1 sweep), and vs the same
    formula with the sweep's own median occupancy (which separates the queue from CPU contention between jobs)."""
    rows = []
    for sweep in sweeps:
        jobs = [r for r in sweep["jobs"] if r.get("ended_at") and r.get("slot_free_at")]
        span = makespan(jobs)
        own_s = median(job_phases(r)["occupancy"] for r in jobs)
        gaps = slot_idle_gaps(jobs)
        rows.append({"slots": sweep["slots"], "jobs": len(jobs), "makespan_s": span,
                     "ideal_s": ideal_makespan(len(jobs), sweep["slots"], job_s),
                     "ratio": span / ideal_makespan(len(jobs), sweep["slots"], job_s),
                     "job_s": own_s, "ratio_own": span / ideal_makespan(len(jobs), sweep["slots"], own_s),
                     "idle_gap_median_s": median(gaps), "idle_gap_max_s": max(gaps) if gaps else None,
                     "failed": sum(r["state"] != "FINISHED" for r in sweep["jobs"]), "preload_s": sweep["preload_s"],
                     "wall_s": sweep["wall_s"]})
    return rows
