"""lora_sweep.training.noise against hand-written replays of kohya v0.8.7's draw sequence and against diffusers.

Reference: docs/kohya-reference.md §1. All on CPU, where the "device" RNG and the CPU RNG are
the same stream, so a replay checks the order of every draw.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import kohya_scheduler_alphas_cumprod
from torch import nn

from lora_sweep.errors import ConfigError
from lora_sweep.training.noise import (
    NoiseOptions,
    NoisyLatents,
    add_noise,
    apply_noise_offset,
    check_noise_options,
    kohya_noisy_latents,
    pyramid_noise,
    sample_timesteps,
    scale_cached_latents,
    velocity_target,
)
from lora_sweep.training.precision import PRECISIONS

ABAR = kohya_scheduler_alphas_cumprod()


def _seed_global_rngs(seed: int) -> None:
    """Seed Python's and torch's global RNGs, as accelerate's set_seed does for kohya."""
    random.seed(seed)
    torch.manual_seed(seed)


def _latents(shape=(2, 4, 16, 16), seed=7, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(scope="module")
def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)


# --- noise offset ---------------------------------------------------------------------------------------------------

def test_apply_noise_offset_adds_one_fp32_normal_per_sample_and_channel():
    latents, noise = _latents(), _latents(seed=8)
    out = apply_noise_offset(latents, noise, 0.1, generator=torch.Generator().manual_seed(3))
    eta = torch.randn((2, 4, 1, 1), generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, noise + 0.1 * eta)
    shift = out - noise
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over h, w


def test_adaptive_scale_uses_abs_channel_mean_and_clamps_at_zero():
    # latents constant per (b, c): channel means are known by hand
    means = torch.tensor([[0.5, -0.2, 0.0, 1.0], [-1.0, 0.3, 0.1, -0.4]])
    latents = means[:, :, None, None].expand(2, 4, 8, 8).contiguous()
    noise = torch.zeros(2, 4, 8, 8)
    eta = torch.randn((2, 4, 1, 1), generator=torch.Generator().manual_seed(5))
    for adaptive in (0.2, -0.25):
        out = apply_noise_offset(latents, noise, 0.05, adaptive, generator=torch.Generator().manual_seed(5))
        strength = (0.05 + adaptive * means.abs()).clamp(min=0.0)  # e.g. 0.05 - 0.25*1.0 -> 0
        assert torch.allclose(out[:, :, 0, 0], strength * eta[:, :, 0, 0], rtol=1e-6, atol=0)
    assert (strength == 0).sum() >= 2  # the negative case really hit the clamp


def test_offset_shift_has_std_equal_to_offset_over_samples_and_channels():
    latents = torch.zeros(512, 4, 2, 2)
    out = apply_noise_offset(latents, torch.zeros_like(latents), 0.1, generator=torch.Generator().manual_seed(0))
    per_bc = out[:, :, 0, 0]
    assert abs(per_bc.std().item() - 0.1) < 0.008  # 2048 draws: std error ~1.6 %
    assert abs(per_bc.mean().item()) < 0.01


def test_noise_is_drawn_in_latents_dtype_and_offset_promotes_to_fp32():
    latents = _latents(dtype=torch.bfloat16)
    plain = kohya_noisy_latents(latents, ABAR)
    assert plain.noise.dtype == torch.bfloat16
    with_offset = kohya_noisy_latents(latents, ABAR, NoiseOptions(offset=0.05))
    assert with_offset.noise.dtype == torch.float32  # bf16 eps + fp32 eta (kohya's side effect)


# --- pyramid ----------------------------------------------------------------------------------------------------------

def _pyramid_by_hand(noise: torch.Tensor, iterations: int, discount: float) -> tuple[torch.Tensor, int]:
    """kohya's pyramid_noise_like (docs/kohya-reference.md §1) on the global RNGs; returns (noise, levels used)."""
    b, c, h, w = noise.shape
    upsample = nn.Upsample(size=(h, w), mode="bilinear")
    acc = noise.clone()
    levels = 0
    for i in range(iterations):
        r = random.random() * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        acc += upsample(torch.randn(b, c, hn, wn)) * discount**i
        levels += 1
        if hn == 1 or wn == 1:
            break
    return acc / acc.std(), levels


def test_pyramid_replays_kohya_draws_on_global_rngs_and_stops_at_size_one():
    noise = _latents((2, 4, 16, 16))
    _seed_global_rngs(11)
    out = pyramid_noise(noise, 10, 0.3)
    after = (random.random(), torch.rand(1))
    _seed_global_rngs(11)
    expected, levels = _pyramid_by_hand(noise, 10, 0.3)
    assert torch.equal(out, expected)
    assert 2 <= levels < 10  # 16 / r**i reaches 1 long before 10 levels
    assert after == (random.random(), torch.rand(1))  # the same number of draws from both RNGs


def test_pyramid_has_unit_std_keeps_dtype_and_leaves_input_alone():
    noise = _latents((2, 4, 16, 16), dtype=torch.bfloat16)
    before = noise.clone()
    out = pyramid_noise(noise, 4, 0.3, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.bfloat16 and torch.equal(noise, before)
    fp32 = pyramid_noise(noise.float(), 4, 0.3, generator=torch.Generator().manual_seed(1))
    assert abs(fp32.std().item() - 1.0) < 1e-5  # one global, unbiased std


def _low_frequency_share(x: torch.Tensor, radius: int = 2) -> float:
    power = torch.fft.fft2(x).abs() ** 2
    k = torch.fft.fftfreq(x.shape[-1]) * x.shape[-1]
    low = (k.abs()[:, None] <= radius) & (k.abs()[None, :] <= radius)
    return (power[..., low].sum() / power.sum()).item()


def test_pyramid_raises_low_frequency_energy_over_white_noise():
    white = torch.randn((2, 4, 64, 64), generator=torch.Generator().manual_seed(2))
    white_share = _low_frequency_share(white)
    assert white_share == pytest.approx(25 / 4096, rel=0.4)  # flat spectrum: 25 of 4096 bins
    strong = pyramid_noise(white, 6, 0.8, generator=torch.Generator().manual_seed(3))
    assert _low_frequency_share(strong) > 10 * white_share  # measured ~35x
    default = pyramid_noise(white, 6, 0.3, generator=torch.Generator().manual_seed(3))
    assert _low_frequency_share(default) > 1.3 * white_share  # kohya's default discount: a mild lift (~1.9x)


def test_pyramid_with_generator_is_reproducible_and_touches_no_global_rng():
    noise = _latents()
    _seed_global_rngs(0)
    untouched = (random.random(), torch.rand(1))
    _seed_global_rngs(0)
    first = pyramid_noise(noise, 5, 0.3, generator=torch.Generator().manual_seed(9))
    assert (random.random(), torch.rand(1)) == untouched
    second = pyramid_noise(noise, 5, 0.3, generator=torch.Generator().manual_seed(9))
    other = pyramid_noise(noise, 5, 0.3, generator=torch.Generator().manual_seed(10))
    assert torch.equal(first, second) and not torch.equal(first, other)


# --- forward process ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_noise_and_velocity_equal_diffusers(ddpm, dtype):
    latents, noise = _latents(dtype=dtype), _latents(seed=9, dtype=dtype)
    timesteps = torch.tensor([0, 999])
    assert torch.equal(add_noise(latents, noise, timesteps, ABAR), ddpm.add_noise(latents, noise, timesteps))
    assert torch.equal(velocity_target(latents, noise, timesteps, ABAR), ddpm.get_velocity(latents, noise, timesteps))


def test_add_noise_by_hand_at_both_ends():
    latents, noise = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0)
    x_t = add_noise(latents, noise, torch.tensor([0, 999]), ABAR)
    a0, a999 = ABAR[0].item(), ABAR[999].item()  # 1 - 0.00085 and ~0.00466
    assert a0 == pytest.approx(1 - 0.00085, rel=1e-6) and a999 == pytest.approx(0.00466, rel=1e-2)
    assert x_t.flatten().tolist() == pytest.approx([2 * a0**0.5 - (1 - a0) ** 0.5, 2 * a999**0.5 - (1 - a999) ** 0.5])


# --- timesteps ------------------------------------------------------------------------------------------------------

def test_one_timestep_per_batch_repeats_a_single_cpu_draw():
    g = torch.Generator().manual_seed(4)
    shared = sample_timesteps(64, one_per_batch=True, min_timestep=100, max_timestep=200, device="cpu", generator=g)
    assert shared.dtype == torch.long and shared.shape == (64,) and (shared == shared[0]).all()
    per_sample = sample_timesteps(4096, one_per_batch=False, min_timestep=100, max_timestep=200, device="cpu",
                                  generator=g)
    assert per_sample.min() == 100 and per_sample.max() == 199  # randint excludes max
    assert len(per_sample.unique()) == 100


# --- the composed step ----------------------------------------------------------------------------------------------

ALL_ON = dict(offset=0.1, offset_random_strength=True, adaptive_scale=0.5, multires_iterations=3,
              multires_discount=0.3, ip_gamma=0.1, ip_gamma_random_strength=True, one_timestep_per_batch=True)


def test_kohya_noisy_latents_replays_kohya_rng_call_order_with_everything_on():
    b, c, h, w = 2, 4, 16, 16
    latents = _latents((b, c, h, w))
    _seed_global_rngs(123)
    out = kohya_noisy_latents(latents, ABAR, NoiseOptions(**ALL_ON))

    _seed_global_rngs(123)
    eps = torch.randn(b, c, h, w)                                         # 1. base noise
    s = torch.rand(1) * 0.1                                               # 2. offset strength
    s_bc = torch.clamp(s + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs(), 0.0, None)
    eps = eps + s_bc * torch.randn(b, c, 1, 1)                            # 3. offset field
    eps, _ = _pyramid_by_hand(eps, 3, 0.3)                                # 4. pyramid
    t = torch.randint(0, 1000, (1,)).repeat(b)                            # 5. one timestep (CPU)
    g = torch.rand(1) * 0.1                                               # 6. ip strength
    xi = torch.randn(b, c, h, w)                                          # 7. ip field
    abar = ABAR[t].view(b, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * (eps + g * xi)

    assert isinstance(out, NoisyLatents)
    assert torch.equal(out.noise, eps) and torch.equal(out.timesteps, t)
    assert torch.allclose(out.noisy_latents, x_t, rtol=1e-6, atol=1e-6)
    assert out.offset_strength == s.item() and out.ip_strength == g.item()
    assert 0 <= out.offset_strength < 0.1 and 0 <= out.ip_strength < 0.1


def test_kohya_noisy_latents_l2_path_draws_eps_then_per_sample_timesteps_only():
    latents = _latents((3, 4, 8, 8))
    torch.manual_seed(5)
    out = kohya_noisy_latents(latents, ABAR, NoiseOptions(min_timestep=10, max_timestep=20))
    torch.manual_seed(5)
    eps = torch.randn(3, 4, 8, 8)
    t = torch.randint(10, 20, (3,))
    assert torch.equal(out.noise, eps) and torch.equal(out.timesteps, t)
    assert torch.equal(out.noisy_latents, add_noise(latents, eps, t, ABAR))
    assert out.offset_strength == 0.0 and out.ip_strength == 0.0


def test_ip_perturbation_enters_noisy_latents_but_not_the_target():
    latents = _latents()
    with_ip = kohya_noisy_latents(latents, ABAR, NoiseOptions(ip_gamma=0.2), generator=torch.Generator().manual_seed(1))
    without = kohya_noisy_latents(latents, ABAR, generator=torch.Generator().manual_seed(1))
    assert torch.equal(with_ip.noise, without.noise) and torch.equal(with_ip.timesteps, without.timesteps)
    replay = torch.Generator().manual_seed(1)
    torch.randn(latents.shape, generator=replay), torch.randint(0, 1000, (2,), generator=replay)
    xi = torch.randn(latents.shape, generator=replay)  # the draw after the timesteps
    sigma = (1 - ABAR[with_ip.timesteps]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(with_ip.noisy_latents - without.noisy_latents, sigma * 0.2 * xi, atol=1e-6)
    assert with_ip.ip_strength == 0.2


def test_same_generator_seed_gives_same_draws_and_other_seed_differs():
    latents = _latents()
    runs = [kohya_noisy_latents(latents, ABAR, NoiseOptions(**ALL_ON), generator=torch.Generator().manual_seed(s))
            for s in (21, 21, 22)]
    for field in ("noise", "noisy_latents", "timesteps"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field))
    assert runs[0].offset_strength == runs[1].offset_strength != runs[2].offset_strength
    assert not torch.equal(runs[0].noise, runs[2].noise)


def test_fixed_strengths_are_reported_as_given():
    out = kohya_noisy_latents(_latents(), ABAR, NoiseOptions(offset=0.0357, ip_gamma=0.1),
                              generator=torch.Generator())
    assert (out.offset_strength, out.ip_strength) == (0.0357, 0.1)


# --- validation -----------------------------------------------------------------------------------------------------

def test_valid_noise_options_pass():
    check_noise_options()
    check_noise_options(**{k: v for k, v in ALL_ON.items() if k != "one_timestep_per_batch"})
    check_noise_options(offset=0.05, adaptive_scale=-0.01, multires_discount=1.0)


@pytest.mark.parametrize("options, field", [
    (dict(adaptive_scale=0.1), "noise.adaptive_scale"),
    (dict(offset=-0.1), "noise.offset"),
    (dict(offset=float("nan")), "noise.offset"),
    (dict(offset="0.1"), "noise.offset"),
    (dict(offset_random_strength=True), "noise.offset_random_strength"),
    (dict(offset=0.1, offset_random_strength="yes"), "noise.offset_random_strength"),
    (dict(multires_iterations=-1), "noise.multires_iterations"),
    (dict(multires_iterations=2.5), "noise.multires_iterations"),
    (dict(multires_discount=0.0), "noise.multires_discount"),
    (dict(multires_discount=1.5), "noise.multires_discount"),
    (dict(ip_gamma=-0.1), "noise.ip_gamma"),
    (dict(ip_gamma_random_strength=True), "noise.ip_gamma_random_strength"),
])
def test_bad_noise_options_raise_config_error_naming_the_field(options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_noise_options(**options)


# --- kohya's draws, casts and dtypes, to the last bit --------------------------------------------------------------

def _bf16(x: float) -> float:
    """Round an fp32 value to bfloat16 by hand (round to nearest, ties to even), back as a float."""
    bits = int(np.float32(x).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return float(np.uint32(bits).view(np.float32))


def _f16(x: float) -> float:
    return float(np.float16(np.float32(x)))


LATENT_DTYPES = {name: policy.latent_dtype for name, policy in PRECISIONS.items()}


def test_kohyas_weight_dtype_per_precision():
    """kohya prepare_dtype: weight_dtype follows --mixed_precision; --fp8_base stores the U-Net in fp8 but leaves it."""
    assert LATENT_DTYPES == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                             "fp8": torch.float16, "fp8_bf16": torch.bfloat16}


@pytest.mark.parametrize("name", sorted(PRECISIONS))
def test_cached_latents_are_cast_to_weight_dtype_then_scaled(name):
    """kohya train_network.py: latents.to(dtype=weight_dtype), then latents * vae_scale_factor (0.13025 for SDXL).
    A reduced-precision product is computed in fp32 from the rounded latent and rounded again (torch's opmath)."""
    dtype = LATENT_DTYPES[name]
    f, scale = np.float32, 0.13025
    by_hand = {
        torch.float32: float(f(f(1.1) * f(scale))),
        torch.float16: _f16(f(_f16(1.1)) * f(scale)),  # 1.1 -> 1.099609375, * 0.13025 -> 0.1431884765625
        torch.bfloat16: _bf16(f(_bf16(1.1)) * f(scale)),  # 1.1 -> 1.1015625, * 0.13025 -> 0.1435546875
    }[dtype]
    cached = torch.tensor([1.1]).view(1, 1, 1, 1)  # the cache holds fp32
    x0 = scale_cached_latents(cached, scale, dtype)
    assert x0.dtype == dtype and x0.item() == by_hand
    if dtype == torch.float16:
        assert by_hand == 0.1431884765625  # kohya's figure; scaling before the cast gives 0.143310546875
        assert (cached * scale).to(dtype).item() == 0.143310546875
    if dtype == torch.bfloat16:
        assert by_hand == 0.1435546875
    many = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 8
    assert torch.equal(scale_cached_latents(many, scale, dtype), many.to(dtype=dtype) * scale)


def test_add_noise_in_fp16_is_kohyas_x_t_not_the_fp32_one():
    """x0 = -0.8, eps = 0.5, t = 500 in fp16, outside autocast (kohya): every op rounds to fp16. CUDA autocast would
    run pow in fp32 and give 0.0048706533 (derived below), the difference the noise step must stay out of."""
    x0, eps = torch.full((1, 1, 1, 1), -0.8).half(), torch.full((1, 1, 1, 1), 0.5).half()
    x_t = add_noise(x0, eps, torch.tensor([500]), ABAR)
    assert x_t.dtype == torch.float16 and x_t.item() == 0.004638671875
    f16, f = np.float16, np.float32
    abar = f16(ABAR[500].item())  # diffusers casts alphas_cumprod to the latents' dtype first
    by_hand = f16(f16(f16(np.sqrt(f(abar))) * f16(-0.8)) + f16(f16(np.sqrt(f(f16(1) - abar))) * f16(0.5)))
    assert float(by_hand) == 0.004638671875
    in_fp32 = f(f(np.sqrt(f(abar)) * f(f16(-0.8))) + f(np.sqrt(f(f16(1) - abar)) * f(f16(0.5))))
    assert float(in_fp32) == pytest.approx(0.0048706533, abs=1e-9)  # kohya's figure, to its last digit


@pytest.mark.parametrize("name", sorted(PRECISIONS))
def test_x_t_is_in_weight_dtype_per_precision_and_fp32_with_an_offset(name):
    dtype = LATENT_DTYPES[name]
    latents = _latents((2, 4, 8, 8)).to(dtype)
    assert kohya_noisy_latents(latents, ABAR, generator=torch.Generator()).noisy_latents.dtype == dtype
    assert kohya_noisy_latents(latents, ABAR, NoiseOptions(ip_gamma=0.1),
                               generator=torch.Generator()).noisy_latents.dtype == dtype
    offset = kohya_noisy_latents(latents, ABAR, NoiseOptions(offset=0.05), generator=torch.Generator())
    assert offset.noise.dtype == offset.noisy_latents.dtype == torch.float32  # kohya's fp32 eta promotes


def test_channels_last_latents_get_kohyas_randn_like_draws():
    """kohya draws eps and xi with torch.randn_like(latents): the fill follows the latents' memory order."""
    zeros = torch.zeros(1, 4, 4, 4).to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    out = kohya_noisy_latents(zeros, ABAR, NoiseOptions(ip_gamma=0.1))
    after = torch.rand(1)
    torch.manual_seed(0)  # kohya v0.8.7 get_noise_noisy_latents_and_timesteps, replayed
    eps = torch.randn_like(zeros, device=zeros.device)
    t = torch.randint(0, 1000, (1,), device=zeros.device)
    xi = torch.randn_like(zeros)
    assert out.noise[0, :, 0, 0].tolist() == pytest.approx([1.5410, -0.2934, -2.1788, 0.5684], abs=1e-4)
    assert torch.equal(out.noise, eps) and torch.equal(out.timesteps, t)
    assert torch.equal(out.noisy_latents, add_noise(zeros, eps + 0.1 * xi, t, ABAR))
    assert out.noise.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(after, torch.rand(1))  # the global generator is where kohya leaves it

    contiguous = zeros.contiguous()
    torch.manual_seed(0)
    plain = kohya_noisy_latents(contiguous, ABAR)
    assert plain.noise[0, :, 0, 0].tolist() == pytest.approx([-1.1258, -1.3527, -0.6136, -0.6731], abs=1e-4)
    torch.manual_seed(0)
    assert torch.equal(plain.noise, torch.randn(1, 4, 4, 4))  # contiguous: the same as randn(shape)


def test_a_generator_draws_like_the_latents_too():
    zeros = torch.zeros(1, 4, 4, 4).to(memory_format=torch.channels_last)
    out = kohya_noisy_latents(zeros, ABAR, NoiseOptions(ip_gamma=0.1), generator=torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)
    eps = torch.randn_like(zeros, generator=replay)
    t = torch.randint(0, 1000, (1,), generator=replay)
    xi = torch.randn_like(zeros, generator=replay)
    assert torch.equal(out.noise, eps) and torch.equal(out.timesteps, t)
    assert torch.equal(out.noisy_latents, add_noise(zeros, eps + 0.1 * xi, t, ABAR))
    assert out.noise[0, :, 0, 0].tolist() == pytest.approx([1.5410, -0.2934, -2.1788, 0.5684], abs=1e-4)


# --- min/max timestep (kohya --min_timestep / --max_timestep) -------------------------------------------------------

def test_null_timestep_bounds_are_kohyas_defaults():
    latents = _latents((3, 4, 8, 8))
    runs = []
    for bounds in ({}, dict(min_timestep=None, max_timestep=None), dict(min_timestep=0, max_timestep=1000)):
        torch.manual_seed(2)
        runs.append(kohya_noisy_latents(latents, ABAR, NoiseOptions(**bounds)))
    assert all(torch.equal(r.timesteps, runs[0].timesteps) for r in runs)


@pytest.mark.parametrize("one_per_batch", [False, True])
def test_timestep_bounds_are_kohyas_randint_min_max(one_per_batch):
    latents = _latents((4, 4, 8, 8))
    torch.manual_seed(6)
    out = kohya_noisy_latents(latents, ABAR, NoiseOptions(min_timestep=998, one_timestep_per_batch=one_per_batch))
    torch.manual_seed(6)
    torch.randn(4, 4, 8, 8)
    t = torch.randint(998, 1000, (1,) if one_per_batch else (4,))  # upper bound excluded
    assert torch.equal(out.timesteps, t.repeat(4) if one_per_batch else t)
    seen = {int(kohya_noisy_latents(latents, ABAR, NoiseOptions(min_timestep=998, max_timestep=None),
                                    generator=torch.Generator().manual_seed(s)).timesteps[0]) for s in range(40)}
    assert seen == {998, 999}


def test_valid_timestep_bounds_pass():
    for low, high in ((None, None), (0, 1000), (999, None), (None, 1), (200, 800), (0, 1)):
        check_noise_options(min_timestep=low, max_timestep=high)


@pytest.mark.parametrize("bounds, field", [
    (dict(min_timestep=-1), "noise.min_timestep"),
    (dict(min_timestep=1000), "noise.min_timestep"),
    (dict(min_timestep=1.5), "noise.min_timestep"),
    (dict(min_timestep="5"), "noise.min_timestep"),
    (dict(min_timestep=True), "noise.min_timestep"),
    (dict(max_timestep=0), "noise.max_timestep"),
    (dict(max_timestep=1001), "noise.max_timestep"),
    (dict(min_timestep=500, max_timestep=500), "noise.min_timestep"),
    (dict(min_timestep=600, max_timestep=400), "noise.max_timestep"),
])
def test_bad_timestep_bounds_name_the_key_and_the_accepted_values(bounds, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
        check_noise_options(**bounds)
    assert "max_timestep)" in str(err.value) and ("[0, 999]" in str(err.value) or "[1, 1000]" in str(err.value)
                                                  or "<= 1000" in str(err.value))


def test_each_epoch_starts_with_the_dataloaders_int64_draw(tmp_path, monkeypatch):
    """torch's DataLoader draws base_seed = torch.empty((), dtype=torch.int64).random_() from the global CPU RNG each
    time kohya's loop iterates it (dataloader.py, _BaseDataLoaderIter.__init__): 2 images, batch 1, 2 steps an
    epoch, so step 3's noise comes after one more int64 than step 2's, and step 2's after none."""
    from conftest import RecordingSink, compose_config, write_image

    from lora_sweep.training import train as train_module

    for name in ("a", "b"):
        write_image(tmp_path / "data" / "1_x" / f"{name}.png", caption="a photo", color=(40, 90 + 60 * (name > "a"), 9))
    states: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = train_module.micro_batch_loss

    def recording(*args, **kwargs):
        before = torch.get_rng_state()
        terms = original(*args, **kwargs)
        states.append((before, torch.get_rng_state()))
        return terms

    monkeypatch.setattr(train_module, "micro_batch_loss", recording)
    cfg = compose_config("data=folder", f"data.dir={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}",
                         "data.resolution=64", "train.max_steps=3", "train.batch_size=1", "sampling.prompts=[]",
                         "validation.fit_images=0")
    train_module.train(cfg, output_dir=tmp_path / "out", sink=RecordingSink())
    assert len(states) == 3
    assert torch.equal(states[1][0], states[0][1])  # mid-epoch: nothing between the steps
    torch.set_rng_state(states[1][1])
    torch.empty((), dtype=torch.int64).random_()
    assert torch.equal(states[2][0], torch.get_rng_state())  # epoch 2 starts one int64 later
