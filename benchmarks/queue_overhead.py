"""Per-job overhead of the gpu_queue launcher: fork server vs a fresh interpreter per job.

    python benchmarks/queue_overhead.py [--jobs 5] [--preload torch,diffusers] [--methods forkserver,spawn]

Runs a sweep of tiny jobs on one CPU slot for each start method and reports, per job (the first one left out):
  start  = slot free -> task function entered (the launcher's slot_free_at vs the time the job records on entry)
  end    = task function returned -> the launcher sees the process exit and frees the slot
Both use wall-clock epoch times taken on the same machine. For reference it also times a bare
`python -c 'import <preload>'`, which is what a fresh process pays before it can train. Each job also runs a small
torch matmul when torch is preloaded, to show that forked jobs use the preloaded torch (and its thread pool) fine.
Invoked as `queue_overhead.py job -m ...` it is the Hydra app the sweeps run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchJob:
    out: str = "???"
    idx: int = 0


def job_main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="bench", node=BenchJob)

    @hydra.main(version_base="1.3", config_path=None, config_name="bench")
    def job(cfg: BenchJob) -> None:
        entered = time.time()
        op_s = None
        if "torch" in sys.modules:
            import torch

            t = time.perf_counter()
            (torch.randn(512, 512) @ torch.randn(512, 512)).sum().item()
            op_s = time.perf_counter() - t
        record = {"idx": cfg.idx, "entered": entered, "op_s": op_s, "returned": time.time()}
        Path(cfg.out, f"{cfg.idx}.json").write_text(json.dumps(record))

    job()


def run_sweep(method: str, jobs: int, preload: list[str], out: Path) -> dict:
    out.mkdir(parents=True)
    cmd = [sys.executable, __file__, "job", "-m", f"idx=range({jobs})", f"out={out}", "hydra/launcher=gpu_queue",
           f"hydra.launcher.start_method={method}", f"hydra.launcher.preload=[{','.join(preload)}]",
           "hydra.launcher.gpus=[]", "hydra.launcher.cpu_slots=1", "hydra.launcher.console=plain",
           f"hydra.sweep.dir={out / 'multirun'}", "hydra.job.chdir=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    started = time.time()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.time() - started
    summary = json.loads((out / "multirun" / "gpu_queue_summary.json").read_text())
    rows = []
    for job in sorted(summary["jobs"], key=lambda j: j["idx"]):
        rec = json.loads((out / f"{job['idx']}.json").read_text())
        rows.append({"start": rec["entered"] - job["slot_free_at"], "end": job["ended_at"] - rec["returned"],
                     "op_s": rec["op_s"]})
    later = rows[1:] or rows
    return {"method": method, "wall_s": wall, "server_ready_s": summary["preload"].get("seconds"),
            "preload_failed": summary["preload"].get("failed"), "first_start_s": rows[0]["start"],
            "start_s": statistics.median(r["start"] for r in later),
            "end_s": statistics.median(r["end"] for r in later),
            "op_s": statistics.median(r["op_s"] for r in later) if later[0]["op_s"] is not None else None}


def fresh_import_code(preload: list[str]) -> str:
    modules = [p.split(":")[0] for p in preload]
    attrs = [f"getattr({p.split(':')[0]}, {p.split(':')[1]!r})" for p in preload if ":" in p]
    return f"import {', '.join(modules)}" + "".join(f"; {a}" for a in attrs) if modules else "pass"


def fresh_import_seconds(code: str) -> float:
    started = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--preload", default="torch,diffusers")
    parser.add_argument("--methods", default="forkserver,spawn")
    args = parser.parse_args()
    preload = [p for p in args.preload.split(",") if p]
    code = fresh_import_code(preload)
    print(f"fresh `python -c \"{code}\"`: {fresh_import_seconds(code):.2f} s")
    header = ("method", "wall", "server", "1st start", "start", "end", "total", "matmul")
    print(f"{header[0]:<11} " + " ".join(f"{h:>{9 if h == '1st start' else 7}}" for h in header[1:]))
    with tempfile.TemporaryDirectory(prefix="queue-overhead-") as tmp:
        for method in args.methods.split(","):
            r = run_sweep(method, args.jobs, preload, Path(tmp, method))
            server = f"{r['server_ready_s']:.2f}" if method == "forkserver" else "-"
            op = f"{r['op_s'] * 1000:.0f}ms" if r["op_s"] is not None else "-"
            print(f"{method:<11} {r['wall_s']:>6.2f}s {server:>7} {r['first_start_s']:>8.3f}s {r['start_s']:>6.3f}s "
                  f"{r['end_s']:>6.3f}s {r['start_s'] + r['end_s']:>6.3f}s {op:>7}")
            if r["preload_failed"]:
                print(f"  preload failures: {r['preload_failed']}")
    print("start/end/total: median per-job overhead over jobs 2..N (seconds); server: fork server preload time")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "job":
        sys.argv.pop(1)
        job_main()
    else:
        main()
