"""kohya v0.8.7's attention switches, torch.compile and full fp16/bf16 on the tiny U-Net (docs/kohya-reference.md
"Other switches"); the full fp16 and compiled trainings need a GPU (tests/training/test_switches_cuda.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compose_config

from lora_sweep.checks.validate import config_problems
from lora_sweep.model import attention
from lora_sweep.training import precision, switches


def _run(unet) -> torch.Tensor:
    """The tiny U-Net's output on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    extra = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), ctx, added_cond_kwargs=extra).sample


def _small_lora_model() -> torch.nn.Module:
    """Two Linear layers with PEFT LoRA: the pieces the switches touch, at a size that compiles in a second."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    model.requires_grad_(False)
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["0", "2"])
    return inject_adapter_in_model(config, model)


def test_the_attention_switches_win_in_v087s_order():
    assert attention.attention_backend(sdpa=True, xformers=True, mem_eff_attn=True) == "mem_eff_attn"
    assert attention.attention_backend(sdpa=True, xformers=True, mem_eff_attn=False) == "xformers"
    assert attention.attention_backend(sdpa=True, xformers=False, mem_eff_attn=False) == "sdpa"
    assert attention.attention_backend(sdpa=False, xformers=False, mem_eff_attn=False) is None


def test_each_switch_sets_its_processors_and_sdpa_agrees_with_the_classic_product(tiny_lora_unet):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

    unet = copy.deepcopy(tiny_lora_unet)
    attention.set_attention_backend(unet, "sdpa")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    sdpa = _run(unet)
    classic = copy.deepcopy(tiny_lora_unet)
    attention.set_attention_backend(classic, None)  # none set: v0.8.7's baddbmm + softmax + bmm, not SDPA
    assert {type(p) for p in classic.attn_processors.values()} == {AttnProcessor}
    product = _run(classic)
    sliced = copy.deepcopy(tiny_lora_unet)
    attention.set_attention_backend(sliced, "mem_eff_attn")
    assert {type(p) for p in sliced.attn_processors.values()} == {SlicedAttnProcessor}
    # rounding only: measured 8.3e-07 on the output (docs/kohya-reference.md)
    assert torch.allclose(sdpa, product, atol=1e-5, rtol=0) and not torch.equal(sdpa, product)
    assert torch.equal(_run(sliced), product)  # the sliced product is the classic one, slice by slice
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        attention.set_attention_backend(unet, "flash")


def test_compile_keeps_the_module_and_its_numbers():
    """nn.Module.compile with aot_eager on PEFT LoRA layers: names kept, forward and LoRA grads equal eager's (a
    small model: compiling the tiny U-Net takes a minute on two cores)."""
    model = _small_lora_model()
    x = torch.randn(3, 8)

    def forward_backward():
        out = model(x)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return out.detach(), grads

    names = [n for n, _ in model.named_parameters()]
    eager, eager_grads = forward_backward()
    attention.compile_unet(model, "aot_eager")
    compiled, compiled_grads = forward_backward()
    assert [n for n, _ in model.named_parameters()] == names
    assert torch.allclose(compiled, eager, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(compiled_grads, eager_grads, strict=True))


def test_full_bf16_puts_lora_weights_grads_and_adamw_state_in_bf16():
    model = _small_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)  # made before the cast, as v0.8.7
    cfg = compose_config("precision=bf16", "precision.full_bf16=true")
    switches.cast_lora(params, switches.full_precision_dtype(cfg, precision.PRECISIONS["bf16"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(3, 8)).float().square().mean().backward()
    optimizer.step()
    state = optimizer.state[params[0]]
    assert {p.dtype for p in params} == {p.grad.dtype for p in params} == {torch.bfloat16}
    assert (state["exp_avg"].dtype, state["exp_avg_sq"].dtype) == (torch.bfloat16, torch.bfloat16)
    assert switches.full_precision_dtype(compose_config(), precision.PRECISIONS["fp32"]) is None


def test_full_fp16_unscales_fp16_grads_as_v087s_patched_scaler():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    weight.grad = torch.full((4,), 1024.0, dtype=torch.float16)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    plain = precision.make_grad_scaler(precision.PRECISIONS["fp16"], "cpu")
    plain.scale(torch.ones(()))  # lazily makes its scale tensor
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        plain.unscale_(optimizer)
    full = precision.make_grad_scaler(precision.PRECISIONS["fp16"], "cpu", full_fp16=True)
    full.scale(torch.ones(()))
    full.unscale_(optimizer)
    assert torch.equal(weight.grad, torch.full((4,), 1024.0 / 65536.0, dtype=torch.float16))


@pytest.mark.parametrize(("overrides", "message"), [
    (["precision.full_fp16=true"], "precision.full_fp16 = true needs precision fp16 or fp8 (kohya v0.8.7's "
                                   "--full_fp16 requires --mixed_precision fp16), but precision is fp32."),
    (["precision=fp16", "precision.full_bf16=true"], "precision.full_bf16 = true needs precision bf16 or fp8_bf16"),
    (["precision=bf16", "precision.full_bf16=true", "precision.full_fp16=true"], "both true: set one"),
    (["train.dynamo_backend=tvm"], "train.dynamo_backend = 'tvm' is not one of kohya v0.8.7's --dynamo_backend "
                                   "choices"),
    (["train.torch_compile=true", "train.dynamo_backend=onnxrt"], "train.dynamo_backend = 'onnxrt' is not a "
                                                                  "torch.compile backend of torch"),
])
def test_switches_are_refused_before_the_model_loads(overrides, message):
    assert any(message in p for p in config_problems(compose_config(*overrides))), config_problems(
        compose_config(*overrides))


@pytest.mark.skipif(attention.xformers_available(), reason="xformers is installed here")
def test_xformers_is_refused_when_not_installed():
    problems = config_problems(compose_config("train.xformers=true"))
    assert any(p.startswith("train.xformers = true needs the xformers package, which is not installed here")
               for p in problems)
    assert not config_problems(compose_config("train.xformers=true", "train.mem_eff_attn=true"))  # it wins
    assert not config_problems(compose_config("train.dynamo_backend=onnxrt"))  # only compiling needs it here
    assert not config_problems(compose_config("precision=bf16", "precision.full_bf16=true", "train.sdpa=true",
                                              "train.torch_compile=true", "train.dynamo_backend=aot_eager"))
