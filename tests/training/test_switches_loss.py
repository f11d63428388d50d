"""loss.zero_terminal_snr and the v-prediction loss scalings against v0.8.7's formulas computed here
(custom_train_functions.py: fix_noise_scheduler_betas_for_zero_terminal_snr, get_snr_scale; docs/kohya-reference.md)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config, kohya_scheduler_alphas_cumprod

from lora_sweep.checks.validate import config_problems
from lora_sweep.training.loss import LossOptions, kohya_loss, snr_scale
from lora_sweep.training.noise import zero_terminal_snr_alphas_cumprod

ABAR = kohya_scheduler_alphas_cumprod()


def _betas() -> torch.Tensor:
    return torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2  # scaled_linear, as diffusers


def test_zero_terminal_snr_alphas_cumprod_follow_the_formula():
    new = zero_terminal_snr_alphas_cumprod(_betas())
    old = [1.0 - b for b in _betas().double().tolist()]
    root = [math.sqrt(math.prod(old[: t + 1])) for t in range(1000)]
    first, last = root[0], root[-1]
    expected = [((r - last) * first / (first - last)) ** 2 for r in root]
    assert new.dtype == torch.float32 and new[999].item() == 0.0
    for t in (0, 500, 999):
        assert new[t].item() == pytest.approx(expected[t], rel=1e-5, abs=1e-9)
    assert new[0].item() == pytest.approx(ABAR[0].item(), rel=1e-6)  # the first keeps its value
    assert (new[500].item(), new[998].item()) == pytest.approx((0.24102, 1.968e-7), rel=1e-4)  # docs figures


def test_snr_scale_caps_snr_at_1000():
    t = torch.tensor([0, 500, 999])
    snr = (ABAR / (1 - ABAR))[t].double()
    capped = torch.clamp(snr, max=1000.0)
    assert torch.allclose(snr_scale(t, ABAR).double(), capped / (capped + 1), rtol=1e-6)
    assert snr_scale(t, ABAR)[0].item() == pytest.approx(1000 / 1001, rel=1e-6)


def _loss(options: LossOptions, **kwargs) -> torch.Tensor:
    pred = torch.full((3, 4, 2, 2), 0.5)
    target = torch.zeros(3, 4, 2, 2)
    return kohya_loss(pred, target, torch.tensor([0, 500, 999]), ABAR, options, **kwargs).per_sample


def test_v_pred_scalings_in_v087_order():
    t = torch.tensor([0, 500, 999])
    s = snr_scale(t, ABAR)
    raw = torch.full((3,), 0.25)
    scaled = _loss(LossOptions(v_prediction=True, scale_v_pred_loss_like_noise_pred=True))
    assert torch.equal(scaled, raw * s)
    added = _loss(LossOptions(v_pred_like_loss=0.5))
    assert torch.equal(added, raw + raw / s * 0.5)
    assert added[0].item() == pytest.approx(0.25 * (1 + 0.5 * 1001 / 1000), rel=1e-6)
    # min-SNR first, then the scale, then debiased (train_network.py's order)
    snr = (ABAR / (1 - ABAR))[t]
    both = _loss(LossOptions(v_prediction=True, min_snr_gamma=5.0, debiased=True,
                             scale_v_pred_loss_like_noise_pred=True))
    min_snr = torch.clamp(snr, max=5.0) / (snr + 1)
    debiased = 1 / torch.sqrt(torch.clamp(snr, max=1000.0))
    assert torch.allclose(both, raw * min_snr * s * debiased, rtol=1e-6)


def test_snr_weights_read_the_old_schedule_and_huber_the_new():
    new = zero_terminal_snr_alphas_cumprod(_betas())
    options = LossOptions(min_snr_gamma=5.0, v_prediction=True)
    assert torch.equal(_loss(options, snr_alphas_cumprod=ABAR), _loss(options))  # all_snr stays the old one
    huber = kohya_loss(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([999]), new,
                       LossOptions(loss_type="huber", huber_c=0.1), snr_alphas_cumprod=ABAR)
    assert huber.huber_c.item() == pytest.approx(0.1)  # sigma_999 = inf: c = huber_c


def test_v_pred_scalings_refused_as_v087_refuses_them():
    lone = config_problems(compose_config("loss.scale_v_pred_loss_like_noise_pred=true"))
    assert any("loss.scale_v_pred_loss_like_noise_pred = true needs model.v_prediction = true" in p for p in lone)
    both = config_problems(compose_config("loss.v_pred_like_loss=0.2", "model.v_prediction=true"))
    assert any("loss.v_pred_like_loss = 0.2 cannot be used with model.v_prediction = true" in p for p in both)
    assert not config_problems(compose_config("loss.v_pred_like_loss=0", "model.v_prediction=true"))
    assert not config_problems(compose_config("loss.scale_v_pred_loss_like_noise_pred=true",
                                              "model.v_prediction=true", "loss.zero_terminal_snr=true"))

