"""Small pieces every benchmark shares: the repository root, composing conf/ as sweep.py does, a discarding sink."""

from __future__ import annotations

import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compose(*overrides: str):
    """The config `python sweep.py <overrides>` would run (conf/ composed by Hydra, schema registered)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return hydra_compose("config", overrides=list(overrides))


class NullSink:
    """A trainer sink that keeps nothing, so a timing sees the training step and not the tracking."""

    def params(self, values) -> None: ...
    def metrics(self, values, step) -> None: ...
    def artifact(self, path, artifact_path=None) -> None: ...
    def image(self, image, key, step) -> None: ...
    def progress(self, step, max_steps, loss, speed) -> None: ...


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
