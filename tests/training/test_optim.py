"""Optimizer options and LR schedules: real torch/bitsandbytes/prodigyopt/dadaptation optimizers on a tiny LoRA UNet."""

from __future__ import annotations

import copy
import inspect
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

from lora_sweep.errors import ConfigError
from lora_sweep.training import optim

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
    lr = 0.1 if name == "sgd_nesterov" else option.default_lr  # plain SGD at 1e-4 moves lora_A below fp32's epsilon
    optimizer = optim.build_optimizer(name, [{"params": list(lora.values()), "name": "unet"}], lr=lr, args=args)
    module_name, class_name = option.import_path.split(":")
    assert type(optimizer).__name__ == class_name and type(optimizer).__module__.startswith(module_name)
    assert optim.optimizer_description(optimizer).startswith(f"{type(optimizer).__module__}.{class_name}")
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
    elif name != "adafactor":  # relative_step: no lr until its schedule reports Adafactor's own step size
        assert optim.lr_metrics(optimizer) == {"train/lr": lr}


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
    # kohya lists what the user passed, not the defaults the option file spells out
    description = optim.optimizer_description(optimizer)
    assert description == "prodigyopt.prodigy.Prodigy(d_coef=2,betas=(0.9, 0.99),safeguard_warmup=True)"
    adamw = optim.build_optimizer("adamw", _tensor_groups(None), lr=1e-4)
    assert optim.optimizer_description(adamw) == "torch.optim.adamw.AdamW"
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


def _matrix_groups(seed: int = 0) -> list[dict]:
    """A LoRA-like pair: lora_down (random) and lora_up (zeros, as kohya initialises it)."""
    generator = torch.Generator().manual_seed(seed)
    down = torch.nn.Parameter(torch.randn(4, 16, generator=generator) * 0.1)
    return [{"params": [torch.nn.Parameter(torch.zeros(8, 4)), down], "name": "unet"}]


def _gradients(groups: list[dict], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=generator).to(p.device)


@pytest.mark.parametrize("strings", [[], ["scale_parameter=False", "relative_step=False", "warmup_init=False"]])
def test_adafactor_steps_as_transformers_adafactor_driven_directly(strings):
    """kohya's Adafactor: relative_step (default) gets lr=None; the GUI presets' relative_step=False gets train.lr."""
    from transformers.optimization import Adafactor

    ours_groups, direct_groups = _matrix_groups(), _matrix_groups()
    ours = optim.build_optimizer("adafactor", ours_groups, lr=1e-3, optimizer_args=strings)
    relative = not strings
    direct = Adafactor(direct_groups[0]["params"], lr=None if relative else 1e-3, scale_parameter=relative,
                       relative_step=relative, warmup_init=False)
    for step in range(3):
        _gradients(ours_groups, step)
        _gradients(direct_groups, step)
        ours.step()
        direct.step()
    for mine, theirs in zip(ours_groups[0]["params"], direct_groups[0]["params"], strict=True):
        assert torch.equal(mine, theirs)
    expected = ("transformers.optimization.Adafactor(relative_step=True)" if relative else
                "transformers.optimization.Adafactor(scale_parameter=False,relative_step=False,warmup_init=False)")
    assert optim.optimizer_description(ours) == expected


def test_adafactors_first_step_on_a_zero_lora_up_is_1e_3_times_1e_2(caplog):
    """relative_step: rho = min(1e-2, 1/sqrt(1)) scaled by max(eps2 = 1e-3, RMS(0)): every element of a zero lora_up
    moves by 1e-5 under a rank-one gradient (its factored update is sign(g)); the schedule reports that step size."""
    from lora_sweep.training import schedules

    caplog.set_level(logging.INFO)
    up = torch.nn.Parameter(torch.zeros(8, 4))
    groups = [{"params": [up], "name": "unet", "lr": 1e-4}]
    optimizer = optim.build_optimizer("adafactor", groups, lr=1e-4)
    assert "lr" not in optimizer.param_groups[0] or optimizer.param_groups[0]["lr"] is None  # kohya drops it
    scheduler = schedules.build_lr_scheduler(optimizer, "cosine", warmup_steps=0, total_steps=10)
    assert "the LR schedule is adafactor:0.0001" in caplog.text
    assert schedules.kohya_scheduler_name(optimizer, "cosine") == "adafactor:0.0001"
    assert optim.lr_metrics(optimizer) == {"train/lr": 1e-4}  # before any step AdafactorSchedule shows the lr
    up.grad = torch.outer(torch.linspace(-1.0, 1.0, 8) + 0.05, torch.tensor([1.0, -2.0, 0.5, 3.0]))
    optimizer.step()
    scheduler.step()
    assert torch.allclose(up.detach().abs(), torch.full((8, 4), 1e-5), rtol=1e-5, atol=0)
    assert optim.lr_metrics(optimizer)["train/lr"] == pytest.approx(1e-5)


def test_adafactor_follows_kohyas_argument_rules(caplog):
    caplog.set_level(logging.INFO)
    forced = optim.build_optimizer("Adafactor", _matrix_groups(), lr=1e-4,
                                   optimizer_args=["relative_step=False", "warmup_init=True"])
    assert forced.param_groups[0]["relative_step"] is True and "relative_step set to True" in caplog.text
    assert optim.optimizer_description(forced) == \
        "transformers.optimization.Adafactor(relative_step=True,warmup_init=True)"
    caplog.clear()
    two_lrs = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "name": n, "lr": lr}
               for n, lr in (("text_encoder", 5e-5), ("unet", 1e-4))]
    optim.build_optimizer("adafactor", two_lrs, lr=1e-4)
    assert "train.text_encoder_lr is ignored" in caplog.text
    with pytest.raises(ConfigError, match=r"'text_encoder' is 0, but Adafactor with relative_step=True ignores"):
        optim.check_learning_rates("adafactor", lr=1e-4, text_encoder_lr=0, train_text_encoder=True)
    optim.check_learning_rates("adafactor", lr=1e-4, text_encoder_lr=0, train_text_encoder=True,
                               args={"relative_step": False})
    plain = optim.build_optimizer("adafactor", _matrix_groups(), lr=1e-4, args={"relative_step": False})
    assert optim.kohya_advice(plain, scheduler="cosine", max_grad_norm=1.0) == [
        "Adafactor: train.max_grad_norm=1.0 clips gradients; kohya suggests 0",
        "Adafactor: optimizer.scheduler=cosine; kohya suggests constant_with_warmup"]


def test_sgd_nesterov_is_torch_sgd_with_kohyas_momentum():
    groups = _tensor_groups(None)
    optimizer = optim.build_optimizer("SGDNesterov", groups, lr=0.1)
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.SGD
    assert (group["nesterov"], group["momentum"], group["dampening"], group["weight_decay"]) == (True, 0.9, 0.0, 0.0)
    assert optim.optimizer_description(optimizer) == "torch.optim.sgd.SGD(momentum=0.9)"
    strings = optim.build_optimizer("sgd_nesterov", _tensor_groups(None), lr=0.1, optimizer_args=["momentum=0.5"])
    assert optim.optimizer_description(strings) == "torch.optim.sgd.SGD(momentum=0.5)"
    assert optim.optimizer_arg_problems("sgd_nesterov", {"nesterov": False}) == [
        "optimizer.args.nesterov is not allowed: optimizer=sgd_nesterov always passes nesterov=True (kohya's "
        "SGDNesterov)."]
    (refused,) = optim.optimizer_arg_problems("sgd_nesterov", {"momentum": 0.0})
    assert refused.startswith("optimizer.args.momentum=0.0: SGD (optimizer=sgd_nesterov) refuses it (ValueError: "
                              "Nesterov momentum requires a momentum")


def test_paged_adamw8bit_steps_as_adamw8bit_on_the_cpu():
    """bitsandbytes keeps a paged state in ordinary memory on the CPU (it warns), with AdamW8bit's kernels."""
    paged_groups, plain_groups = _matrix_groups(), _matrix_groups()
    paged = optim.build_optimizer("PagedAdamW8bit", paged_groups, lr=1e-3, args={"min_8bit_size": 16})
    plain = optim.build_optimizer("adamw8bit", plain_groups, lr=1e-3, args={"min_8bit_size": 16})
    assert type(paged).__name__ == "PagedAdamW8bit"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU"
        for step in range(3):
            _gradients(paged_groups, step)
            _gradients(plain_groups, step)
            paged.step()
            plain.step()
    for a, b in zip(paged_groups[0]["params"], plain_groups[0]["params"], strict=True):
        assert torch.equal(a, b)
    assert paged.state[paged_groups[0]["params"][0]]["state1"].dtype == torch.uint8
    assert optim.optimizer_description(paged) == "bitsandbytes.optim.adamw.PagedAdamW8bit(min_8bit_size=16)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged memory needs CUDA")
def test_paged_adamw8bit_steps_its_paged_state_as_adamw8bit_on_cuda():
    """bitsandbytes pages the state of tensors of 1e5 elements or more: a 512 x 256 lora_down here."""
    def groups():
        generator = torch.Generator().manual_seed(0)
        down = (torch.randn(512, 256, generator=generator) * 0.1).cuda().requires_grad_()
        return [{"params": [torch.zeros(8, 512, device="cuda", requires_grad=True), down], "name": "unet"}]

    paged_groups, plain_groups = groups(), groups()
    paged = optim.build_optimizer("paged_adamw8bit", paged_groups, lr=1e-3)
    plain = optim.build_optimizer("adamw8bit", plain_groups, lr=1e-3)
    for step in range(3):
        _gradients(paged_groups, step)
        _gradients(plain_groups, step)
        paged.step()
        plain.step()
    torch.cuda.synchronize()
    assert getattr(paged.state[paged_groups[0]["params"][1]]["state1"], "is_paged", False)
    for a, b in zip(paged_groups[0]["params"], plain_groups[0]["params"], strict=True):
        assert torch.equal(a, b)


def test_optimizer_args_strings_are_read_as_v087_reads_them():
    parsed = optim.parse_kohya_args(["betas=(0.9,0.99)", "relative_step=True", "beta1=None", "d_coef=2",
                                     "mode='fast'"], "optimizer.optimizer_args")
    assert parsed == {"betas": (0.9, 0.99), "relative_step": True, "beta1": None, "d_coef": 2, "mode": "fast"}
    with pytest.raises(ConfigError) as refused:
        optim.parse_kohya_args(["relative_step=true", "a=b=c", "decouple"], "optimizer.optimizer_args")
    assert refused.value.problems == [
        "optimizer.optimizer_args: 'relative_step=true': the value 'true' is not a Python literal, and kohya v0.8.7 "
        "reads values with ast.literal_eval: write True, False, None, numbers, tuples such as (0.9,0.99), and "
        "strings in quotes (relative_step='true').",
        "optimizer.optimizer_args: 'a=b=c' is not 'key=value' with exactly one '=' (kohya v0.8.7 splits each item "
        "on '=').",
        "optimizer.optimizer_args: 'decouple' is not 'key=value' with exactly one '=' (kohya v0.8.7 splits each item "
        "on '=').",
    ]


def test_optimizer_args_strings_merge_over_optimizer_args():
    defaults = dict(optim.OPTIMIZERS["adamw"].defaults)
    merged = optim.optimizer_arguments("adamw", defaults, ["weight_decay=0.1", "betas=(0.9,0.99)"])
    assert (merged.kwargs["weight_decay"], merged.kwargs["betas"]) == (0.1, (0.9, 0.99))
    assert merged.listed == {"weight_decay": 0.1, "betas": (0.9, 0.99)}
    optimizer = optim.build_optimizer("adamw", _tensor_groups(None), lr=1e-4, args=defaults,
                                      optimizer_args=["weight_decay=0.01", "betas=(0.9,0.99)"])
    # the reference's example: what the user passed, in their order, even a value equal to the default
    assert optim.optimizer_description(optimizer) == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    assert optim.optimizer_arg_problems("adamw", {**defaults, "weight_decay": 0.2}, ["weight_decay=0.1"]) == [
        "optimizer.args.weight_decay=0.2 and optimizer.optimizer_args weight_decay=0.1 disagree; set it one way."]
    assert optim.optimizer_arg_problems("adamw", {**defaults, "weight_decay": 0.1}, ["weight_decay=0.1"]) == []
    (unknown,) = optim.optimizer_arg_problems("adamw", defaults, ["weight_decai=0.1"])
    assert unknown.startswith("optimizer.optimizer_args weight_decai is not an argument of AdamW (optimizer=adamw). "
                              "Did you mean optimizer.optimizer_args weight_decay?")
    (value,) = optim.optimizer_arg_problems("adamw", defaults, ["eps=-1"])
    assert value.startswith("optimizer.optimizer_args eps=-1: AdamW (optimizer=adamw) refuses it (ValueError")


@pytest.mark.parametrize("name, built", [
    ("Lion", "lion_pytorch.Lion"), ("PagedAdamW", "bitsandbytes.optim.PagedAdamW"),
    ("SGDNesterov8bit", "bitsandbytes.optim.SGD8bit(nesterov=True)"), ("DAdaptLion", "dadaptation.DAdaptLion"),
    ("Adam", "torch.optim.Adam"), ("bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes.optim.AdEMAMix8bit"),
])
def test_kohya_optimizers_lora_sweep_does_not_ship_are_refused_by_name(name, built):
    with pytest.raises(ConfigError) as refused:
        optim.resolve_optimizer_name(name)
    assert str(refused.value).startswith(f"optimizer={name!r}: kohya v0.8.7 would build {built}, which lora-sweep "
                                         "does not ship")
    assert "'adafactor', 'adamw', 'adamw8bit'" in str(refused.value)


def test_each_options_defaults_are_its_classs_own_except_what_kohya_inserts():
    """So "set away from the default" is "given by the user", and ss_optimizer lists what kohya would."""
    for name, option in optim.OPTIMIZERS.items():
        optimizer_class = optim._load_class(option.import_path)
        signature = inspect.signature(optimizer_class.__init__).parameters
        own = {k: signature[k].default for k in option.defaults}
        inserted = {k: option.defaults[k] for k in option.inserted if own[k] != option.defaults[k]}
        assert {k: v for k, v in option.defaults.items() if k not in inserted} == \
            {k: v for k, v in own.items() if k not in inserted}, name
        assert inserted == ({"momentum": 0.9} if name == "sgd_nesterov" else {}), name
