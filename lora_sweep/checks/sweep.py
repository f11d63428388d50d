"""The pre-flight's checks of a sweep as a whole, where every job alone may be right: no jobs, jobs sharing an
output folder, jobs logging to different experiments or stores, gpu_queue launcher settings it would refuse late,
GPU slots this machine's torch cannot use.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def sweep_problems(config: DictConfig, jobs: dict[str, DictConfig], count: int) -> list[str]:
    """Problems of the sweep `config` of `count` jobs; `jobs`: label -> config (paths absolute) of those composed."""
    problems = launcher_problems(config)
    problems += [] if problems else gpu_slot_problems(config, jobs)
    if count == 0:
        problems.append(no_jobs_problem(config))
    problems += shared_output_problems(jobs)
    return problems


def launcher_problems(config: DictConfig) -> list[str]:
    launcher = config.hydra.get("launcher") or {}
    if not str(launcher.get("_target_", "")).endswith("GpuQueueLauncher"):
        return []  # Ray and Slurm check their own settings when they start
    from hydra_plugins.gpu_queue_launcher._slots import launcher_problems as gpu_queue_problems

    settings = OmegaConf.to_container(launcher, resolve=True)
    return gpu_queue_problems(settings)


def gpu_slot_problems(config: DictConfig, jobs: dict[str, DictConfig]) -> list[str]:
    """The gpu_queue's GPU slots that torch here cannot use (no CUDA device, or an index past the last one) while a
    job would use CUDA (train.device auto or cuda): each such job would be refused as it starts. The launcher itself
    stays free of torch; this check runs in the sweep's pre-flight."""
    launcher = config.hydra.get("launcher") or {}
    if not str(launcher.get("_target_", "")).endswith("GpuQueueLauncher"):
        return []
    from hydra_plugins.gpu_queue_launcher._slots import plan_slots

    gpus = OmegaConf.to_container(launcher, resolve=True).get("gpus", "auto")
    devices = list(dict.fromkeys(s.device for s in plan_slots(gpus, 1, 1) if s.device is not None))
    if not devices or all(str(job.train.device) == "cpu" for job in jobs.values()):
        return []
    import torch

    count = torch.cuda.device_count()
    if count and os.environ.get("CUDA_VISIBLE_DEVICES") is None:  # the slots' indices are this machine's
        unusable = [d for d in devices if d.isdigit() and int(d) >= count]
    else:
        unusable = [] if count else devices
    if not unusable:
        return []
    sees = (f"no CUDA device (this torch {torch.__version__} is a CPU-only build)" if torch.version.cuda is None
            else f"{count} CUDA device(s)" + ("" if count else ": the driver finds none"))
    return [f"hydra.launcher.gpus={gpus}: the sweep's GPU slots {', '.join(f'gpu{d}' for d in unusable)} cannot be "
            f"used: torch on this machine sees {sees}, so every job started there with train.device=auto or cuda "
            "would be refused. Run on CPU slots with hydra.launcher.gpus=[] (hydra.launcher.cpu_slots=N), list the "
            "GPUs torch sees, or fix the GPU set-up (a CUDA build of torch, the NVIDIA driver)."]


def no_jobs_problem(config: DictConfig) -> str:
    swept = [o for o in config.hydra.overrides.task if any(mark in o for mark in (",", "glob(", "range(", "[]"))]
    named = f" ({' '.join(swept)})" if swept else ""
    return (f"the sweep has no jobs: its overrides{named} expand to nothing, as a glob that matches no option "
            "(experiment='glob(x*)') or an empty range does. Check the values against the options the config has "
            "(e.g. ls conf/experiment/), or run without -m for a single run.")


def shared_output_problems(jobs: dict[str, DictConfig]) -> list[str]:
    """One problem per train.output_dir that two or more jobs resolve to (they would overwrite each other)."""
    by_folder: dict[Path, list[str]] = defaultdict(list)
    for label, job in jobs.items():
        if job.train.output_dir:
            by_folder[Path(str(job.train.output_dir)).expanduser().resolve()].append(label)
    return [f"train.output_dir: jobs {_listed(labels)} all write to '{folder}', so each job's LoRA, config and "
            "samples overwrite the others'. Leave train.output_dir unset (each job then writes into its own job "
            "folder under the sweep folder), or make it differ per job (sweep it too, one folder per job)."
            for folder, labels in by_folder.items() if len(labels) > 1]


def _listed(labels: list[Any]) -> str:
    shown = ", ".join(str(label) for label in labels[:6])
    return shown + (f" and {len(labels) - 6} more" if len(labels) > 6 else "")


def tracking_target(cfg) -> tuple[str, str]:
    """(store URI, experiment name) a job logs to (`tracking.uri` resolved as the job resolves it)."""
    from lora_sweep.tracking.store import tracking_uri

    return tracking_uri(cfg.tracking.uri), str(cfg.tracking.experiment)


def mixed_tracking_problem(targets: dict[str, tuple[str, str]]) -> str:
    """The problem of jobs logging to different experiments or stores: MLflow nests runs in one experiment only."""
    by_target: dict[tuple[str, str], list[str]] = defaultdict(list)
    for label, target in targets.items():
        by_target[target].append(label.split(" ", 1)[0])
    listed = "; ".join(f"{', '.join(jobs)} -> experiment '{exp}' in {uri}" for (uri, exp), jobs in by_target.items())
    return ("tracking.experiment / tracking.uri: the sweep's jobs log to different places (" + listed + "). A sweep "
            "is one MLflow parent run with every job nested under it, in one experiment of one store: set "
            "tracking.experiment=NAME (and tracking.uri) on the command line, or the same value in every "
            "experiment file, or run one sweep per experiment.")
