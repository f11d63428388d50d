"""Precision policies on a real tiny SDXL-shaped diffusers UNet with a PEFT LoRA, trained on CPU."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lora_sweep.errors import ConfigError
from lora_sweep.training import precision


def _batch(dtype: torch.dtype, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=generator).to(dtype),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 8, 64, generator=generator).to(dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 32, generator=generator).to(dtype),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2).to(dtype),
        },
    }


def _loss(unet: torch.nn.Module, policy: precision.PrecisionPolicy, seed: int = 1) -> torch.Tensor:
    batch = _batch(policy.latent_dtype, seed)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed + 100))
    with precision.autocast(policy, "cpu"):
        prediction = unet(**batch).sample
    return F.mse_loss(prediction.float(), target)  # accelerate hands the loss fp32 output too


def _lora_params(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def _prepared(unet: torch.nn.Module, name: str) -> tuple[torch.nn.Module, precision.PrecisionPolicy]:
    policy = precision.precision_policy(name, "cpu")
    model = copy.deepcopy(unet)
    precision.apply_base_precision(model, policy)
    return model, policy


def _update(scaler, optimizer, params, max_grad_norm: float) -> bool:
    """The training loop's update (lora_sweep.training.train.train): unscale, one norm, clip, the scaler's step;
    True if the optimizer stepped (the loop reads a shrunk scale as a skipped step)."""
    params = list(params)
    precision.clip_grads(params, max_grad_norm, precision.unscaled_grad_norm(scaler, optimizer, params))
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale


@pytest.mark.parametrize("name", list(precision.PRECISIONS))
def test_each_precision_trains_the_lora_on_cpu(tiny_lora_unet: torch.nn.Module, name: str) -> None:
    unet, policy = _prepared(tiny_lora_unet, name)
    lora = _lora_params(unet)
    before = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-3)
    scaler = precision.make_grad_scaler(policy, "cpu")
    for step in range(2):
        loss = _loss(unet, policy, seed=step)
        assert math.isfinite(loss.item())
        scaler.scale(loss).backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.values())
        assert sum(p.grad.abs().sum().item() for p in lora.values()) > 0
        assert _update(scaler, optimizer, lora.values(), max_grad_norm=1.0)
        optimizer.zero_grad(set_to_none=True)
    assert all(not torch.equal(before[n], p) for n, p in lora.items())
    assert {p.dtype for p in lora.values()} == {torch.float32}
    base = [p for n, p in unet.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base} == {policy.weight_dtype}
    # mem/base_weights_bytes: 4 bytes a weight in fp32, 2 in fp16/bf16, 1 in fp8 (the UNet has no float buffers)
    assert precision.base_weight_bytes(unet) == sum(p.numel() for p in base) * policy.weight_dtype.itemsize


def test_fp8_base_stores_float8_and_computes_like_a_per_op_upcast(tiny_lora_unet: torch.nn.Module) -> None:
    fp8_unet, fp8_policy = _prepared(tiny_lora_unet, "fp8")
    names_before = list(tiny_lora_unet.state_dict())
    loss = _loss(fp8_unet, fp8_policy)
    loss.backward()
    base = {n: p for n, p in fp8_unet.named_parameters() if "lora_" not in n}
    assert {p.dtype for p in base.values()} == {torch.float8_e4m3fn}  # still fp8 after forward and backward
    assert all(isinstance(p, torch.nn.Parameter) for p in base.values())
    assert list(fp8_unet.state_dict()) == names_before
    assert {p.dtype for p in _lora_params(fp8_unet).values()} == {torch.float32}
    fp8_grads = {n: p.grad for n, p in _lora_params(fp8_unet).items()}
    assert all(g.abs().sum() > 0 for n, g in fp8_grads.items() if "lora_B" in n)  # lora_B starts at 0: A's grad is 0

    # kohya on CUDA: fp8 weights cast to fp16 per op by autocast. e4m3fn is exact in fp16, so an fp16 model holding
    # the fp8-rounded weights must give the same numbers.
    rounded = copy.deepcopy(tiny_lora_unet)
    for n, p in rounded.named_parameters():
        if "lora_" not in n:
            p.data = p.data.to(torch.float8_e4m3fn).float()
    fp16_unet, fp16_policy = _prepared(rounded, "fp16")
    reference = _loss(fp16_unet, fp16_policy)
    reference.backward()
    assert loss.item() == reference.item()
    for n, p in _lora_params(fp16_unet).items():
        torch.testing.assert_close(fp8_grads[n], p.grad)


def test_base_weight_bytes_order_and_what_counts() -> None:
    sizes = {name: policy.weight_dtype.itemsize for name, policy in precision.PRECISIONS.items()}
    assert sizes["fp32"] > sizes["bf16"] == sizes["fp16"] > sizes["fp8"] == sizes["fp8_bf16"]
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GroupNorm(2, 4))
    model.register_buffer("scale", torch.ones(3))
    model.register_buffer("index", torch.arange(5))  # integer buffers are not weights
    assert precision.base_weight_bytes(model) == (16 + 4 + 8 + 3) * 4


def test_fp16_scaler_skips_an_overflowing_step_and_says_so(tiny_lora_unet: torch.nn.Module) -> None:
    unet, policy = _prepared(tiny_lora_unet, "fp16")
    lora = _lora_params(unet)
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-3)
    scaler = precision.make_grad_scaler(policy, "cpu")
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    scaler.scale(_loss(unet, policy)).backward()
    next(iter(lora.values())).grad[0, 0] = math.inf  # what an fp16 overflow leaves behind
    before = {n: p.detach().clone() for n, p in lora.items()}
    stepped = _update(scaler, optimizer, lora.values(), max_grad_norm=1.0)
    assert not stepped
    assert all(torch.equal(before[n], p) for n, p in lora.items())
    assert scaler.get_scale() == 2.0**15
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(_loss(unet, policy)).backward()
    assert _update(scaler, optimizer, lora.values(), max_grad_norm=1.0)
    assert any(not torch.equal(before[n], p) for n, p in lora.items())


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_clipping_sees_unscaled_grads(tiny_lora_unet: torch.nn.Module, name: str) -> None:
    unet, policy = _prepared(tiny_lora_unet, name)
    lora = list(_lora_params(unet).values())
    optimizer = torch.optim.SGD(lora, lr=0.0)
    scaler = precision.make_grad_scaler(policy, "cpu")
    scaler.scale(_loss(unet, policy)).backward()
    assert _update(scaler, optimizer, lora, max_grad_norm=1e-4)
    total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in lora]))
    assert total_norm.item() == pytest.approx(1e-4, rel=1e-3)


@pytest.mark.parametrize("name", ["fp32", "fp8"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_lora_unet: torch.nn.Module, name: str) -> None:
    results = []
    for checkpointing in (False, True):
        unet, policy = _prepared(tiny_lora_unet, name)
        if checkpointing:
            precision.enable_gradient_checkpointing(unet)
            assert unet.is_gradient_checkpointing
        loss = _loss(unet, policy)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in _lora_params(unet).items()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    for n, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[n], grad, rtol=1e-4, atol=1e-6)


def test_lora_and_trainable_params_and_fp8_embeddings_keep_their_dtype() -> None:
    model = torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(10, 8), "norm": torch.nn.LayerNorm(8), "proj": torch.nn.Linear(8, 8),
        "lora_A": torch.nn.Linear(8, 2, bias=False), "head": torch.nn.Linear(8, 1),
    })
    model.requires_grad_(False)
    model["lora_A"].requires_grad_(True)
    model["head"].requires_grad_(True)  # a trainable non-LoRA param is left alone
    policy = precision.precision_policy("fp8_bf16", "cpu")
    precision.apply_base_precision(model, policy)
    assert model["embed"].weight.dtype == torch.bfloat16  # kohya keeps embeddings out of fp8
    assert model["norm"].weight.dtype == model["proj"].weight.dtype == torch.float8_e4m3fn
    assert model["lora_A"].weight.dtype == model["head"].weight.dtype == torch.float32
    with precision.autocast(policy, "cpu"):
        hidden = model["proj"](model["norm"](model["embed"](torch.tensor([1, 2]))))
        out = model["head"](hidden) + model["lora_A"](hidden).sum()
    out.sum().backward()
    assert model["head"].weight.grad.abs().sum() > 0 and model["lora_A"].weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="already"):
        precision.apply_base_precision(model, policy)


def test_policies_match_kohya_flags() -> None:
    fp8, fp8_bf16 = precision.PRECISIONS["fp8"], precision.PRECISIONS["fp8_bf16"]
    assert (fp8.fp8_base, fp8.compute_dtype, fp8.mixed_precision, fp8.needs_grad_scaler) == (
        True, torch.float16, "fp16", True)
    assert (fp8_bf16.compute_dtype, fp8_bf16.latent_dtype, fp8_bf16.needs_grad_scaler) == (
        torch.bfloat16, torch.bfloat16, False)
    assert [p.needs_grad_scaler for p in precision.PRECISIONS.values()] == [False, True, False, True, False]
    assert not precision.make_grad_scaler(precision.PRECISIONS["bf16"], "cpu").is_enabled()
    with precision.autocast(precision.PRECISIONS["fp32"], "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with precision.autocast(fp8, "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    assert precision.peak_gpu_memory_bytes() is None  # no CUDA on the test machine


def test_invalid_precisions_fail_clearly() -> None:
    with pytest.raises(ConfigError, match=r"precision='fp4'.*'bf16', 'fp16', 'fp32', 'fp8', 'fp8_bf16'"):
        precision.precision_policy("fp4", "cpu")
    fp8_without_compute = dataclasses.replace(precision.PRECISIONS["fp8"], name="fp8_f64", compute_dtype=torch.float64)
    with pytest.raises(ConfigError, match="fp8, which needs a compute dtype"):
        precision.check_policy_supported(fp8_without_compute, "cpu")
    fp32_autocast = dataclasses.replace(precision.PRECISIONS["fp16"], name="x", compute_dtype=torch.float32)
    with pytest.raises(ConfigError, match="autocast does not support"):
        precision.check_policy_supported(fp32_autocast, "cpu")


def test_fp8_backward_keeps_stored_weights_instead_of_upcast_copies(tiny_lora_unet, monkeypatch) -> None:
    """precision.autocast makes autograd keep the fp8 weight (and cast it again in backward) where an op saves its
    upcast copy or a view of it (a Linear's `weight.t()`): the same gradients, without the U-Net's upcast weights
    alive between forward and backward."""
    unet, policy = _prepared(tiny_lora_unet, "fp8")
    unpacked: list[bool] = []
    recast = precision._recast_saved
    monkeypatch.setattr(precision, "_recast_saved", lambda saved: (
        unpacked.append(isinstance(saved, precision._Recast)), recast(saved))[1])

    def grads(context) -> dict[str, torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        batch = _batch(policy.latent_dtype)
        with context:
            prediction = unet(**batch).sample
        prediction.float().square().mean().backward()
        return {n: p.grad.clone() for n, p in _lora_params(unet).items()}

    ours = grads(precision.autocast(policy, "cpu"))
    plain = grads(torch.autocast("cpu", dtype=policy.compute_dtype))  # the upcast copies themselves saved
    assert ours.keys() == plain.keys() and all(torch.equal(ours[n], plain[n]) for n in ours)
    fp8_linears = sum(1 for m in unet.modules() if isinstance(m, torch.nn.Linear)
                      and m.weight.dtype == torch.float8_e4m3fn)
    assert sum(unpacked) >= fp8_linears  # every fp8 Linear's weight came back by a recast, not a kept copy
    assert not precision._UPCAST_COPIES  # nothing left registered after the forward


def test_one_precomputed_total_norm_clips_exactly_like_clip_grad_norm() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 7, 3)]
    grads = [torch.randn(p.shape) * 10 for p in params]
    clipped = {}
    for how in ("clip_grad_norm_", "precomputed"):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        if how == "precomputed":
            precision.clip_grads(params, 1.0, precision.grad_total_norm(params))
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        clipped[how] = [p.grad.clone() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(clipped["clip_grad_norm_"], clipped["precomputed"], strict=True))
    assert float(torch.linalg.vector_norm(torch.cat(clipped["precomputed"]))) == pytest.approx(1.0, rel=1e-5)
    precision.clip_grads(params, 0.0, precision.grad_total_norm(params))  # 0: off
    assert all(torch.equal(p.grad, c) for p, c in zip(params, clipped["precomputed"], strict=True))
    assert precision.grad_total_norm([torch.nn.Parameter(torch.ones(2))]) is None  # no grads, no norm


def test_one_norm_checks_every_gradient_and_names_the_bad_one() -> None:
    from types import SimpleNamespace

    from lora_sweep.training.train import NonFiniteGuard, NonFiniteLoss

    lora = {f"unet.l{i}.lora_A.weight": torch.nn.Parameter(torch.ones(3)) for i in range(4)}
    s = SimpleNamespace(scaler=precision.make_grad_scaler(precision.PRECISIONS["bf16"], "cpu"), lora=lora)
    guard = NonFiniteGuard("stop", 10, kept=lambda: None)
    params = list(lora.values())
    for p in params:
        p.grad = torch.ones(3)
    assert guard.gradients_are_finite(s, precision.grad_total_norm(params), 1, 0)
    for p in params:
        p.grad = torch.full((3,), 3e38)  # finite, but the sum of squares overflows: the step goes on, as before
    norm = precision.grad_total_norm(params)
    assert not torch.isfinite(norm) and guard.gradients_are_finite(s, norm, 1, 0)
    lora["unet.l2.lora_A.weight"].grad = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(NonFiniteLoss, match=r"gradient of unet\.l2\.lora_A\.weight is not finite at optimizer step 1"):
        guard.gradients_are_finite(s, precision.grad_total_norm(params), 1, 0)
