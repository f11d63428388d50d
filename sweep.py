"""lora-sweep's entry point: `python sweep.py [group=option ...] [key=value ...]`, `-m` for a sweep.

Hydra composes conf/ into one config per job; this file hands it to `lora_sweep.run.run_job` and turns a user error
into one readable paragraph and a non-zero exit status instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lora_sweep.config import register_configs  # noqa: E402
from lora_sweep.errors import UserError  # noqa: E402

register_configs()
log = logging.getLogger("lora_sweep")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from lora_sweep.run import run_job

    hc = HydraConfig.get()
    output_dir = Path(cfg.train.output_dir or hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir) if hc.mode.name == "MULTIRUN" else None
    try:
        outcome = run_job(cfg, output_dir=output_dir, sweep_dir=sweep_dir, overrides=list(hc.overrides.task))
    except UserError as exc:
        log.error("%s", exc)
        sys.exit(2)
    if outcome.status in ("FAILED", "KILLED"):
        sys.exit(1)  # the queue reads the reason from the status file; a plain run exits non-zero
    return outcome.final_loss


if __name__ == "__main__":
    main()
