"""Optimizer options and LR schedules: real torch/bitsandbytes/prodigyopt/dadaptation optimizers on a tiny LoRA UNet."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lora_sweep.errors import ConfigError
from lora_sweep.training import optim, schedules

SMALL_8BIT = {"min_8bit_size": 64}  # every LoRA matrix here has 128-256 elements; the default 4096 keeps them 32-bit


def _training_loss(unet: torch.nn.Module, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    prediction = unet(
        latents, torch.tensor([10, 500]), torch.randn(2, 8, 64, generator=generator),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=generator),
                           "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)},
    ).sample
    return F.mse_loss(prediction, torch.randn(2, 4, 8, 8, generator=generator))


def _lora_params(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def _tensor_groups(*lrs: float | None) -> list[dict]:
    groups = []
    for i, lr in enumerate(lrs):
        group = {"params": [torch.nn.Parameter(torch.randn(4, 8))], "name": ["text_encoder", "unet"][i]}
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return groups


@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_each_optimizer_trains_the_lora(tiny_lora_unet: torch.nn.Module, name: str) -> None:
    unet = copy.deepcopy(tiny_lora_unet)
    lora = _lora_params(unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    option = optim.OPTIMIZERS[name]
    args = SMALL_8BIT if name.endswith("8bit") else None
    optimizer = optim.build_optimizer(name, [{"params": list(lora.values()), "name": "unet"}],
                                      lr=option.default_lr, args=args)
    module_name, class_name = option.import_path.split(":")
    assert type(optimizer).__name__ == class_name and type(optimizer).__module__.startswith(module_name)
    assert optim.optimizer_description(optimizer).startswith(f"{type(optimizer).__module__}.{class_name}(")
    for step in range(2):
        _training_loss(unet, seed=step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for n, p in unet.named_parameters():
        assert torch.equal(p, before[n]) != (n in lora), n  # every LoRA tensor moved, no base tensor did
    if name.endswith("8bit"):
        assert all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in lora.values())
    step_size = optim.d_times_lr(optimizer)
    assert (step_size is not None) == option.adaptive
    if option.adaptive:
        group = optimizer.param_groups[0]
        assert step_size == pytest.approx(group["d"] * group["lr"]) and step_size > 0
        assert optim.lr_metrics(optimizer) == {"train/lr": 1.0, "train/d_lr": step_size}
    else:
        assert optim.lr_metrics(optimizer) == {"train/lr": option.default_lr}


def test_bitsandbytes_default_keeps_small_lora_state_in_32_bit() -> None:
    groups = _tensor_groups(None)
    optimizer = optim.build_optimizer("adamw8bit", groups, lr=1e-4)
    groups[0]["params"][0].grad = torch.ones(4, 8)
    optimizer.step()
    assert optimizer.state[groups[0]["params"][0]]["state1"].dtype == torch.float32


def test_defaults_merge_with_extra_args_and_describe_like_kohya() -> None:
    optimizer = optim.build_optimizer("prodigy", _tensor_groups(None), lr=1.0,
                                      args={"d_coef": 2, "betas": [0.9, 0.99], "safeguard_warmup": True})
    group = optimizer.param_groups[0]
    assert (group["d_coef"], group["betas"], group["safeguard_warmup"]) == (2, (0.9, 0.99), True)
    assert group["decouple"] is True  # the option's default survives the merge
    description = optim.optimizer_description(optimizer)
    assert description.startswith("prodigyopt.prodigy.Prodigy(betas=(0.9, 0.99),beta3=None,")
    assert "d_coef=2," in description and "safeguard_warmup=True" in description and "lr=" not in description
    adamw = optim.build_optimizer("adamw", _tensor_groups(None), lr=1e-4)
    expected = "torch.optim.adamw.AdamW(betas=(0.9, 0.999),eps=1e-08,weight_decay=0.01)"
    assert optim.optimizer_description(adamw) == expected
    assert type(optim.build_optimizer("DAdaptation", _tensor_groups(None), lr=1.0)).__name__ == "DAdaptAdamPreprint"


def test_prodigy_prints_nothing_in_the_pre_flight_check_nor_when_built(capfd) -> None:
    assert optim.optimizer_arg_problems("prodigy", {"weight_decay": 0.01}) == []
    optim.build_optimizer("prodigy", _tensor_groups(None), lr=1.0)
    printed = capfd.readouterr()
    assert "Using decoupled weight decay" not in printed.out + printed.err


def test_adaptive_optimizers_warn_about_a_low_lr() -> None:
    with pytest.warns(UserWarning, match="around 1.0"):
        optim.build_optimizer("dadapt_adam", _tensor_groups(None), lr=1e-4)
    with pytest.warns(UserWarning, match="learning rate 0.1 is too low"):  # kohya: lr <= 0.1
        optim.build_optimizer("prodigy", _tensor_groups(0.0, 0.1), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optim.build_optimizer("prodigy", _tensor_groups(None), lr=1.0)
        optim.build_optimizer("prodigy", _tensor_groups(0.0, None), lr=1.0)  # a frozen TE group is no false alarm
        optim.build_optimizer("adamw", _tensor_groups(None), lr=1e-4)


def test_different_nonzero_group_lrs_are_refused_before_the_optimizer_fails() -> None:
    import prodigyopt

    mismatched = _tensor_groups(0.5, 1.0)
    real = prodigyopt.Prodigy(mismatched, lr=1.0)  # what kohya users hit: the error comes only at step time
    for group in mismatched:
        group["params"][0].grad = torch.ones(4, 8)
    with pytest.raises(RuntimeError, match="different lr"):
        real.step()

    for name in ("prodigy", "dadapt_adam", "dadapt_adam_preprint"):
        with pytest.raises(ConfigError, match=r"text_encoder: lr=0.5, unet: lr=1.0.*train.text_encoder_lr"):
            optim.build_optimizer(name, _tensor_groups(0.5, 1.0), lr=1.0)
        frozen_text_encoder = _tensor_groups(0.0, None)  # lr 0 is allowed, the other group uses train.lr
        optimizer = optim.build_optimizer(name, frozen_text_encoder, lr=1.0)
        for group in frozen_text_encoder:
            group["params"][0].grad = torch.ones(4, 8)
        optimizer.step()
        assert optim.current_lr(optimizer) == 1.0 and optim.current_lr(optimizer, group=0) == 0.0
    optim.build_optimizer("adamw", _tensor_groups(5e-5, 1e-4), lr=1e-4)  # plain optimizers take any lrs


def test_invalid_optimizer_configs_fail_clearly() -> None:
    with pytest.raises(ConfigError, match=r"optimizer='sgd'.*'adamw', 'adamw8bit', 'dadapt_adam'"):
        optim.build_optimizer("sgd", _tensor_groups(None), lr=1e-4)
    with pytest.raises(ConfigError, match=r"train.lr=-0.001 is negative"):
        optim.build_optimizer("adamw", _tensor_groups(None), lr=-1e-3)
    with pytest.raises(ConfigError, match=r"'unet' is -1.0"):
        optim.build_optimizer("adamw", _tensor_groups(1e-4, -1.0), lr=1e-4)
    with pytest.raises(ConfigError, match="positive lr"):
        optim.build_optimizer("prodigy", _tensor_groups(None), lr=0.0)
    with pytest.raises(ConfigError, match=r"optimizer.args.d_coeff is not an argument of Prodigy.*'d_coef'"):
        optim.build_optimizer("prodigy", _tensor_groups(None), lr=1.0, args={"d_coeff": 2})
    with pytest.raises(ConfigError, match="optimizer.args.lr is not allowed"):
        optim.build_optimizer("adamw", _tensor_groups(None), lr=1e-4, args={"lr": 1e-3})
    with pytest.raises(ConfigError, match="rejected its arguments"):
        optim.build_optimizer("adamw", _tensor_groups(None), lr=1e-4, args={"betas": (0.9, 1.5)})


def _lrs_over_steps(name: str, *, warmup_steps: int, total_steps: int, base_lr: float = 2.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = schedules.build_lr_scheduler(optimizer, name, warmup_steps=warmup_steps, total_steps=total_steps)
    lrs = []
    for _ in range(total_steps + 1):
        lrs.append(optim.current_lr(optimizer))
        optimizer.step()
        scheduler.step()
    return lrs


def test_scheduler_shapes_at_specific_steps() -> None:
    assert _lrs_over_steps("constant", warmup_steps=0, total_steps=4) == [2.0] * 5
    assert _lrs_over_steps("constant_with_warmup", warmup_steps=2, total_steps=4) == [0.0, 1.0, 2.0, 2.0, 2.0]
    linear = _lrs_over_steps("linear", warmup_steps=2, total_steps=10)
    assert linear[:3] == [0.0, 1.0, 2.0] and linear[6] == pytest.approx(1.0) and linear[10] == 0.0
    cosine = _lrs_over_steps("cosine", warmup_steps=2, total_steps=10)
    assert cosine[:3] == [0.0, 1.0, 2.0]
    assert cosine[4] == pytest.approx(1.0 + math.cos(math.pi / 4)) and cosine[6] == pytest.approx(1.0)
    assert cosine[10] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["constant_with_warmup", "cosine", "linear"])
def test_schedules_match_diffusers_get_scheduler(name: str) -> None:
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler(name, optimizer, num_warmup_steps=3, num_training_steps=12)
    expected = [reference.lr_lambdas[0](step) for step in range(15)]
    assert [schedules.lr_multiplier(name, s, warmup_steps=3, total_steps=12) for s in range(15)] == expected


def test_invalid_schedules_fail_clearly() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="optimizer.scheduler=constant.*optimizer.warmup_steps=5"):
        schedules.build_lr_scheduler(optimizer, "constant", warmup_steps=5, total_steps=100)
    with pytest.raises(ConfigError, match=r"'polynomial'.*'constant', 'constant_with_warmup', 'cosine', 'linear'"):
        schedules.build_lr_scheduler(optimizer, "polynomial", warmup_steps=0, total_steps=100)
    with pytest.raises(ConfigError, match="warmup_steps=-1"):
        schedules.build_lr_scheduler(optimizer, "linear", warmup_steps=-1, total_steps=100)


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adam", "dadapt_adam_preprint"])
def test_learning_rate_groups_are_checked_without_parameters(name):
    """The pre-flight's form of the check: no model, no params; the advice names real keys."""
    from lora_sweep.training.optim import check_learning_rates

    with pytest.raises(ConfigError) as error:
        check_learning_rates(name, lr=1.0, text_encoder_lr=0.5, train_text_encoder=True)
    message = str(error.value)
    assert message.startswith(f"optimizer={name}:") and "text_encoder: lr=0.5, unet: lr=1.0" in message
    assert "train.text_encoder_lr=null" in message and "unet_lr" not in message
    check_learning_rates(name, lr=1.0, text_encoder_lr=0, train_text_encoder=True)  # frozen TE group: fine
    check_learning_rates(name, lr=1.0, text_encoder_lr=0.5, train_text_encoder=False)  # no TE group
    check_learning_rates("adamw", lr=1e-4, text_encoder_lr=5e-5, train_text_encoder=True)


def test_optimizer_arguments_are_checked_without_a_model() -> None:
    """The pre-flight's check: names against the class's signature (with the closest real one), lengths against
    the option's defaults, values by building the optimizer once on a dummy parameter, each named alone."""
    problems = optim.optimizer_arg_problems
    assert problems("adamw", {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}) == []
    assert problems("adamw", {"betas": [0.9]}) == [
        "optimizer.args.betas=[0.9]: AdamW (optimizer=adamw) takes 2 values, like its default [0.9, 0.999]."]
    (unknown,) = problems("prodigy", {"d_cof": 2})
    assert unknown.startswith("optimizer.args.d_cof is not an argument of Prodigy (optimizer=prodigy). Did you "
                              "mean optimizer.args.d_coef? Accepted: [")
    unknown, value = problems("adamw", {"eps": -1, "foo": 2})  # an unknown name does not hide a bad value
    assert unknown.startswith("optimizer.args.foo is not an argument of AdamW")
    assert value == ("optimizer.args.eps=-1: AdamW (optimizer=adamw) refuses it (ValueError: Invalid epsilon value: "
                     "-1). Its default is 1e-08.")
    assert problems("dadapt_adam", {"d0": -1})[0].startswith("optimizer.args.d0=-1: DAdaptAdam")
    (together,) = problems("adamw", {"fused": True, "foreach": True})
    assert together.startswith("optimizer.args.fused=True, optimizer.args.foreach=True: AdamW (optimizer=adamw) "
                               "refuses these together (RuntimeError:")
