"""Shared test fixtures: offline Hugging Face, one cache for the session, a fresh MLflow store per test, Hydra
composition of the real conf/ tree, and (from cluster_fixtures) a real `mlflow server` and a one-node Slurm."""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import sys
import tempfile
from html.parser import HTMLParser
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

from cluster_fixtures import mlflow_server, slurm_cluster  # noqa: E402,F401  (an MLflow server, a one-node Slurm)

import lora_sweep  # noqa: E402

lora_sweep.setup()  # the test session is an entry point: resolvers, library output


def compose_config(*overrides: str):
    """Compose conf/ exactly as sweep.py does (schema registered, same defaults list), on model=tiny_random unless an
    override names the model: tests need the architecture and speed, not the trained weights."""
    from hydra import compose, initialize_config_dir

    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        model = [] if any(o.startswith("model=") for o in overrides) else ["model=tiny_random"]
        return compose("config", overrides=[*model, *overrides])


def compose_configs(*override_lists: list[str]) -> list:
    """compose_config of each list of overrides, under one Hydra initialization: a third cheaper a config."""
    from hydra import compose, initialize_config_dir

    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return [compose("config", overrides=list(overrides)) for overrides in override_lists]


@functools.cache
def _empty_store() -> Path:
    """An empty sqlite store whose tables MLflow made, once per test session: making them costs seconds a store."""
    from mlflow.tracking import MlflowClient

    db = Path(tempfile.mkdtemp(prefix="lora-sweep-test-store-")) / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # creates the tables and the Default experiment
    return db


def new_store(db: Path) -> str:
    """A new sqlite store at `db` (its folder made) as MLflow makes one with the working folder beside it, copied
    from the session's empty store; returns its URI. Tests of store creation itself open a missing file instead."""
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_empty_store(), db)
    with sqlite3.connect(db) as connection:  # Default's artifact folder: MLflow puts it under the working folder
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           (str(db.parent / "mlruns" / "0"),))
    connection.close()
    return f"sqlite:///{db}"


def write_image(path: Path, size=(64, 64), caption: str | bytes | None = None, color=(90, 140, 200)) -> Path:
    """A plain RGB PNG at `path` (folders made), with a caption file beside it when `caption` is given (bytes are
    written as they are, e.g. a caption that is not UTF-8)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        target = path.with_suffix(".txt")
        target.write_bytes(caption) if isinstance(caption, bytes) else target.write_text(caption, encoding="utf-8")
    return path


def kohya_scheduler_alphas_cumprod():
    """abar_t = prod_{i<=t} (1 - beta_i), beta_i = linspace(sqrt(0.00085), sqrt(0.012), 1000)_i ** 2, all in fp32:
    the values diffusers' DDPMScheduler holds for kohya's settings (scaled_linear betas from 0.00085 to 0.012 over
    1000 steps), computed from the formula as a reference for the noise and loss tests."""
    import torch

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class RecordingSink:
    """The trainer's `Sink` (lora_sweep.training.train.Sink) for tests: keeps what a training reports. `logged`:
    metrics as {"key@step": value}; `artifacts`: (file name, artifact path, bytes when logged); `images`: (key,
    step, size)."""

    def __init__(self) -> None:
        self.logged_params: dict = {}
        self.logged: dict = {}
        self.artifacts: list[tuple[str, str | None, int]] = []
        self.images: list[tuple[str, int, tuple[int, int]]] = []
        self.fallbacks: list = []
        self.steps: list[int] = []
        self.flushes = 0

    def params(self, values) -> None:
        self.logged_params.update(values)

    def metrics(self, values, step) -> None:
        self.logged.update({f"{key}@{step}": value for key, value in values.items()})

    def artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append((Path(path).name, artifact_path, Path(path).stat().st_size))

    def image(self, image, key, step) -> None:
        self.images.append((key, step, image.size))

    def progress(self, step, max_steps, loss, speed) -> None:
        self.steps.append(step)

    def warn(self, fallback) -> None:
        self.fallbacks.append(fallback)

    def flush(self) -> None:
        self.flushes += 1


class GridCells(HTMLParser):
    """Collects the <img> cells of the sample grid with their data-* attributes."""

    def __init__(self):
        super().__init__()
        self.cells: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img" and "data-run-id" in attributes:
            self.cells.append(attributes)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["LORA_SWEEP_CACHE_DIR"])


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store for one test (absolute path: four slashes), artifacts beside it."""
    uri = new_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(scope="session")
def tiny_lora_unet():
    """fp32 tiny SDXL-shaped UNet (stack-notes config, pooled dim 32) with a rank-4 PEFT LoRA on kohya's targets;
    tests that change it deepcopy it first."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, cross_attention_dim=64,
    )
    unet.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    return unet
