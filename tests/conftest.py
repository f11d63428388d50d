"""Shared test fixtures: offline Hugging Face, one cache for the session, a fresh MLflow store per test, and
Hydra composition of the real conf/ tree."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores shared with subprocesses: no oversubscription
# Never the user's own cache: the tiny model and photos are built once per test session here.
os.environ.setdefault("LORA_SWEEP_CACHE_DIR", tempfile.mkdtemp(prefix="lora-sweep-test-cache-"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compose_config(*overrides: str):
    """Compose conf/ exactly as sweep.py does (schema registered, same defaults list)."""
    from hydra import compose, initialize_config_dir

    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["LORA_SWEEP_CACHE_DIR"])


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store for one test (absolute path: four slashes), artifacts beside it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri
