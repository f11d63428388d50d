"""What a job will write, known from the config before the model loads, and a refusal that makes no folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import compose_config

from lora_sweep.checks.folders import check_job_folders, space_needs
from lora_sweep.errors import UserError
from lora_sweep.training.failures import (
    LORA_NUMEL_PER_RANK,
    PHOTOS_BYTES,
    TINY_MODEL_BYTES,
    cache_bytes,
    first_use_bytes,
    free_space_problem,
    planned_bytes,
)


def shared_cache() -> Path:
    return Path(os.environ["LORA_SWEEP_CACHE_DIR"])


def test_the_tiny_models_figures_before_it_loads_are_its_real_ones(tmp_path):
    """model=tiny_random train.max_steps=1: ~0.8 MiB of LoRA files and ~2.1 MiB per state, never "about 0.0 MiB"."""
    from lora_sweep.data.photos import photos_dir
    from lora_sweep.model.network import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora
    from lora_sweep.training.session import load_parts

    cfg = compose_config("model=tiny_random", "train.max_steps=1", f"data.cache_dir={shared_cache()}")
    lora_bytes = 4 * 4 * 24_960  # rank 4, fp32
    assert planned_bytes(cfg) == ((lora_bytes * 3 + 2**20) * 3, lora_bytes * 2)  # AdamW: 2 moments; 2 kept + 1
    assert planned_bytes(compose_config("model=sdxl")) is None  # known once it loads
    parts = load_parts(cfg)
    add_lora(parts.unet, rank=1, alpha=1.0, targets=UNET_TARGETS)
    add_lora(parts.text_encoder, rank=1, alpha=1.0, targets=TEXT_ENCODER_TARGETS)
    add_lora(parts.text_encoder_2, rank=1, alpha=1.0, targets=TEXT_ENCODER_TARGETS)
    numel = [sum(p.numel() for n, p in m.named_parameters() if "lora" in n)
             for m in (parts.unet, parts.text_encoder, parts.text_encoder_2)]
    assert (numel[0], numel[1] + numel[2]) == LORA_NUMEL_PER_RANK["tiny"]
    model = shared_cache() / "models"
    assert int(subprocess.run(["du", "-sb", str(model)], capture_output=True, text=True).stdout.split()[0]) \
        <= TINY_MODEL_BYTES
    photos = photos_dir(shared_cache())  # built on first use, as the cached model is
    assert int(subprocess.run(["du", "-sb", str(photos)], capture_output=True, text=True).stdout.split()[0]) \
        <= PHOTOS_BYTES
    fresh = compose_config("model=tiny_random", f"data.cache_dir={tmp_path / 'empty'}")
    assert first_use_bytes(fresh) == TINY_MODEL_BYTES + PHOTOS_BYTES  # built into the cache by the job
    shipped = compose_config("model=tiny", f"data.cache_dir={tmp_path / 'empty'}")
    assert first_use_bytes(shipped) == PHOTOS_BYTES  # the trained tiny model is read from the package
    assert first_use_bytes(compose_config("model=tiny_random", f"data.cache_dir={shared_cache()}",
                                          f"data.dir={tmp_path}")) == 0


def test_a_disk_without_room_is_refused_before_any_folder_is_made(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    big = compose_config("model=tiny_random", f"train.keep_states={free // 2**20}",
                         f"data.cache_dir={tmp_path / 'cache'}", f"train.state_dir={tmp_path / 'states'}",
                         "data=folder", f"data.dir={tmp_path}")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    with pytest.raises(UserError, match=r"^not enough free disk space: .* free where this training will write about "
                                        r"\d+\.\d MiB and lora-sweep keeps 16\.0 MiB free: train\.output_dir '") as e:
        check_job_folders(big, tmp_path / "out", uri)
    assert "0.0 MiB" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, state, cache or store folder
    unknown = space_needs(compose_config("model=sdxl"), tmp_path / "out", uri)
    unknown[tmp_path / "cache"] = ("data.cache_dir", free)
    problem = free_space_problem(unknown)
    assert "this training will write at least" in problem and f"train.output_dir '{tmp_path / 'out'}'," in problem


def test_the_cache_estimate_reads_kohyas_w_h_resolution():
    from types import SimpleNamespace

    scans = [SimpleNamespace(items=[SimpleNamespace(caption="a dog")] * 3)]
    square = cache_bytes(scans, compose_config("data.resolution=64").data, text=False)
    assert cache_bytes(scans, compose_config("data.resolution='64,64'").data, text=False) == square  # an import's
    assert cache_bytes(scans, compose_config("data.resolution='128,32'").data, text=False) == square
    assert square == 3 * (2 * 4 * 4 * 8 * 8 + 2**12)  # the posterior's mean and std
