"""Where lora-sweep keeps things of its own: the per-user cache root shared by every sweep.

Cross-cutting on purpose: the model loader (the tiny model's folder), the latent/text cache and the training states
all live under the same root, and none of them should import another to find it.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$LORA_SWEEP_CACHE_DIR, else $XDG_CACHE_HOME/lora-sweep, else ~/.cache/lora-sweep: one per user, shared by
    all sweeps."""
    if os.environ.get("LORA_SWEEP_CACHE_DIR"):
        return Path(os.environ["LORA_SWEEP_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lora-sweep"
    return Path.home() / ".cache" / "lora-sweep"
