"""A fault for cross-process tests: a Hydra callback whose `on_job_start` runs in the job's own process (under the
gpu_queue, Slurm, Ray and basic launchers, and in a single run, as job 0) and patches lora-sweep there, for the job
numbers it is given.

    PYTHONPATH=tests/apps/faults python sweep.py -m train.seed=1,2,3 \\
        +hydra.callbacks.fault._target_=fault_hook.FaultHook '+hydra.callbacks.fault.jobs={1: setup_error}'

(`fault_overrides` writes those two arguments, `FOLDER` is what PYTHONPATH needs.) Faults:
- `nan_loss@N`: `lora_sweep.training.train.micro_batch_loss` returns a NaN loss from the N-th micro-batch of the
  process on (optimizer step N with train.grad_accum=1 and no resume);
- `setup_error` / `setup_crash`: `lora_sweep.job.run.plan_resume` raises a UserError / a RuntimeError: the job's
  set-up fails after its checks, before its MLflow run exists;
- `remove:<path>`: the file is deleted as the job starts (after the sweep's pre-flight);
- `fill@N:<folder>`: from the N-th micro-batch on, another writer fills the disk of `<folder>` (a file there grows
  until the disk is full).
`on_job_end` undoes the patch (the basic launcher runs every job in one process).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

FOLDER = Path(__file__).resolve().parent
SETUP_MESSAGE = "this job's set-up failed on purpose (a test's fault hook)"


def fault_overrides(jobs: Mapping[int, str], name: str = "fault") -> list[str]:
    """The command-line arguments that give job number -> fault to a sweep."""
    listed = ", ".join(f"{num}: '{fault}'" for num, fault in jobs.items())
    return [f"+hydra.callbacks.{name}._target_=fault_hook.FaultHook", f"+hydra.callbacks.{name}.jobs={{{listed}}}"]


class FaultHook(Callback):
    def __init__(self, jobs: Mapping[Any, str] | None = None) -> None:
        self.jobs = {int(num): str(fault) for num, fault in (jobs or {}).items()}
        self._undo: list[Callable[[], None]] = []

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        single_run = OmegaConf.is_missing(config.hydra.job, "num")  # a single run is job 0
        fault = self.jobs.get(0 if single_run else int(config.hydra.job.num))
        if fault is not None:
            self._undo.append(inject(fault))

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        while self._undo:
            self._undo.pop()()


def inject(fault: str) -> Callable[[], None]:
    """Patch this process for `fault`; returns what undoes it."""
    if fault.startswith("remove:"):
        Path(fault.partition(":")[2]).unlink()
        return lambda: None
    if fault.startswith("fill@"):
        import lora_sweep.training.train as module

        at, _, folder = fault.removeprefix("fill@").partition(":")
        name, wrapper = "micro_batch_loss", _filling_from(module.micro_batch_loss, int(at), Path(folder))
    elif fault.startswith("nan_loss@"):
        import lora_sweep.training.train as module

        name, wrapper = "micro_batch_loss", _nan_from(module.micro_batch_loss, int(fault.partition("@")[2]))
    elif fault in ("setup_error", "setup_crash"):
        import lora_sweep.job.run as module

        name, wrapper = "plan_resume", _failing(module.plan_resume, fault)
    else:
        raise ValueError(f"unknown fault {fault!r}: nan_loss@N, fill@N:<folder>, setup_error, setup_crash or "
                         "remove:<path>")
    real = getattr(module, name)
    setattr(module, name, wrapper)
    return lambda: setattr(module, name, real)


def _nan_from(real: Callable[..., Any], first: int) -> Callable[..., Any]:
    calls = itertools.count(1)

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if next(calls) < first:
            return result
        if dataclasses.is_dataclass(result):  # the loss terms: their `loss` turns NaN
            return dataclasses.replace(result, loss=result.loss * float("nan"))
        return result * float("nan")

    return wrapper


def _filling_from(real: Callable[..., Any], first: int, folder: Path) -> Callable[..., Any]:
    calls = itertools.count(1)

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == first:
            try:
                with open(folder / "filler", "ab") as f:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
            except OSError:  # the disk is full
                pass
        return real(*args, **kwargs)

    return wrapper


def _failing(real: Callable[..., Any], fault: str) -> Callable[..., Any]:
    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if fault == "setup_error":
            from lora_sweep.errors import UserError

            raise UserError(f"{SETUP_MESSAGE}.")
        raise RuntimeError(f"{SETUP_MESSAGE}: a simulated bug")

    return wrapper
