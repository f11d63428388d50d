"""The launcher's config, registered as `hydra/launcher=gpu_queue` (imported by Hydra's plugin scan).

No `from __future__ import annotations` here: Hydra's scan executes this module without registering it in
sys.modules, and dataclasses then cannot resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class GpuQueueLauncherConf:
    _target_: str = "hydra_plugins.gpu_queue_launcher.launcher.GpuQueueLauncher"
    # `auto` = every GPU this process can see (CUDA_VISIBLE_DEVICES, else nvidia-smi); or a list of GPU indices or
    # UUIDs; [] = CPU slots only.
    gpus: Any = "auto"
    # Jobs that share one GPU at a time (each still gets only its own GPU in CUDA_VISIBLE_DEVICES).
    jobs_per_gpu: int = 1
    # Concurrent jobs when there is no GPU at all.
    cpu_slots: int = 1
    # Modules imported once in the fork server, before any job is forked: `module` or `module:attribute`.
    preload: list[str] = field(default_factory=list)
    # forkserver: fork each job from a process that has `preload` imported (fast start, full isolation).
    # spawn: a fresh interpreter per job (pays the imports every time; for when forking is not wanted).
    start_method: str = "forkserver"
    # auto: live slot lines on a terminal, one line per job start/end otherwise; live; plain.
    console: str = "auto"
    # After a second Ctrl-C, seconds a job has to exit before it gets SIGKILL (a third Ctrl-C kills at once).
    kill_grace_s: float = 5.0
    # Seconds between redraws of the live slot lines.
    refresh_s: float = 0.5
    # Without a terminal (console plain: a log file, nohup, CI): seconds between lines giving each running job's
    # step, loss and speed; 0 = only the start and end lines.
    progress_every_s: float = 60.0
    # Lines of a failed job's log shown under the summary table.
    log_tail_lines: int = 20


ConfigStore.instance().store(
    group="hydra/launcher", name="gpu_queue", node=GpuQueueLauncherConf, provider="gpu_queue_launcher"
)
