"""One `python sweep.py ...` job with its set-up and steps timed from the inside: the probe of `make bench-sdxl`.

    python benchmarks/sdxl_job.py --record OUT.json [--root REPO] -- model=sdxl model.path=... precision=bf16 ...

Runs REPO's sweep.py (default: this repository) in this process, exactly as a user's command would, with three
timers wrapped around lora-sweep's own functions, looked up by name so the same probe also measures an older
checkout (`--root`, for before/after figures):
- `lora_sweep.model.loading.load_sdxl`: model load seconds and the memory high-water mark after it (with
  `--stop-after-load` the job ends there: a load-time probe);
- `lora_sweep.training.train.build_session`: set-up seconds (load, data and cache, LoRA, casts) and the mark after;
- the training sink's `progress` callback: the time of every optimizer step.
Memory is the process's peak resident set size (VmHWM; the kernel's own high-water mark, so no sampling misses a
peak). Writes one JSON record; the job's exit status becomes this script's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import runpy
import sys
import time
from pathlib import Path

GIB = 2**30


def memory_status() -> dict[str, float]:
    """Current and peak resident set size of this process, in GiB (from /proc/self/status)."""
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / GIB
    except OSError:
        values["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return values


class Probe:
    """Timers and memory marks, filled while the job runs."""

    def __init__(self, stop_after_load: bool = False) -> None:
        self.record: dict = {"load_s": [], "setup_s": None, "step_times": [], "marks": {}, "output_dir": None}
        self.started = time.perf_counter()
        self.stop_after_load = stop_after_load

    def mark(self, name: str) -> None:
        self.record["marks"][name] = {"t": time.perf_counter() - self.started, **memory_status()}

    def install(self) -> None:
        from lora_sweep.model import loading
        from lora_sweep.training import train as train_module

        load_sdxl, build_session, train = loading.load_sdxl, train_module.build_session, train_module.train

        def timed_load(*args, **kwargs):
            t = time.perf_counter()
            parts = load_sdxl(*args, **kwargs)
            self.record["load_s"].append(time.perf_counter() - t)
            self.mark("after_load")
            if self.stop_after_load:  # a load-time probe: end the job here (SystemExit passes lora-sweep's handlers)
                raise SystemExit(0)
            return parts

        def timed_setup(*args, **kwargs):
            t = time.perf_counter()
            session = build_session(*args, **kwargs)
            self.record["setup_s"] = time.perf_counter() - t
            self.mark("after_setup")
            return session

        probe = self

        class TimedSink:
            def __init__(self, sink) -> None:
                self._sink = sink

            def __getattr__(self, name):
                return getattr(self._sink, name)

            def progress(self, step, max_steps, loss, speed):
                probe.record["step_times"].append((int(step), time.perf_counter()))
                return self._sink.progress(step, max_steps, loss, speed)

        def timed_train(cfg, *, output_dir, sink, **kwargs):
            self.record["output_dir"] = str(output_dir)
            result = train(cfg, output_dir=output_dir, sink=TimedSink(sink), **kwargs)
            self.mark("after_train")
            self.record["final_loss"] = result.final_loss
            return result

        loading.load_sdxl = timed_load
        train_module.build_session = timed_setup
        train_module.train = timed_train

    def finish(self, exit_code: int) -> dict:
        r = self.record
        times = [t for step, t in r["step_times"] if step > 0]
        starts = [t for step, t in r["step_times"] if step == 0]
        if starts and times:
            edges = [starts[-1], *times]
            r["step_s"] = [b - a for a, b in itertools.pairwise(edges)]
        r["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        r["wall_s"] = time.perf_counter() - self.started
        r["exit_code"] = exit_code
        return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True, help="where to write the JSON record")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the repository whose sweep.py and lora_sweep to run")
    parser.add_argument("--stop-after-load", action="store_true", help="only time the model load, then exit")
    parser.add_argument("overrides", nargs="*", help="sweep.py's arguments (after --)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    sys.path.insert(0, str(root))
    os.chdir(root)
    probe = Probe(args.stop_after_load)
    probe.install()
    sys.argv = [str(root / "sweep.py"), *args.overrides]
    code = 0
    try:
        runpy.run_path(str(root / "sweep.py"), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    record = probe.finish(code)
    record.update(root=str(root), overrides=args.overrides)
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
