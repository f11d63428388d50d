"""A state resumed under a changed config: every setting it carries follows the new config or is refused.

Real optimizers and LR schedules built from composed configs, saved and restored through the state file."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import compose_config

from lora_sweep.config import config_hash, hashed_settings
from lora_sweep.errors import UserError
from lora_sweep.training import checkpoint, optim, resume, schedules
from lora_sweep.training.session import make_optimizer

COSINE_200 = ("optimizer.scheduler=cosine", "train.max_steps=200")


def test_every_setting_a_config_hashes_has_a_rule():
    """Every hashed key of the composed config, and every optimizer.args key of every conf/optimizer option."""
    from omegaconf import OmegaConf

    from lora_sweep.config import CONF_DIR

    keys = set(hashed_settings(compose_config()))
    for option in (CONF_DIR / "optimizer").glob("*.yaml"):
        keys |= {f"optimizer.args.{k}" for k in OmegaConf.load(option).args}
    assert len(keys) > 70 and [k for k in sorted(keys) if resume.rule_for(k) is None] == []


def built(cfg):
    """A one-layer stand-in for the LoRA, with the optimizer and schedule training builds for `cfg`."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    optimizer, scheduler = make_optimizer(cfg, [{"name": "unet", "params": list(layer.parameters()),
                                                 "lr": cfg.train.lr}])
    return layer, optimizer, scheduler


def step(layer, optimizer, scheduler) -> float:
    """One update, then the train/lr it logs."""
    layer(torch.randn(2, 4)).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return optim.lr_metrics(optimizer)["train/lr"]


def state_after(tmp_path, cfg, steps: int):
    layer, optimizer, scheduler = built(cfg)
    for _ in range(steps):
        step(layer, optimizer, scheduler)
    return checkpoint.save_state(
        tmp_path / config_hash(cfg) / "run1", lora=dict(layer.named_parameters()), optimizer=optimizer,
        lr_scheduler=scheduler, scaler=torch.amp.GradScaler("cpu", enabled=False),
        position=checkpoint.Position(step=steps), rng=checkpoint.capture_rng(random.Random(0)),
        config_hash=config_hash(cfg), run_id="run1", keep=2, params=hashed_settings(cfg))


def resumed_lr(state, *overrides: str) -> tuple[float, torch.optim.Optimizer, dict]:
    """train/lr of the update after `state`, resumed under the config of `overrides` (checked as a job does)."""
    cfg = compose_config(*overrides)
    changes = resume.check_state_config(cfg, checkpoint.read_meta(state), state, config_hash(cfg))
    layer, optimizer, scheduler = built(cfg)
    checkpoint.restore(checkpoint.load_state(state), lora=dict(layer.named_parameters()), optimizer=optimizer,
                       lr_scheduler=scheduler, scaler=torch.amp.GradScaler("cpu", enabled=False),
                       flip_rng=random.Random(0))
    return step(layer, optimizer, scheduler), optimizer, changes


def test_a_new_lr_and_schedule_apply_from_the_resumed_step(tmp_path):
    """Run A (lr 1e-4, cosine, 200 steps) stopped at step 153; its state resumed with optimizer.lr=5e-5 trains step
    154 at 5e-5 x the cosine factor, with scheduler=constant at exactly 5e-5; unchanged, at A's own 1.2494e-05."""
    state = state_after(tmp_path, compose_config(*COSINE_200), 153)
    factor = schedules.lr_multiplier("cosine", 154, warmup_steps=0, total_steps=200)

    same, _, changes = resumed_lr(state, *COSINE_200)
    assert changes == {} and same == 1e-4 * factor and round(same, 9) == 1.2494e-05

    lower, _, changes = resumed_lr(state, *COSINE_200, "optimizer.lr=5e-5")
    assert lower == 5e-5 * factor and round(lower, 10) == 6.2472e-06
    assert resume.describe(changes) == "optimizer.lr 0.0001 -> 5e-05; train.lr 0.0001 -> 5e-05"

    constant, _, changes = resumed_lr(state, "optimizer.scheduler=constant", "train.max_steps=200", "optimizer.lr=5e-5")
    assert constant == 5e-5
    assert set(changes) == {"optimizer.lr", "train.lr", "optimizer.scheduler"}


def test_optimizer_hyperparameters_follow_and_its_moments_stay(tmp_path):
    state = state_after(tmp_path, compose_config(), 3)
    saved = checkpoint.load_state(state)["optimizer"]
    _, optimizer, changes = resumed_lr(state, "optimizer.args.betas=[0.8,0.99]", "optimizer.args.weight_decay=0.1")
    (group,) = optimizer.param_groups
    assert group["betas"] == (0.8, 0.99) and group["weight_decay"] == 0.1 and group["lr"] == 1e-4
    assert set(changes) == {"optimizer.args.betas", "optimizer.args.weight_decay"}
    assert optimizer.state_dict()["state"][0]["step"] == saved["state"][0]["step"] + 1  # moments went on


def test_a_setting_a_state_cannot_follow_is_refused_naming_it(tmp_path):
    state = state_after(tmp_path, compose_config(), 3)
    with pytest.raises(UserError) as refused:
        resumed_lr(state, "network.rank=8", "optimizer.lr=5e-5")
    text = str(refused.value)
    assert "network.rank 4 -> 8 (the state's LoRA tensors have the old rank's shapes)" in text
    assert "optimizer.lr" not in text.split("Resume it")[0]  # only what is refused is listed
    assert "train.resume=never" in text and "\n" not in text


def test_the_nearest_followable_state_of_another_config_is_found(tmp_path):
    state = state_after(tmp_path, compose_config(), 3)
    cfg = compose_config("optimizer.lr=5e-5")
    assert resume.nearest_state(cfg, tmp_path, config_hash(cfg)) == (state, {
        "optimizer.lr": (1e-4, 5e-5), "train.lr": (1e-4, 5e-5)})
    other_rank = compose_config("network.rank=8")
    assert resume.nearest_state(other_rank, tmp_path, config_hash(other_rank)) is None
    fewer_steps = compose_config("optimizer.lr=5e-5", "train.max_steps=2")  # the state is at step 3
    assert resume.nearest_state(fewer_steps, tmp_path, config_hash(fewer_steps)) is None


def test_a_state_at_train_max_steps_is_refused_with_nothing_left_to_train(tmp_path):
    """The final state of a finished run resumed with the same train.max_steps=1 would train 0 steps."""
    from lora_sweep.checks.preflight import check_job
    from lora_sweep.job.run import plan_resume

    state = state_after(tmp_path, compose_config("train.max_steps=1"), 1)
    cfg = compose_config("train.max_steps=1", f"train.resume={state}")
    expected = (f"train.resume: '{state}' is at step 1, which is train.max_steps: nothing is left to train; raise "
                "train.max_steps to continue it, or set train.resume=never to start over.")
    assert expected in check_job(cfg).problems
    with pytest.raises(UserError, match="nothing is left to train"):
        plan_resume(cfg, None, "0", config_hash(cfg), tmp_path)
    same_lr = compose_config("train.max_steps=1", "optimizer.lr=5e-5")  # not offered as a state to continue
    assert resume.nearest_state(same_lr, tmp_path, config_hash(same_lr)) is None
    assert resume.nearest_state(compose_config("train.max_steps=2", "optimizer.lr=5e-5"), tmp_path, "x") is not None


def test_a_state_of_other_files_is_refused_even_under_the_same_config(tmp_path):
    cfg = compose_config()
    layer, optimizer, scheduler = built(cfg)
    state = checkpoint.save_state(
        tmp_path, lora=dict(layer.named_parameters()), optimizer=optimizer, lr_scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu", enabled=False), position=checkpoint.Position(step=1),
        rng=checkpoint.capture_rng(random.Random(0)), config_hash=config_hash(cfg), run_id="r", keep=1,
        params=hashed_settings(cfg), dataset="a" * 16)
    meta = checkpoint.read_meta(state)
    assert resume.check_state_config(cfg, meta, state, config_hash(cfg), "a" * 16) == {}
    with pytest.raises(UserError, match=f"dataset {'a' * 16} -> {'b' * 16} \\(images or captions changed"):
        resume.check_state_config(cfg, meta, state, config_hash(cfg), "b" * 16)


def test_fp16_after_a_state_without_a_scaler_starts_its_scaler_afresh(tmp_path):
    state = state_after(tmp_path, compose_config(), 2)  # fp32: the state's scaler is empty
    cfg = compose_config("precision=fp16")
    assert resume.check_state_config(cfg, checkpoint.read_meta(state), state, config_hash(cfg)) == {
        "precision.name": ("fp32", "fp16")}
    layer, optimizer, scheduler = built(cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    checkpoint.restore(checkpoint.load_state(state), lora=dict(layer.named_parameters()), optimizer=optimizer,
                       lr_scheduler=scheduler, scaler=scaler, flip_rng=random.Random(0))
    assert scaler.is_enabled() and scaler.get_scale() == 1024.0
