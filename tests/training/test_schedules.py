"""LR schedules as kohya v0.8.7 builds them: the lr of chosen updates against docs/kohya-reference.md §6's formulas,
written out with numbers (T = 10 updates, W = 2 warmup), on real torch optimizers and one real training."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import RecordingSink, compose_config

from lora_sweep.checks.validate import config_problems
from lora_sweep.errors import ConfigError
from lora_sweep.training import optim, schedules

T, W = 10, 2


def lrs_by_update(name: str, *group_lrs: float, warmup_steps: int = W, total_steps: int = T, **options) -> list:
    """[the lrs update k uses, per group] for k = 0..total_steps: SGD groups at `group_lrs`, the first being the
    optimizer's default lr, each update followed by one scheduler step as in training."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in group_lrs]
    optimizer = torch.optim.SGD(groups, lr=group_lrs[0])
    scheduler = schedules.build_lr_scheduler(optimizer, name, warmup_steps=warmup_steps, total_steps=total_steps,
                                             **options)
    used = []
    for _ in range(total_steps + 1):
        used.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return used


def factors(name: str, lr: float = 1.0, **options) -> list[float]:
    return [k[0] / lr for k in lrs_by_update(name, lr, **options)]


def test_warmup_starts_at_zero_then_linear_decays_to_zero():
    # k < W: k/W (the first update uses lr 0); then (T - k) / (T - W); the last update (k = 9) uses 1/8
    assert factors("linear") == [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    assert factors("constant_with_warmup") == [0.0, 0.5] + [1.0] * 9
    assert factors("constant", warmup_steps=0) == [1.0] * 11
    # without warmup the last update uses 1/T
    assert factors("linear", warmup_steps=0)[T - 1] == 0.1


def test_cosine_is_a_half_cosine_whatever_num_cycles_says():
    # p = (k - W) / (T - W); lambda = 0.5 (1 + cos(pi p)): p = 0.25 -> 0.8535..., 0.5 -> 0.5, 0.75 -> 0.1464...
    expected = [0.0, 0.5, 1.0, 0.9619397662556434, 0.8535533905932737, 0.6913417161825449, 0.5,
                0.30865828381745514, 0.14644660940672627, 0.038060233744356624, 0.0]
    assert factors("cosine") == pytest.approx(expected, abs=1e-15)
    assert factors("cosine", num_cycles=3) == factors("cosine")  # --lr_scheduler_num_cycles: restarts only
    # diffusers' own num_cycles, through lr_scheduler_args, is passed on: 1 is a full cosine, back to 1 at T
    full = factors("cosine", scheduler_args={"num_cycles": 1})
    assert full[6] == pytest.approx(0.0, abs=1e-15) and full[10] == pytest.approx(1.0)


def test_cosine_with_restarts_restarts_num_cycles_times():
    # c = 2: lambda = 0.5 (1 + cos(pi ((c p) mod 1))), 0 once p >= 1
    lrs = factors("cosine_with_restarts", num_cycles=2)
    assert lrs[:3] == [0.0, 0.5, 1.0]
    assert lrs[4] == pytest.approx(0.5) and lrs[5] == pytest.approx(0.1464466094067262)
    assert lrs[6] == 1.0 and lrs[8] == pytest.approx(0.5) and lrs[10] == 0.0


def test_polynomial_decays_each_group_by_the_default_lrs_lambda():
    """lambda = ((lr_init - e) (1 - (k - W)/(T - W))^q + e) / lr_init with lr_init = the optimizer's default lr
    (train.lr); the same lambda multiplies a second group at 5e-5, which ends at 5e-8, not at lr_end."""
    used = lrs_by_update("polynomial", 1e-4, 5e-5, power=2.0)
    assert [u[0] for u in used[:3]] == [0.0, 5e-05, 1e-04]
    assert used[6][0] == pytest.approx(((1e-4 - 1e-7) * 0.5**2 + 1e-7), rel=1e-12)  # 2.5075e-05
    assert used[6][0] == pytest.approx(2.5075e-05, rel=1e-12)
    assert used[10] == pytest.approx([1e-7, 5e-8], rel=1e-12)  # k = T: lr_end / lr_init = 1e-3 for both groups
    after = lrs_by_update("polynomial", 1e-4, total_steps=T, warmup_steps=W, power=2.0,
                          scheduler_args={"lr_end": 1e-6})
    assert after[10][0] == pytest.approx(1e-6, rel=1e-12)
    assert schedules.lr_multiplier("polynomial", 11, warmup_steps=W, total_steps=T, lr=1e-4) == pytest.approx(1e-3)


def test_piecewise_constant_follows_its_step_rules_and_ignores_the_warmup():
    lrs = factors("piecewise_constant", scheduler_args={"step_rules": "1:3,0.1:6,0.01"})
    assert lrs == [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.01]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_training_logs_the_cosine_warmup_lr_of_each_optimizer_update(tmp_path, grad_accum):
    """train/lr at step s (logged after the scheduler step) is lr x lambda(s), T = 4, W = 2: lambda = 0.5, 1, 0.5, 0;
    accumulation does not change it (the schedule counts optimizer updates, not micro-batches)."""
    from lora_sweep.training.train import train

    cfg = compose_config("train.max_steps=4", "train.batch_size=1", f"train.grad_accum={grad_accum}",
                         "data.resolution=64", "optimizer.scheduler=cosine", "optimizer.warmup_steps=2",
                         "sampling.prompts=[]", "validation.fit_images=0")
    sink = RecordingSink()
    train(cfg, output_dir=tmp_path / "out", sink=sink)
    assert [sink.logged[f"train/lr@{s}"] for s in range(1, 5)] == [5e-05, 1e-04, 5e-05, 0.0]


def test_the_first_warmup_update_uses_lr_zero_so_adamw_leaves_the_weights():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = optim.build_optimizer("adamw", [{"params": [weight], "name": "unet"}], lr=1e-3)
    scheduler = schedules.build_lr_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=10)
    for expected_moved in (False, True):
        before = weight.detach().clone()
        weight.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
        assert (not torch.equal(weight, before)) == expected_moved


def test_invalid_schedules_fail_clearly() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="optimizer.scheduler=constant.*optimizer.warmup_steps=5"):
        schedules.build_lr_scheduler(optimizer, "constant", warmup_steps=5, total_steps=100)
    with pytest.raises(ConfigError, match=r"'exponential'.*'constant', 'constant_with_warmup', 'cosine', "):
        schedules.build_lr_scheduler(optimizer, "exponential", warmup_steps=0, total_steps=100)
    with pytest.raises(ConfigError, match="warmup_steps=-1"):
        schedules.build_lr_scheduler(optimizer, "linear", warmup_steps=-1, total_steps=100)
    with pytest.raises(ConfigError, match="the adafactor schedule needs optimizer=adafactor"):
        schedules.build_lr_scheduler(optimizer, "adafactor", warmup_steps=0, total_steps=100)


@pytest.mark.parametrize("overrides, problem", [
    (["optimizer.warmup_steps=0.1", "train.max_steps=250"],
     "optimizer.warmup_steps=0.1: kohya v0.8.7 takes the warmup in optimizer steps only (a fraction of the run arrived "
     "in v0.9.0); 0.1 of train.max_steps=250 is 25 steps: set optimizer.warmup_steps=25."),
    (["optimizer.warmup_steps=-3"], "optimizer.warmup_steps=-3: must be a whole number of optimizer steps >= 0"),
    (["optimizer.scheduler=constant", "optimizer.warmup_steps=5"], "optimizer.warmup_steps=5: the constant schedule "
     "takes no warmup; v0.8.7 raises 'does not require num_warmup_steps'. Set optimizer.warmup_steps=0 or use "
     "constant_with_warmup."),
    (["optimizer.scheduler=polynomial", "optimizer.lr=1e-7"], "optimizer.scheduler=polynomial decays "
     "train.lr=1e-07 to lr_end=1e-07, so train.lr must be larger (v0.8.7 raises ValueError)"),
    (["optimizer.scheduler=polynomial", "optimizer.warmup_steps=20"], "optimizer.warmup_steps=20 equals "
     "train.max_steps: polynomial then divides by zero"),
    (["optimizer.scheduler=linear", "+optimizer.lr_scheduler_args.f_min=0.1"], "optimizer.lr_scheduler_args.f_min: "
     "the linear schedule of v0.8.7 (diffusers 0.25) takes no arguments there."),
    (["optimizer.scheduler=piecewise_constant"], "optimizer.lr_scheduler_args.step_rules: piecewise_constant needs"),
    (["optimizer.scheduler=piecewise_constant", "+optimizer.lr_scheduler_args.step_rules='1:x,0.1'"],
     "optimizer.lr_scheduler_args.step_rules='1:x,0.1': not 'multiplier:steps,...,last multiplier'"),
    (["optimizer.scheduler=adafactor"], "optimizer.scheduler: the adafactor schedule needs optimizer=adafactor"),
    (["optimizer=adafactor", "optimizer.scheduler=adafactor", "optimizer.args.relative_step=false"],
     "optimizer.scheduler: the adafactor schedule needs Adafactor's relative_step=True (v0.8.7 fails with an "
     "IndexError"),
    (["optimizer=adafactor", "optimizer.scheduler=cosine", "optimizer.warmup_steps=10"], "optimizer.warmup_steps=10: "
     "the adafactor:0.0001 schedule takes no warmup (optimizer=adafactor with relative_step=True replaces "
     "optimizer.scheduler=cosine with it, as v0.8.7 does)"),
])
def test_schedule_settings_are_refused_before_anything_loads_naming_the_field(overrides, problem):
    problems = config_problems(compose_config(*overrides))
    assert [p for p in problems if p.startswith(problem)], problems


def test_kohyas_schedule_settings_pass_the_checks():
    for overrides in (["optimizer.scheduler=cosine_with_restarts", "optimizer.lr_scheduler_num_cycles=3"],
                      ["optimizer.scheduler=polynomial", "optimizer.lr_scheduler_power=2",
                       "+optimizer.lr_scheduler_args.lr_end=1e-6"],
                      ["optimizer.scheduler=piecewise_constant", "optimizer.warmup_steps=5",
                       "+optimizer.lr_scheduler_args.step_rules='1:10,0.1'"],
                      ["optimizer=adafactor", "optimizer.scheduler=cosine"],
                      ["optimizer=adafactor", "optimizer.args.relative_step=false", "optimizer.warmup_steps=2",
                       "optimizer.scheduler=constant_with_warmup"]):
        assert config_problems(compose_config(*overrides)) == [], overrides
    assert math.isclose(schedules.lr_multiplier("cosine", 5, warmup_steps=0, total_steps=10), 0.5)


def test_a_warmup_the_run_never_finishes_is_warned_and_one_step_is_singular(caplog) -> None:
    """The tester's values: warmup 50 over 4 steps trains (v0.8.7 is silent) with a warning; 0.1 of 10 is 1 step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    with caplog.at_level(logging.WARNING, logger="lora_sweep.training.schedules"):
        schedules.build_lr_scheduler(optimizer, "linear", warmup_steps=50, total_steps=4)
        assert ("optimizer.warmup_steps=50 is not below the run's 4 steps: the lr is still warming up when the run "
                "ends (at 4/50 of train.lr=0.0001) and never reaches train.lr") in caplog.text
        caplog.clear()
        schedules.build_lr_scheduler(optimizer, "linear", warmup_steps=3, total_steps=4)
        assert caplog.text == ""
    assert schedules.warmup_problem(0.1, 10).endswith(
        "0.1 of train.max_steps=10 is 1 step: set optimizer.warmup_steps=1.")
