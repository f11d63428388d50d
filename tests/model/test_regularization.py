"""kohya's dropouts and max-norm on real PEFT LoRA layers (Linear and Conv2d), each checked against v0.8.7's
arithmetic (networks/lora.py `LoRAModule.forward`, `apply_max_norm_regularization`) written out in the test."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lora_sweep.model.network import ADAPTER, set_lora_multiplier
from lora_sweep.model.regularization import (
    Dropouts,
    apply_max_norm_regularization,
    delta_weight,
    install_dropouts,
    kohya_ordered_layers,
    lora_layers,
    max_norm_regularizer,
)


class Stack(torch.nn.Module):
    """Three Linears in a row (each a LoRA target), or one strided 3x3 conv."""

    def __init__(self, conv: bool = False):
        super().__init__()
        if conv:
            self.conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
        else:
            self.a, self.b, self.c = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

    def forward(self, x):
        if hasattr(self, "conv"):
            return self.conv(x)
        return self.c(self.b(self.a(x)))


def lora_model(conv: bool = False, rank: int = 4, alpha: float = 2.0) -> torch.nn.Module:
    """The Stack with a PEFT LoRA on every layer, lora_B random (as after training), weights from seed 0."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = Stack(conv)
    targets = ["conv"] if conv else ["a", "b", "c"]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), model, adapter_name=ADAPTER)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B[ADAPTER].weight)
    return model.train()


def kohya_module(layer, x, *, p_net=None, p_rank=None, p_module=None, multiplier=1.0):
    """v0.8.7's LoRAModule.forward, transcribed: org -> module check -> down -> dropout -> rank mask -> up ->
    * multiplier * scale'."""
    down, up, base = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER], layer.base_layer
    scale = layer.lora_alpha[ADAPTER] / layer.r[ADAPTER]
    org = base(x)
    if p_module is not None and torch.rand(1) < p_module:
        return org
    lx = down(x)
    if p_net is not None:
        lx = F.dropout(lx, p=p_net)
    if p_rank is not None:
        mask = torch.rand((lx.size(0), layer.r[ADAPTER]), device=lx.device) > p_rank
        mask = mask.unsqueeze(1) if lx.dim() == 3 else mask.unsqueeze(-1).unsqueeze(-1) if lx.dim() == 4 else mask
        lx = lx * mask
        scale = scale * (1.0 / (1.0 - p_rank))
    return org + up(lx) * multiplier * scale


def kohya_stack(model, x, **dropouts):
    for layer in lora_layers(model):
        x = kohya_module(layer, x, **dropouts)
    return x


@pytest.mark.parametrize("shape", [(2, 7, 6), (3, 6)], ids=["tokens", "2d"])
@pytest.mark.parametrize("dropouts", [
    {"p_module": 0.5}, {"p_rank": 0.25}, {"p_net": 0.3}, {"p_net": 0.3, "p_rank": 0.5, "p_module": 0.2},
], ids=["module", "rank", "network", "all"])
def test_linear_forward_is_kohyas_arithmetic(shape, dropouts):
    model = lora_model()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    expected = kohya_stack(model, x, **dropouts)
    install_dropouts([model], Dropouts(dropouts.get("p_net"), dropouts.get("p_rank"), dropouts.get("p_module")))
    torch.manual_seed(7)
    assert torch.equal(model(x), expected)


def test_module_dropout_skips_the_modules_a_seeded_cpu_generator_picks():
    model = lora_model()
    install_dropouts([model], Dropouts(module=0.5))
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    draws = [torch.rand(1).item() for _ in range(3)]  # one per module, in execution order: a, b, c
    assert draws == pytest.approx([0.4963, 0.7682, 0.0885], abs=1e-4)  # < 0.5 skips: a and c
    torch.manual_seed(0)
    out = model(x)
    a, b, c = lora_layers(model)
    with torch.no_grad():
        assert torch.equal(out, c.base_layer(kohya_module(b, a.base_layer(x))))
    out.sum().backward()
    grads = {n.split(".")[0]: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert grads["a"] is None and grads["c"] is None and grads["b"] is not None  # None, not 0: no weight decay


def test_rank_dropout_masks_ranks_and_rescales_the_whole_output():
    model = lora_model(rank=4, alpha=2.0)
    layer = lora_layers(model)[0]
    install_dropouts([layer], Dropouts(rank=0.5))
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    mask = torch.rand((2, 4)) > 0.5
    assert mask.tolist() == [[False, True, False, False], [False, True, False, True]]
    torch.manual_seed(0)
    out = layer(x)
    down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    kept = down(x) * mask.unsqueeze(1)  # (B, 1, r) over the tokens
    assert torch.equal(out, layer.base_layer(x) + up(kept) * 1.0 * (0.5 * (1.0 / (1.0 - 0.5))))  # alpha/r / (1-p)


def test_network_dropout_drops_rank_space_neurons_with_inverted_scaling():
    model = lora_model(rank=4)
    layer = lora_layers(model)[0]
    install_dropouts([layer], Dropouts(network=0.5))
    with torch.no_grad():  # up = identity on the first 4 outputs: the output shows the dropped rank-space activation
        layer.lora_B[ADAPTER].weight.copy_(torch.eye(6, 4))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    out = layer(x)
    lx = layer.lora_A[ADAPTER](x)
    seen = (out - layer.base_layer(x))[:, :4] / layer.scaling[ADAPTER]
    dropped = seen == 0
    assert int(dropped.sum()) == 9  # of 20 neurons, for this seed
    assert torch.allclose(seen[~dropped], lx[~dropped] / 0.5)


def test_conv_forward_is_kohyas_arithmetic_with_a_per_channel_rank_mask():
    model = lora_model(conv=True, rank=4, alpha=1.0)
    layer = lora_layers(model)[0]
    assert layer.lora_A[ADAPTER].stride == (2, 2) and layer.lora_B[ADAPTER].kernel_size == (1, 1)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    org = F.conv2d(x, layer.base_layer.weight, layer.base_layer.bias, stride=2, padding=1)
    lx = F.conv2d(x, down, stride=2, padding=1) * (torch.rand((2, 4)) > 0.25)[:, :, None, None]  # (B, r, 1, 1)
    expected = org + F.conv2d(lx, up) * 1.0 * (0.25 * (1.0 / 0.75))
    install_dropouts([model], Dropouts(rank=0.25))
    torch.manual_seed(5)
    out = model(x)
    assert torch.allclose(out, expected, atol=1e-6)
    torch.manual_seed(5)
    assert torch.equal(out, kohya_module(layer, x, p_rank=0.25))


def test_the_multiplier_multiplies_before_the_scale_as_kohya():
    model = lora_model()
    set_lora_multiplier([model], 0.7)
    install_dropouts([model], Dropouts(rank=0.2))
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    expected = kohya_stack(model, x, p_rank=0.2, multiplier=0.7)
    torch.manual_seed(2)
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("dropouts, draw", [
    (Dropouts(module=0.0), (1,)), (Dropouts(rank=0.0), (2, 4)), (Dropouts(network=None, rank=None, module=None), (0,)),
], ids=["module", "rank", "null"])
def test_a_zero_still_draws_and_null_draws_nothing(dropouts, draw):
    model = lora_model()
    plain = copy.deepcopy(model)
    install_dropouts([model], dropouts)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    out = model(x)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    for _ in range(3):
        torch.rand(draw)  # what each of the three modules draws from torch's CPU generator
    assert torch.equal(after, torch.get_rng_state())
    assert torch.equal(out, plain(x))  # p = 0 changes no number


def test_eval_mode_draws_nothing_and_is_the_plain_lora():
    model = lora_model()
    plain = copy.deepcopy(model).eval()
    install_dropouts([model], Dropouts(0.3, 0.3, 0.3))
    model.eval()
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert torch.equal(model(x), plain(x))
    assert torch.equal(before, torch.get_rng_state())


def test_nothing_is_installed_with_every_dropout_off():
    model = lora_model()
    assert install_dropouts([model], Dropouts()) == 0
    assert all("forward" not in vars(layer) for layer in lora_layers(model))
    assert install_dropouts([model], Dropouts(rank=0.1)) == 3


def _unet_batch():
    generator = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(2, 4, 8, 8, generator=generator), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 8, 64, generator=generator),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=generator),
                                  "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)}}


def test_gradient_checkpointing_recomputes_the_same_masks(tiny_lora_unet):
    """diffusers' checkpointing (non-reentrant, preserve_rng_state) replays the draws: the same grads, the same RNG
    state after, as v0.8.7's reentrant checkpointing."""
    grads, states = [], []
    for checkpointing in (False, True):
        unet = copy.deepcopy(tiny_lora_unet).train()
        install_dropouts([unet], Dropouts(network=0.3, rank=0.4, module=0.2))
        if checkpointing:
            unet.enable_gradient_checkpointing()
        torch.manual_seed(11)
        unet(**_unet_batch()).sample.square().mean().backward()
        states.append(torch.get_rng_state())
        grads.append({n: p.grad for n, p in unet.named_parameters() if p.requires_grad})
    assert torch.equal(*states)
    assert grads[0].keys() == grads[1].keys()
    assert all((grads[0][n] is None and grads[1][n] is None) or torch.equal(grads[0][n], grads[1][n])
               for n in grads[0])
    assert sum(g is None for g in grads[0].values()) > 0  # module dropout skipped some modules


# max-norm: v0.8.7's apply_max_norm_regularization


def linear_lora(down: list, up: list, alpha: float) -> torch.nn.Module:
    """One PEFT LoRA Linear with the given lora_A (down) and lora_B (up) weights."""
    from peft import LoraConfig, inject_adapter_in_model

    down_t, up_t = torch.tensor(down), torch.tensor(up)
    model = torch.nn.Sequential(torch.nn.Linear(down_t.shape[1], up_t.shape[0]))
    inject_adapter_in_model(LoraConfig(r=down_t.shape[0], lora_alpha=alpha, target_modules=["0"]), model)
    layer = lora_layers(model)[0]
    with torch.no_grad():
        layer.lora_A[ADAPTER].weight.copy_(down_t)
        layer.lora_B[ADAPTER].weight.copy_(up_t)
    return layer


def test_a_module_over_max_norm_ends_at_exactly_max_norm():
    layer = linear_lora([[3.0, 4.0]], [[2.0]], alpha=1.0)  # ΔW = [[6, 8]], norm 10
    result = apply_max_norm_regularization([layer], 5.0)
    assert (result.keys_scaled, result.average_key_norm, result.max_key_norm) == (1, 5.0, 5.0)
    root = torch.tensor(0.5) ** 0.5  # both up and down by sqrt(5 / 10)
    assert torch.equal(layer.lora_A[ADAPTER].weight, torch.tensor([[3.0, 4.0]]) * root)
    assert torch.equal(layer.lora_B[ADAPTER].weight, torch.tensor([[2.0]]) * root)
    assert delta_weight(layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight).norm().item() == \
        pytest.approx(5.0, rel=1e-6)


def test_a_module_below_max_norm_stays_bit_identical_and_alpha_over_rank_counts():
    layer = linear_lora([[3.0, 4.0], [0.0, 0.0]], [[2.0, 1.0]], alpha=1.0)  # rank 2: scale 1/2, norm 5
    down, up = layer.lora_A[ADAPTER].weight.clone(), layer.lora_B[ADAPTER].weight.clone()
    result = apply_max_norm_regularization([layer], 6.0)
    assert (result.keys_scaled, result.average_key_norm, result.max_key_norm) == (0, 5.0, 5.0)
    assert torch.equal(layer.lora_A[ADAPTER].weight, down) and torch.equal(layer.lora_B[ADAPTER].weight, up)


def test_the_half_clamp_keeps_small_and_zero_modules_untouched():
    """norm is clamped at max_norm/2 before the ratio: a module far below (or an untrained one, up = 0, which
    would give 0/0) has ratio 1 and keeps its unclamped norm in the average."""
    small = linear_lora([[0.3, 0.4]], [[2.0]], alpha=1.0)  # norm 1 < 5 / 2
    untrained = linear_lora([[3.0, 4.0]], [[0.0]], alpha=1.0)
    big = linear_lora([[3.0, 4.0]], [[2.0]], alpha=1.0)  # norm 10
    result = apply_max_norm_regularization([small, untrained, big], 5.0)
    assert result.keys_scaled == 1
    assert result.average_key_norm == pytest.approx((1.0 + 0.0 + 5.0) / 3, rel=1e-6) and result.max_key_norm == 5.0
    assert torch.equal(untrained.lora_A[ADAPTER].weight, torch.tensor([[3.0, 4.0]]))


def test_a_3x3_conv_module_is_scaled_by_its_explicit_delta_weight():
    model = lora_model(conv=True, rank=4, alpha=1.0)
    layer = lora_layers(model)[0]
    down, up = layer.lora_A[ADAPTER].weight.detach().clone(), layer.lora_B[ADAPTER].weight.detach().clone()
    explicit = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down) * (1.0 / 4)  # (5, 3, 3, 3)
    assert torch.allclose(delta_weight(down, up) * 0.25, explicit, atol=1e-6)
    max_norm = explicit.norm().item() * 0.8
    result = apply_max_norm_regularization([layer], max_norm)
    assert result.keys_scaled == 1 and result.max_key_norm == pytest.approx(max_norm, rel=1e-6)
    after = delta_weight(layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight) * 0.25
    assert after.norm().item() == pytest.approx(max_norm, rel=1e-5)
    assert torch.allclose(after, explicit * 0.8, atol=1e-6)


def test_max_norm_is_off_at_null_and_zero_and_orders_layers_as_kohyas_state_dict(tiny_lora_unet):
    from lora_sweep.model.network import sgm_unet_name

    assert max_norm_regularizer(None, tiny_lora_unet) is None and max_norm_regularizer(0.0, tiny_lora_unet) is None
    names = {layer: name for name, layer in tiny_lora_unet.named_modules()}
    order = [sgm_unet_name(names[layer], 2) for layer in kohya_ordered_layers(tiny_lora_unet)]
    assert len(order) == len(lora_layers(tiny_lora_unet))
    assert order[:8] == [f"input_blocks.4.1.{m}" for m in (
        "proj_in", *(f"transformer_blocks.0.{a}" for a in (
            "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "attn2.to_q")))]
    assert order.index("middle_block.1.proj_in") < order.index("output_blocks.0.1.proj_in")
    assert math.isfinite(max_norm_regularizer(1.0, copy.deepcopy(tiny_lora_unet))().average_key_norm)
