"""lora_sweep.training.loss against values computed by hand from kohya's formulas (docs/kohya-reference.md §2, §3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import kohya_scheduler_alphas_cumprod

from lora_sweep.errors import ConfigError
from lora_sweep.training.loss import (
    LossOptions,
    LossTerms,
    check_loss_options,
    debiased_weight,
    elementwise_loss,
    huber_c,
    kohya_loss,
    min_snr_weight,
    one_timestep_per_batch,
    snr,
)

ABAR = kohya_scheduler_alphas_cumprod()
ALL_T = torch.arange(1000)
# The figures of docs/kohya-reference.md §2.
SNR_0, SNR_1, SNR_999 = 1175.5, 585.9, 0.00468


def _t(*values: int) -> torch.Tensor:
    return torch.tensor(values)


@pytest.fixture(scope="module")
def ddpm():
    from diffusers import DDPMScheduler  # imported here: the import alone takes seconds

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)


def test_alphas_cumprod_equal_diffusers_ddpm_scheduler(ddpm):
    reference = ddpm.alphas_cumprod
    assert ABAR.dtype == torch.float32 and ABAR.shape == (1000,)
    assert torch.equal(ABAR, reference)


def test_alphas_cumprod_by_hand_at_the_ends():
    beta_0 = 0.00085
    beta = [(math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2 for i in range(1000)]
    assert beta[0] == pytest.approx(beta_0) and beta[-1] == pytest.approx(0.012)
    assert ABAR[0].item() == pytest.approx(1 - beta_0, rel=1e-7)
    assert ABAR[999].item() == pytest.approx(math.prod(1 - b for b in beta), rel=1e-4)


def test_snr_matches_the_doc_figures():
    values = snr(ALL_T, ABAR)
    assert values[0].item() == pytest.approx(SNR_0, rel=1e-4)
    assert values[1].item() == pytest.approx(SNR_1, rel=1e-4)
    assert values[999].item() == pytest.approx(SNR_999, rel=1e-3)
    assert (values > 1000).nonzero().flatten().tolist() == [0]  # only t = 0 exceeds the debiased cap
    assert (values[1:] < values[:-1]).all()


def test_min_snr_weight_epsilon_gamma_5():
    weight = min_snr_weight(ALL_T, ABAR, 5.0)
    assert weight.shape == (1000,)
    assert weight[0].item() == pytest.approx(5 / SNR_0, rel=1e-4)  # ~0.00425
    assert weight[0].item() == pytest.approx(0.00425, abs=1e-5)
    assert (weight[147:] == 1).all() and (weight[:147] < 1).all()  # SNR <= 5 exactly from t = 147
    assert weight[100].item() == pytest.approx(5 / snr(_t(100), ABAR).item(), rel=1e-6)


def test_min_snr_weight_v_prediction_divides_by_snr_plus_one():
    weight = min_snr_weight(_t(0, 500, 999), ABAR, 5.0, v_prediction=True)
    snr_500 = snr(_t(500), ABAR).item()
    expected = [5 / (SNR_0 + 1), snr_500 / (snr_500 + 1), SNR_999 / (SNR_999 + 1)]  # min(SNR, 5) = SNR past t=147
    assert weight.tolist() == pytest.approx(expected, rel=1e-3)


def test_min_snr_weight_with_gamma_above_and_below_every_snr():
    snr_all = snr(ALL_T, ABAR)
    above = min_snr_weight(ALL_T, ABAR, 1e4)  # gamma > SNR_0: no capping at all
    assert torch.equal(above, torch.ones(1000))
    assert torch.allclose(min_snr_weight(ALL_T, ABAR, 1e4, v_prediction=True), snr_all / (snr_all + 1))
    below = min_snr_weight(ALL_T, ABAR, 1e-3)  # gamma < SNR_999: always capped
    assert torch.allclose(below, 1e-3 / snr_all, rtol=1e-6)
    assert below[999].item() == pytest.approx(1e-3 / SNR_999, rel=1e-3)


def test_debiased_weight_doc_values_and_same_for_v_prediction():
    timesteps = _t(0, 1, 500, 999)
    weight = debiased_weight(timesteps, ABAR)
    assert weight[0].item() == pytest.approx(1 / math.sqrt(1000), rel=1e-6)  # SNR_0 capped at 1000 -> 0.0316
    assert weight[1].item() == pytest.approx(1 / math.sqrt(SNR_1), rel=1e-4)
    assert weight[2].item() == pytest.approx(1.62, abs=0.005)
    assert weight[3].item() == pytest.approx(14.6, abs=0.05)
    assert weight[3].item() == pytest.approx(1 / math.sqrt(SNR_999), rel=1e-3)
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    eps = kohya_loss(pred, target, timesteps, ABAR, LossOptions(debiased=True))
    v = kohya_loss(pred, target, timesteps, ABAR, LossOptions(debiased=True, v_prediction=True))
    assert torch.equal(v.weight, eps.weight) and torch.equal(eps.weight, weight)  # v0.8.7: no v-pred variant


def test_huber_c_snr_schedule_doc_values():
    c = huber_c(_t(0, 100, 250, 500, 750, 999), ABAR, "snr", 0.1)
    assert c.dtype == torch.float32
    assert c.tolist() == pytest.approx([0.950, 0.598, 0.413, 0.231, 0.135, 0.1037], abs=6e-4)
    by_hand = (1 - 0.1) / (1 + 1 / math.sqrt(SNR_0)) ** 2 + 0.1  # sigma = 1 / sqrt(SNR)
    assert c[0].item() == pytest.approx(by_hand, rel=1e-5)


def test_huber_c_exponential_and_constant_schedules():
    c = huber_c(_t(0, 500, 999), ABAR, "exponential", 0.1)
    assert c.tolist() == pytest.approx([1.0, 0.1**0.5, 0.1**0.999], rel=1e-6)  # c**(t/1000)
    assert huber_c(_t(0, 999), ABAR, "constant", 0.1).tolist() == pytest.approx([0.1, 0.1])


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_c_at_its_bounds(schedule):
    ones = huber_c(_t(0, 500, 999), ABAR, schedule, 1.0)
    assert ones.tolist() == pytest.approx([1.0, 1.0, 1.0])
    tiny = huber_c(_t(0, 999), ABAR, schedule, 1e-6).tolist()
    expected = {
        "constant": [1e-6, 1e-6],
        "exponential": [1.0, 1e-6**0.999],
        "snr": [(1 - 1e-6) / (1 + 1 / math.sqrt(SNR_0)) ** 2 + 1e-6,
                (1 - 1e-6) / (1 + 1 / math.sqrt(SNR_999)) ** 2 + 1e-6],  # ~0.9445, ~0.0041
    }[schedule]
    assert tiny == pytest.approx(expected, rel=1e-3)


def test_elementwise_losses_closed_forms():
    a = torch.tensor([-3.0, -0.5, 0.0, 0.2, 1.0, 4.0])
    target = torch.zeros_like(a)
    c = 0.3
    assert elementwise_loss(a, target, "l2").tolist() == pytest.approx([x * x for x in a.tolist()])
    huber = elementwise_loss(a, target, "huber", c).tolist()
    smooth = elementwise_loss(a, target, "smooth_l1", c).tolist()
    for x, h, s in zip(a.tolist(), huber, smooth, strict=True):
        assert h == pytest.approx(2 * c * (math.sqrt(x * x + c * c) - c), rel=1e-5, abs=1e-7)
        assert s == pytest.approx(2 * (math.sqrt(x * x + c * c) - c), rel=1e-5, abs=1e-7)
    assert not torch.allclose(elementwise_loss(a, target, "smooth_l1", c),
                              torch.nn.functional.smooth_l1_loss(a, target, reduction="none", beta=c))


def test_elementwise_losses_asymptotes():
    c = 0.5
    small = torch.tensor([0.02, -0.015])  # |a| << c: the a**2 / (4 c**2) error and fp32 cancellation stay < 1e-3
    big = torch.tensor([500.0, -800.0])  # |a| >> c
    zero = torch.zeros(2)
    assert elementwise_loss(small, zero, "huber", c).tolist() == pytest.approx((small**2).tolist(), rel=1e-3)
    assert elementwise_loss(small, zero, "smooth_l1", c).tolist() == pytest.approx((small**2 / c).tolist(), rel=1e-3)
    assert elementwise_loss(big, zero, "huber", c).tolist() == pytest.approx(
        (2 * c * big.abs() - 2 * c * c).tolist(), rel=1e-5)
    assert elementwise_loss(big, zero, "smooth_l1", c).tolist() == pytest.approx((2 * big.abs() - 2 * c).tolist(),
                                                                                rel=1e-5)


def test_elementwise_loss_is_fp32_and_takes_per_sample_c():
    pred = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0)).half()
    target = torch.zeros(3, 4, 2, 2, dtype=torch.bfloat16)
    c = torch.tensor([0.1, 0.5, 1.0])
    out = elementwise_loss(pred, target, "huber", c)
    assert out.dtype == torch.float32 and out.shape == pred.shape
    for b in range(3):
        assert torch.equal(out[b], elementwise_loss(pred[b:b + 1], target[b:b + 1], "huber", c[b].item())[0])
    with pytest.raises(ValueError, match="huber_c"):
        elementwise_loss(pred, target, "huber")


def test_kohya_loss_l2_with_min_snr_and_debiased_by_hand():
    timesteps = _t(0, 500, 999)
    diff = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1).expand(3, 4, 2, 2)
    target = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    terms = kohya_loss(target + diff, target, timesteps, ABAR, LossOptions(min_snr_gamma=5.0, debiased=True))
    assert isinstance(terms, LossTerms)
    snr_500 = snr(_t(500), ABAR).item()
    weight = [5 / SNR_0 / math.sqrt(1000), 1 / math.sqrt(snr_500), 1 / math.sqrt(SNR_999)]  # min-SNR x debiased
    assert terms.raw_per_sample.tolist() == pytest.approx([1.0, 4.0, 9.0], rel=1e-5)
    assert terms.weight.tolist() == pytest.approx(weight, rel=1e-3)
    assert terms.per_sample.tolist() == pytest.approx([1 * weight[0], 4 * weight[1], 9 * weight[2]], rel=1e-3)
    assert terms.loss.item() == pytest.approx(sum(terms.per_sample.tolist()) / 3, rel=1e-6)
    assert torch.isnan(terms.huber_c).all()  # l2 uses no c


def test_kohya_loss_without_weights_is_plain_mse_and_sample_weights_apply():
    pred = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    target = torch.zeros_like(pred)
    terms = kohya_loss(pred, target, _t(3, 700), ABAR)
    assert torch.equal(terms.weight, torch.ones(2))
    assert terms.loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-6)
    weighted = kohya_loss(pred, target, _t(3, 700), ABAR, sample_weights=torch.tensor([1.0, 0.5]))
    assert weighted.per_sample.tolist() == pytest.approx([terms.per_sample[0].item(), 0.5 * terms.per_sample[1].item()])


def test_kohya_loss_v_prediction_uses_snr_plus_one():
    pred, target = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    terms = kohya_loss(pred, target, _t(0, 999), ABAR, LossOptions(min_snr_gamma=5.0, v_prediction=True))
    assert terms.weight.tolist() == pytest.approx([5 / (SNR_0 + 1), SNR_999 / (SNR_999 + 1)], rel=1e-3)


def test_kohya_loss_huber_one_timestep_gives_one_c_and_per_sample_gives_each_its_own():
    pred = torch.full((3, 4, 2, 2), 0.7)
    target = torch.zeros_like(pred)
    shared = kohya_loss(pred, target, _t(250, 250, 250), ABAR, LossOptions(loss_type="huber"))
    assert shared.huber_c.tolist() == pytest.approx([0.413] * 3, abs=6e-4)  # v0.8.7: one scalar c per batch
    c = shared.huber_c[0].item()
    assert shared.loss.item() == pytest.approx(2 * c * (math.sqrt(0.49 + c * c) - c), rel=1e-5)
    own = kohya_loss(pred, target, _t(0, 500, 999), ABAR,
                     LossOptions(loss_type="smooth_l1", huber_schedule="exponential"))
    assert own.huber_c.tolist() == pytest.approx([1.0, 0.1**0.5, 0.1**0.999], rel=1e-6)
    expected = [2 * (math.sqrt(0.49 + k * k) - k) for k in own.huber_c.tolist()]
    assert own.per_sample.tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss_type, per_sample, expected", [
    ("l2", False, False), ("l2", True, False), ("huber", False, True), ("huber", True, False),
    ("smooth_l1", False, True), ("smooth_l1", True, False)])
def test_one_timestep_per_batch_follows_v087(loss_type, per_sample, expected):
    assert one_timestep_per_batch(loss_type, per_sample) is expected


def test_valid_loss_options_pass():
    check_loss_options("l2", "snr", 0.1, None)
    check_loss_options("huber", "exponential", 1.0, 5.0, debiased=True, per_sample_timesteps=True)
    check_loss_options("smooth_l1", "constant", 1e-6, 0.5)


@pytest.mark.parametrize("args, kwargs, field", [
    (("mse", "snr", 0.1, None), {}, "loss.type"),
    (("huber", "linear", 0.1, None), {}, "loss.huber_schedule"),
    (("huber", "snr", 0.0, None), {}, "loss.huber_c"),
    (("huber", "snr", 1.5, None), {}, "loss.huber_c"),
    (("l2", "snr", float("inf"), None), {}, "loss.huber_c"),
    (("l2", "snr", 0.1, 0.0), {}, "loss.min_snr_gamma"),
    (("l2", "snr", 0.1, -5), {}, "loss.min_snr_gamma"),
    (("l2", "snr", 0.1, None), {"debiased": "true"}, "loss.debiased"),
    (("l2", "snr", 0.1, None), {"per_sample_timesteps": 1}, "loss.per_sample_timesteps"),
])
def test_bad_loss_options_raise_config_error_naming_the_field(args, kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_loss_options(*args, **kwargs)


def test_unknown_types_list_the_accepted_values():
    with pytest.raises(ConfigError, match="l2, huber, smooth_l1"):
        one_timestep_per_batch("l1", False)
    with pytest.raises(ConfigError, match="constant, exponential, snr"):
        huber_c(_t(0), ABAR, "cosine", 0.1)


# --- kohya's rounding, to the last bit -----------------------------------------------------------------------------
# kohya's constant/exponential huber_c is a Python float: c**2 and 2c are computed in double and rounded to fp32 once,
# where they meet the tensor. Its snr huber_c is an fp32 tensor. The figures below are kohya's values on a
# minimal input (pred 0.01, target 0, --huber_c 0.1), derived by hand with IEEE fp32 arithmetic (numpy), which is
# what CUDA computes. torch's CPU sqrt (MKL) is not always correctly rounded, so on the CPU the same derivation uses
# the device's own sqrt, exactly as kohya's code run on that CPU would.

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KOHYA_MINIMAL = {  # (schedule, t, loss type) -> kohya's loss, IEEE fp32 (the fp32-squared c gives the value after #)
    ("constant", 500, "huber"): 9.974986460292712e-05,  # 9.974986e-05; c**2 squared in fp32: 9.975136e-05
    ("constant", 500, "smooth_l1"): 0.000997498631477356,  # 9.975135e-04
    ("exponential", 1, "huber"): 0.00010014336294261739,  # 1.000244e-04
    ("exponential", 1, "smooth_l1"): 0.00010037422180175781,  # 1.002550e-04
    ("snr", 500, "huber"): 9.995231084758416e-05,  # snr: c is an fp32 tensor in kohya too
    ("snr", 500, "smooth_l1"): 0.0004321634769439697,
}


def _ieee_sqrt(x: np.float32) -> np.float32:
    return np.sqrt(np.float32(x))


def _device_sqrt(device: str):
    return lambda x: np.float32(torch.sqrt(torch.tensor(float(x), dtype=torch.float32, device=device)).item())


def _kohya_huber_c(schedule: str, t: int, c: float, device: str = "cpu") -> float:
    """kohya v0.8.7 `get_timesteps_and_huber_c`, its statements replayed: a Python float for constant and
    exponential; for snr the fp32 0-dim tensor kohya builds from noise_scheduler.alphas_cumprod[t], as a float."""
    if schedule == "constant":
        return c
    if schedule == "exponential":
        alpha = -math.log(c) / 1000
        return math.exp(-alpha * t)
    alphas_cumprod = ABAR.to(device)[t]
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return ((1 - c) / (1 + sigmas) ** 2 + c).item()


def _snr_c_by_hand(t: int, c: float, sqrt) -> float:
    """The snr c in fp32 step by step: `x / tensor` is torch's reciprocal(tensor) * x (Tensor.__rtruediv__)."""
    f = np.float32
    abar = f(ABAR[t].item())
    sigma = sqrt(f(f(f(1.0) - abar) / abar))
    square = f(f(1) + sigma) * f(f(1) + sigma)
    return float(f(f(f(1) / square) * f(1 - c)) + f(c))


def _conditional_loss_by_hand(a: float, c: float, loss_type: str, sqrt) -> float:
    """kohya `conditional_loss` for one element: every op rounded to fp32; c**2 and 2c computed in double from kohya's
    c and rounded once (for an fp32 c the double square is exact, so this is also fp32 arithmetic)."""
    f = np.float32
    a32 = f(a)
    total = f(f(a32 * a32) + f(c * c))
    diff = f(sqrt(total) - f(c))
    return float(f(f(2 * c) * diff) if loss_type == "huber" else f(f(2) * diff))


def test_the_figure_is_kohyas_ieee_value_and_fp32_squaring_misses_it():
    assert _conditional_loss_by_hand(0.01, 0.1, "huber", _ieee_sqrt) == pytest.approx(9.974986e-05, abs=5e-12)
    c32 = float(np.float32(0.1))  # c made fp32 first, then squared: c**2 = 0.0100000007 instead of 0.0099999998
    assert np.float32(0.1 * 0.1) == np.float32(0.0099999998) and np.float32(c32 * c32) == np.float32(0.0100000007)
    assert _conditional_loss_by_hand(0.01, c32, "huber", _ieee_sqrt) == pytest.approx(9.975136e-05, abs=5e-12)
    for (schedule, t, loss_type), value in KOHYA_MINIMAL.items():
        c = _snr_c_by_hand(t, 0.1, _ieee_sqrt) if schedule == "snr" else _kohya_huber_c(schedule, t, 0.1)
        assert _conditional_loss_by_hand(0.01, c, loss_type, _ieee_sqrt) == value


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule, t, loss_type", list(KOHYA_MINIMAL))
def test_huber_loss_is_kohyas_to_the_bit_on_the_minimal_input(device, schedule, t, loss_type):
    terms = kohya_loss(torch.full((1, 1, 1, 1), 0.01, device=device), torch.zeros(1, 1, 1, 1, device=device),
                       torch.tensor([t], device=device), ABAR.to(device),
                       LossOptions(loss_type=loss_type, huber_schedule=schedule, huber_c=0.1))
    sqrt = _device_sqrt(device)
    c = _kohya_huber_c(schedule, t, 0.1, device)
    if schedule == "snr":
        assert c == _snr_c_by_hand(t, 0.1, sqrt)  # kohya's snr statements, step by step on this device
    assert terms.huber_c.item() == np.float32(c)
    assert terms.loss.item() == _conditional_loss_by_hand(0.01, c, loss_type, sqrt)
    if device == "cuda":  # IEEE sqrt: the figure itself
        assert terms.loss.item() == KOHYA_MINIMAL[(schedule, t, loss_type)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_huber_loss_replays_kohyas_conditional_loss_bit_for_bit(device, schedule, loss_type):
    """Many elements and timesteps, against kohya's own statements (Python-float c, or the fp32 tensor for snr)."""
    gen = torch.Generator().manual_seed(3)
    pred = (torch.randn(1, 4, 16, 16, generator=gen) * 0.05).to(device)  # small |a|: c**2 matters most there
    target = (torch.randn(1, 4, 16, 16, generator=gen) * 0.01).to(device)
    for t in range(0, 1000, 37):
        c = _kohya_huber_c(schedule, t, 0.1, device)
        if schedule == "snr":  # kohya keeps the 0-dim fp32 tensor
            c = torch.tensor(c, dtype=torch.float32, device=device)
        if loss_type == "huber":  # kohya train_util.conditional_loss, verbatim
            expected = 2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)
        else:
            expected = 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
        terms = kohya_loss(pred, target, torch.tensor([t], device=device), ABAR.to(device),
                           LossOptions(loss_type=loss_type, huber_schedule=schedule, huber_c=0.1))
        assert torch.equal(terms.raw_per_sample, expected.mean([1, 2, 3])), t
        assert torch.equal(elementwise_loss(pred, target, loss_type, c), expected), t


def test_per_sample_huber_c_rounds_each_sample_like_kohyas_python_float():
    """Per-sample timesteps (newer sd-scripts' mode): each sample's c**2 is rounded once from its own double c."""
    pred = torch.full((3, 1, 1, 1), 0.01)
    timesteps = _t(1, 4, 14)  # t where rounding c**2 once and squaring fp32 c differ
    terms = kohya_loss(pred, torch.zeros_like(pred), timesteps, ABAR,
                       LossOptions(loss_type="huber", huber_schedule="exponential"))
    for b, t in enumerate(timesteps.tolist()):
        c = _kohya_huber_c("exponential", t, 0.1)
        assert terms.raw_per_sample[b].item() == _conditional_loss_by_hand(0.01, c, "huber", _device_sqrt("cpu"))
        assert terms.huber_c[b].item() == np.float32(c)
    c64 = huber_c(timesteps, ABAR, "exponential", 0.1, dtype=torch.float64)
    assert c64.tolist() == [_kohya_huber_c("exponential", t, 0.1) for t in timesteps.tolist()]  # math.exp, exactly
    assert torch.equal(huber_c(timesteps, ABAR, "exponential", 0.1), c64.float())  # the fp32 default
