"""The length of a training in epochs (train.max_train_epochs -> optimizer steps) and the saving windows, as kohya
sd-scripts v0.8.7 computes them (docs/sweeps.md#length-and-saving)."""

from __future__ import annotations

import copy
from pathlib import Path

from conftest import compose_config, write_image

from lora_sweep.checks import preflight
from lora_sweep.checks.validate import config_problems
from lora_sweep.config import config_hash
from lora_sweep.training import length
from lora_sweep.training.checkpoint import epoch_file_to_remove, step_file_to_remove
from lora_sweep.training.session import num_epochs


def folder_config(data: Path, *overrides: str):
    return compose_config("data=folder", f"data.dir={data}", *overrides)


def test_the_reference_worked_example_25_images_x_10_repeats_batch_2_accumulation_4_10_epochs(tmp_path):
    """Reference 8.1: 250 entries in one bucket are 125 batches; 10 x ceil(125 / 4) = 320 steps, 10 epochs."""
    for i in range(25):
        write_image(tmp_path / "data" / "10_thing" / f"img{i:02d}.png", caption=f"thing {i}")
    cfg = folder_config(tmp_path / "data", "train.batch_size=2", "train.grad_accum=4", "train.max_train_epochs=10")
    specs, scans = preflight.training_scans(cfg, tmp_path / "data")

    assert length.scanned_batches_per_epoch(cfg, specs, scans) == 125
    assert length.max_train_steps(cfg, specs, scans) == 320
    before = config_hash(cfg)
    length.resolve_max_steps(cfg, specs, scans)
    assert cfg.train.max_steps == 320 and num_epochs(320, 125, 4) == 10
    assert config_hash(cfg) == before  # the hash is of what the user set


def test_each_bucket_is_cut_into_batches_and_held_out_images_do_not_count(tmp_path):
    """3 square images and 1 wide x 2 repeats, batch 4: ceil(6/4) + ceil(2/4) = 3 batches; holding out 1 of 4
    (data.validation_split 0.25) leaves 4 + 2 or 6 + 0 entries: 2 batches either way."""
    for i in range(3):
        write_image(tmp_path / "data" / "2_thing" / f"square{i}.png", size=(64, 64), caption="a")
    write_image(tmp_path / "data" / "2_thing" / "wide.png", size=(256, 64), caption="b")
    cfg = folder_config(tmp_path / "data", "train.batch_size=4", "train.max_train_epochs=3")
    specs, scans = preflight.training_scans(cfg, tmp_path / "data")
    assert length.scanned_batches_per_epoch(cfg, specs, scans) == 3
    assert length.max_train_steps(cfg, specs, scans) == 9
    held_out = folder_config(tmp_path / "data", "train.batch_size=4", "train.max_train_epochs=3",
                             "data.validation_split=0.25")
    assert length.scanned_batches_per_epoch(held_out, specs, scans) == 2


def test_without_epochs_max_steps_stays_and_with_epochs_it_leaves_the_hash():
    plain = compose_config("train.max_steps=7")
    default_hash = config_hash(plain)
    assert length.max_train_steps(plain, [], []) == 7
    length.resolve_max_steps(plain, [], [])
    assert plain.train.max_steps == 7 and config_hash(plain) == default_hash

    def hash_of(epochs, steps):
        cfg = copy.deepcopy(plain)
        cfg.train.max_train_epochs, cfg.train.max_steps = epochs, steps
        return config_hash(cfg)

    assert hash_of(3, 7) == hash_of(3, 500) != hash_of(4, 7) != default_hash
    assert hash_of(None, 7) == default_hash


def test_step_files_are_kept_for_a_window_of_steps_not_a_count_of_files():
    """v0.8.7's example: every 10 steps, save_last_n_steps 30: at step 50 the file of step 10 goes, 20-50 stay."""
    assert step_file_to_remove(50, 10, 30) == 10
    assert step_file_to_remove(40, 10, 30) == 0  # no file of step 0: nothing goes
    assert step_file_to_remove(30, 10, 30) is None
    assert step_file_to_remove(50, 10, None) is None
    assert step_file_to_remove(45, 5, 12) == 30  # 45 - 13 = 32, rounded down to a multiple of 5
    kept = set()
    for step in range(10, 101, 10):
        kept = (kept | {step}) - {step_file_to_remove(step, 10, 30)}
    assert kept == {70, 80, 90, 100}


def test_epoch_files_keep_the_last_n():
    assert epoch_file_to_remove(5, 1, 3) == 2
    assert epoch_file_to_remove(6, 2, 2) == 2
    assert epoch_file_to_remove(2, 1, 3) is None
    assert epoch_file_to_remove(4, 2, None) is None


def test_each_bad_length_or_saving_value_is_one_line_naming_it():
    cfg = compose_config("train.max_train_epochs=0", "train.save_last_n_steps=-1", "train.save_last_n_epochs=0",
                         "train.save_precision=fp8")
    assert config_problems(cfg) == [
        "train.max_train_epochs: must be > 0, got 0.",
        "train.save_last_n_steps: must be >= 0, got -1.",
        "train.save_last_n_epochs: must be > 0, got 0.",
        "train.save_precision: must be null (the training dtype) or one of float, fp16, bf16, got 'fp8'.",
    ]


def test_the_preflight_counts_a_resumed_states_steps_against_the_converted_length(tmp_path):
    """6 entries, batch 2, accumulation 2: 2 steps an epoch. A state at step 4 leaves nothing to train in 2 epochs."""
    import random

    import torch

    from lora_sweep.config import hashed_settings
    from lora_sweep.training import checkpoint

    for i in range(2):
        write_image(tmp_path / "data" / "3_thing" / f"img{i}.png", caption="a")
    cfg = folder_config(tmp_path / "data", "train.batch_size=2", "train.grad_accum=2", "train.max_train_epochs=2")
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    state = checkpoint.save_state(
        tmp_path / "states", lora=dict(layer.named_parameters()), optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), scaler=torch.amp.GradScaler(
            "cpu", enabled=False), position=checkpoint.Position(step=4), rng=checkpoint.capture_rng(random.Random(0)),
        config_hash=config_hash(cfg), run_id="r", keep=1, params=hashed_settings(cfg))
    cfg.train.resume = str(state)
    problems = [p for p in preflight.check_job(cfg).problems if p.startswith("train.resume")]
    assert problems == [f"train.resume: '{state}' is at step 4, which is the 4 steps of train.max_train_epochs=2: "
                        "nothing is left to train; raise train.max_train_epochs to continue it, or set "
                        "train.resume=never to start over."]


def test_one_epoch_is_logged_in_the_singular(tmp_path, caplog):
    """train.max_train_epochs=1 (the tester's value): '1 epoch x ceil(...)', not '1 epochs'."""
    import logging

    for i in range(4):
        write_image(tmp_path / "data" / "1_thing" / f"img{i}.png", caption=f"thing {i}")
    cfg = folder_config(tmp_path / "data", "train.batch_size=1", "train.max_train_epochs=1")
    specs, scans = preflight.training_scans(cfg, tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="lora_sweep.training.length"):
        length.resolve_max_steps(cfg, specs, scans)
    assert "train.max_train_epochs=1: 4 optimizer steps (1 epoch x ceil(4 batches / grad_accum 1)" in caplog.text
