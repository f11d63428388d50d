"""Slots: where a job can run, and the environment that pins it there.

A GPU slot exports `CUDA_VISIBLE_DEVICES=<that GPU>` (the job's `cuda:0`); a CPU slot exports "", hiding every GPU.
GPUs are found without initialising CUDA: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class GpuQueueConfigError(ValueError):
    """A `hydra.launcher` value of the gpu_queue launcher is invalid; the message names the field."""


@dataclass(frozen=True)
class Slot:
    """One place to run one job at a time. `device` is the CUDA_VISIBLE_DEVICES token, None for a CPU slot."""

    index: int
    device: str | None

    @property
    def name(self) -> str:
        return f"gpu{self.device}" if self.device is not None else f"cpu{self.index}"

    def env(self) -> dict[str, str]:
        visible = self.device if self.device is not None else ""
        return {"CUDA_VISIBLE_DEVICES": visible, "GPU_QUEUE_SLOT": str(self.index)}


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """GPU tokens this process may use: CUDA_VISIBLE_DEVICES if set, else every GPU `nvidia-smi -L` lists.

    CUDA ignores everything from the first negative index on ("0,-1,2" means just GPU 0); so does this.
    """
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        tokens: list[str] = []
        for token in (t.strip() for t in cvd.split(",")):
            if not token or (token.lstrip("-").isdigit() and int(token) < 0):
                break
            tokens.append(token)
        return tokens
    return [str(i) for i in range(_count_nvidia_gpus())]


def _count_nvidia_gpus() -> int:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    proc_dir = "/proc/driver/nvidia/gpus"
    return len(os.listdir(proc_dir)) if os.path.isdir(proc_dir) else 0


# what CUDA_VISIBLE_DEVICES takes for one device: an index, or a GPU/MIG UUID (or a unique prefix of one)
GPU_TOKEN = re.compile(r"\d+|(GPU|MIG)-[0-9A-Za-z/-]+")


def _gpu_tokens(gpus: Any) -> list[str]:
    if isinstance(gpus, str):
        if gpus.strip().lower() == "auto":
            return visible_gpus()
        return _checked_tokens(gpus, [t.strip() for t in gpus.split(",") if t.strip()])
    if isinstance(gpus, Sequence):
        tokens = [str(g).strip() for g in gpus]
        if any(not t for t in tokens):
            raise GpuQueueConfigError(
                f"hydra.launcher.gpus={list(gpus)!r} has an empty entry; list GPU indices or UUIDs.")
        return _checked_tokens(list(gpus), tokens)
    raise GpuQueueConfigError(
        f"hydra.launcher.gpus={gpus!r} is not understood: use `auto` (every GPU this process can see), a list of GPU "
        "indices or UUIDs such as [0, 1], or [] for CPU slots only. A bare number is ambiguous (count or index?)."
    )


def _checked_tokens(gpus: Any, tokens: list[str]) -> list[str]:
    """`tokens` if each is a GPU index or UUID, else GpuQueueConfigError (`abc` would fail every job later)."""
    bad = [t for t in tokens if not GPU_TOKEN.fullmatch(t)]
    if bad:
        raise GpuQueueConfigError(
            f"hydra.launcher.gpus={gpus!r}: {', '.join(repr(t) for t in bad)} is neither a GPU index (0, 1, ...) nor a "
            "GPU UUID (GPU-..., MIG-..., as `nvidia-smi -L` lists them). Use `auto` (every GPU this process can see), "
            "a list such as [0, 1], or [] for CPU slots only.")
    return tokens


def check_choices(start_method: Any, console: Any, progress_every_s: Any) -> None:
    """Raise GpuQueueConfigError for the first of these launcher settings that has no meaning."""
    for name, value, accepted in (("start_method", start_method, ("forkserver", "spawn")),
                                  ("console", console, ("auto", "live", "plain"))):
        if value not in accepted:
            raise GpuQueueConfigError(
                f"hydra.launcher.{name}={value!r}: accepted values are {', '.join(accepted)}.")
    try:
        seconds = float(progress_every_s)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds >= 0:
        raise GpuQueueConfigError(f"hydra.launcher.progress_every_s={progress_every_s!r}: accepted values are "
                                  "seconds >= 0 (0: no progress lines without a terminal).")


def launcher_problems(settings: Mapping[str, Any]) -> list[str]:
    """Every problem of the gpu_queue launcher's settings (`hydra.launcher.*`), one paragraph each (pre-flight)."""
    problems = []
    try:
        check_choices(settings.get("start_method", "forkserver"), settings.get("console", "auto"),
                      settings.get("progress_every_s", 60.0))
    except GpuQueueConfigError as error:
        problems.append(str(error))
    for field in ("jobs_per_gpu", "cpu_slots"):
        try:
            plan_slots([], **{"jobs_per_gpu": 1, "cpu_slots": 1, field: settings.get(field, 1)})
        except GpuQueueConfigError as error:
            problems.append(str(error))
    try:
        plan_slots(settings.get("gpus", "auto"), 1, 1)
    except GpuQueueConfigError as error:
        problems.append(str(error))
    return problems


def plan_slots(gpus: Any, jobs_per_gpu: int, cpu_slots: int) -> list[Slot]:
    """The slots of a sweep, spread over GPUs first (gpu0, gpu1, gpu0, gpu1); `cpu_slots` CPU slots without GPUs."""
    for field, value in (("jobs_per_gpu", jobs_per_gpu), ("cpu_slots", cpu_slots)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GpuQueueConfigError(f"hydra.launcher.{field}={value!r}: must be a whole number >= 1.")
    tokens = _gpu_tokens(gpus)
    if len(set(tokens)) != len(tokens):
        raise GpuQueueConfigError(f"hydra.launcher.gpus lists a GPU twice ({tokens}); use jobs_per_gpu to share one.")
    if not tokens:
        return [Slot(index=i, device=None) for i in range(cpu_slots)]
    return [Slot(index=k * len(tokens) + i, device=t) for k in range(jobs_per_gpu) for i, t in enumerate(tokens)]
