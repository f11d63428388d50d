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
    # `auto`: every GPU this process sees; or a list of GPU indices or UUIDs; []: CPU slots only
    gpus: Any = "auto"
    jobs_per_gpu: int = 1  # jobs sharing one GPU at a time
    cpu_slots: int = 1  # concurrent jobs when there is no GPU
    preload: list[str] = field(default_factory=list)  # `module` or `module:attribute`, imported by the fork server
    start_method: str = "forkserver"  # or spawn: a fresh interpreter per job
    console: str = "auto"  # live slot lines on a terminal, else plain; or live | plain
    kill_grace_s: float = 5.0  # after a second Ctrl-C, seconds before SIGKILL
    refresh_s: float = 0.5  # between redraws of the live lines
    progress_every_s: float = 60.0  # plain console: between progress lines (0: start and end lines only)
    log_tail_lines: int = 20  # of a failed job's log, under the summary
    # `module:function` run on each job's config in the sweep process before any job starts: an outcome it returns
    # (e.g. SKIPPED) ends that job without a process; None queues it. The fork server starts at the first queued job
    precheck: Any = None


ConfigStore.instance().store(
    group="hydra/launcher", name="gpu_queue", node=GpuQueueLauncherConf, provider="gpu_queue_launcher"
)
