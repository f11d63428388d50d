"""The noise of one training step, made as kohya sd-scripts v0.8.7 makes it (docs/kohya-reference.md §1, §2).

kohya's draw order, which `kohya_noisy_latents` keeps so runs stay comparable with kohya's:

    randn_like(eps) -> [rand(1): offset strength] -> [randn(B,C,1,1): offset] -> [pyramid: Python random
    + CPU randn per level] -> timesteps -> [rand(1): ip strength] -> [randn_like(xi)]

Call it outside autocast, as kohya does (CUDA autocast runs `pow` in fp32). With ``generator=None`` draws use the
global RNGs as kohya does; with a `torch.Generator` every draw, the pyramid's Python `random` included (seeded from
it), comes from that generator and no global state is touched.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lora_sweep.errors import ConfigError, Problems


def dataloader_epoch_draw() -> None:
    """The one int64 torch's DataLoader draws from the global CPU RNG as kohya's loop starts an epoch's iterator
    (`_BaseDataLoaderIter`'s base_seed), drawn and discarded so the noise after it is v0.8.7's. Call at each epoch's
    first batch, not on resuming mid-epoch."""
    torch.empty((), dtype=torch.int64).random_()


def _draw(sampler: Callable[..., torch.Tensor], *args: Any, device: torch.device | str,
          generator: torch.Generator | None, **kwargs: Any) -> torch.Tensor:
    """Call a torch sampler on `device`'s global RNG, or on `generator` (its own device) and move the result."""
    if generator is None:
        return sampler(*args, device=device, **kwargs)
    return sampler(*args, device=generator.device, generator=generator, **kwargs).to(device)


def _randn_like(latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """kohya's `torch.randn_like(latents)`: N(0, 1) in latents' shape, dtype, device and memory format.

    Why "like": the draw fills memory order, so channels-last latents get other values than `randn(shape)` would.
    """
    if generator is None:
        return torch.randn_like(latents)
    return torch.randn_like(latents, device=generator.device, generator=generator).to(latents.device)


def scale_cached_latents(latents: torch.Tensor, vae_scale: float, weight_dtype: torch.dtype) -> torch.Tensor:
    """x0 from cached VAE latents as kohya's `train_network.py`: cast to `weight_dtype`, then `* vae_scale`.

    Cast first on purpose (kohya's order): under fp16/bf16 the product is rounded from the rounded latent.
    `weight_dtype` is fp32/fp16/bf16 by mixed precision (fp8_base too). (B, C, h, w) in and out, on latents' device.
    """
    return latents.to(dtype=weight_dtype) * vae_scale


def apply_noise_offset(latents: torch.Tensor, noise: torch.Tensor, offset: float | torch.Tensor,
                       adaptive_scale: float | None = None, *,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``noise + s * eta``, one eta ~ N(0, 1) per (sample, channel), shape (B, C, 1, 1), fp32.

    Why: teaches the model to shift a channel's mean (overall brightness). s is `offset` (the caller draws any random
    strength), or with `adaptive_scale` a: ``s_bc = max(0, offset + a * |mean_hw(latents_bc)|)``.
    Kohya quirk kept: eta is fp32, so fp16/bf16 noise comes back fp32.
    """
    strength: float | torch.Tensor = offset
    if adaptive_scale is not None:
        channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(offset + adaptive_scale * channel_mean, 0.0, None)
    eta = _draw(torch.randn, (latents.shape[0], latents.shape[1], 1, 1), dtype=torch.float32,
                device=latents.device, generator=generator)
    return noise + strength * eta


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, *,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution noise: add coarser N(0, 1) fields, then divide by the global unbiased std.

    Why: white noise leaves low frequencies almost unnoised at small t. Level i (r_i = 2 + 2*U[0,1) per level) is
    drawn on the CPU at size max(1, int(h / r_i**i)) x max(1, int(w / r_i**i)), upsampled bilinearly and weighted
    discount**i; stop after the first level of size 1. The input is not modified; the dtype is kept.
    """
    if generator is None:
        scale_rng: Any = random  # kohya's global `random.random()`
    else:
        seed = int(torch.randint(0, 2**63 - 1, (1,), device=generator.device, generator=generator))
        scale_rng = random.Random(seed)
    batch, channels, height, width = noise.shape
    result = noise.clone()
    for level in range(iterations):
        ratio = 2 + 2 * scale_rng.random()
        level_h = max(1, int(height / ratio**level))
        level_w = max(1, int(width / ratio**level))
        field = _draw(torch.randn, (batch, channels, level_h, level_w), device="cpu", generator=generator)
        field = field.to(noise.device)
        result += F.interpolate(field, size=(height, width), mode="bilinear", align_corners=False) * discount**level
        if level_h == 1 or level_w == 1:
            break
    return result / result.std()


def zero_terminal_snr_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar after v0.8.7's `fix_noise_scheduler_betas_for_zero_terminal_snr` (arXiv 2305.08891), fp32 like `betas`.

    sqrt(abar) is shifted so that its last value is 0 and rescaled so that its first keeps its value; the betas are
    rebuilt from it (alpha_0 = abar_0, alpha_t = abar_t / abar_t-1) and cumulated again, so abar_T = 0 exactly.
    docs/kohya-reference.md "Zero terminal SNR".
    """
    root = (1 - betas).cumprod(0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return torch.cumprod(1.0 - (1 - alphas), dim=0)  # via betas = 1 - alphas, as v0.8.7 rounds them


def _sqrt_alphas(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(abar_t) and sqrt(1 - abar_t) shaped (B, 1, ...), with abar cast to `like`'s dtype first (as diffusers)."""
    abar = alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return (abar**0.5).reshape(shape), ((1 - abar) ** 0.5).reshape(shape)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise, as DDPMScheduler.add_noise.

    abar is cast to the latents' dtype first, so fp16 in gives fp16 x_t (fp32 noise promotes). Outside autocast only.
    """
    sqrt_abar, sqrt_one_minus_abar = _sqrt_alphas(alphas_cumprod, timesteps, latents)
    return sqrt_abar * latents + sqrt_one_minus_abar * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0: the v-parameterization target (DDPMScheduler.get_velocity)."""
    sqrt_abar, sqrt_one_minus_abar = _sqrt_alphas(alphas_cumprod, timesteps, latents)
    return sqrt_abar * noise - sqrt_one_minus_abar * latents


def prediction_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      alphas_cumprod: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """The U-Net's target (docs/kohya-reference.md §1): eps, or the velocity under v-prediction.

    Shape (B, C, h, w) of the latents, abar in their dtype.
    """
    return velocity_target(latents, noise, timesteps, alphas_cumprod) if v_prediction else noise


def sample_timesteps(batch_size: int, *, one_per_batch: bool, min_timestep: int, max_timestep: int,
                     device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ randint(min, max) (max excluded), LongTensor (B,).

    Per sample on the device RNG (kohya's l2), or one CPU draw repeated over the batch (kohya v0.8.7's huber/smooth_l1).
    """
    if one_per_batch:
        one = _draw(torch.randint, min_timestep, max_timestep, (1,), device="cpu", generator=generator)
        return one.repeat(batch_size).to(device).long()
    return _draw(torch.randint, min_timestep, max_timestep, (batch_size,), device=device, generator=generator).long()


@dataclass(frozen=True)
class NoiseOptions:
    """kohya's noise flags (docs/kohya-reference.md §1); min/max_timestep None: 0 and the schedule's length.

    `one_timestep_per_batch`: v0.8.7's huber/smooth_l1 draw one t per batch. Checked once by `check_noise_options`.
    """

    offset: float = 0.0
    offset_random_strength: bool = False
    adaptive_scale: float | None = None
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_gamma: float = 0.0
    ip_gamma_random_strength: bool = False
    one_timestep_per_batch: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None


@dataclass(frozen=True)
class NoisyLatents:
    """One step's noise: `noise` is the eps target (without ip noise); strengths for logging (0.0 when off)."""

    noise: torch.Tensor
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    offset_strength: float
    ip_strength: float


def kohya_noisy_latents(latents: torch.Tensor, alphas_cumprod: torch.Tensor, options: NoiseOptions = NoiseOptions(),
                        *, generator: torch.Generator | None = None) -> NoisyLatents:
    """kohya v0.8.7's `get_noise_noisy_latents_and_timesteps`: noise, timesteps and x_t in kohya's RNG order.

    `latents` (B, C, h, w): scaled, in the training dtype (`scale_cached_latents`); eps, xi and x_t keep that dtype (a
    noise offset makes x_t fp32, as in kohya). An option that is off makes no draw. Random strengths stay kohya's
    (1,)-shaped fp32 tensors in the arithmetic (they decide dtypes). With ip_gamma g:
    x_t = sqrt(abar) x0 + sqrt(1 - abar) (eps + g xi); the target stays eps.
    """
    o = options
    device = latents.device
    noise = _randn_like(latents, generator)

    offset_strength = 0.0
    if o.offset:
        strength: float | torch.Tensor = o.offset
        if o.offset_random_strength:
            strength = _draw(torch.rand, (1,), device=device, generator=generator) * o.offset
        offset_strength = float(strength)
        noise = apply_noise_offset(latents, noise, strength, o.adaptive_scale, generator=generator)
    if o.multires_iterations:
        noise = pyramid_noise(noise, o.multires_iterations, o.multires_discount, generator=generator)

    low = 0 if o.min_timestep is None else o.min_timestep  # kohya: None means 0 ...
    high = alphas_cumprod.shape[0] if o.max_timestep is None else o.max_timestep  # ... and num_train_timesteps
    timesteps = sample_timesteps(latents.shape[0], one_per_batch=o.one_timestep_per_batch, min_timestep=low,
                                 max_timestep=high, device=device, generator=generator)

    model_noise = noise
    ip_strength = 0.0
    if o.ip_gamma:
        ip_scale: float | torch.Tensor = o.ip_gamma
        if o.ip_gamma_random_strength:
            ip_scale = _draw(torch.rand, (1,), device=device, generator=generator) * o.ip_gamma
        ip_strength = float(ip_scale)
        model_noise = noise + ip_scale * _randn_like(latents, generator)

    noisy = add_noise(latents, model_noise, timesteps, alphas_cumprod)
    return NoisyLatents(noise, noisy, timesteps, offset_strength, ip_strength)


def _finite_number(field: str, value: Any, what: str) -> float:
    """The value as a float, or a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{field} = {value!r} is not valid: it must be a finite number ({what}).")
    return float(value)


def _flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field} = {value!r} is not valid: it must be true or false.")
    return value


def _timestep_bound(field: str, value: Any, low: int, high: int, default: int) -> int:
    """A timestep bound as an int in [low, high] (null = `default`), or a ConfigError naming the field."""
    if value is None:
        return default
    flag = field.rsplit(".", 1)[-1]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{field} = {value!r} is not valid: it must be an integer in [{low}, {high}], or null for "
                          f"kohya's default {default} (--{flag}); timesteps are drawn from [min_timestep, "
                          "max_timestep), the maximum excluded.")
    return value


def check_noise_options(*, offset: float = 0.0, offset_random_strength: bool = False,
                        adaptive_scale: float | None = None, multires_iterations: int = 0,
                        multires_discount: float = 0.3, ip_gamma: float = 0.0,
                        ip_gamma_random_strength: bool = False, min_timestep: int | None = None,
                        max_timestep: int | None = None, num_timesteps: int = 1000) -> None:
    """Raise ConfigError listing the noise settings kohya would reject or that would do nothing.

    Beyond kohya (which only requires noise_offset for adaptive_noise_scale): negative strengths (typos: the sign is
    random), negative iterations, a discount outside (0, 1], random-strength flags on a 0 strength, and timestep
    bounds outside 0 <= min < max <= num_timesteps.
    """
    found = Problems()  # every bad setting is reported, not the first
    offset = found.check(_finite_number, "noise.offset", offset,
                         ">= 0; 0 turns the noise offset off, kohya's --noise_offset")
    if offset is not None and offset < 0:
        found.add(f"noise.offset = {offset} is negative: use a strength >= 0 (0 = off; 0.0357 and 0.1 are "
                  "common), the sign of the shift is already random.")
    if found.check(_flag, "noise.offset_random_strength", offset_random_strength) and offset == 0:
        found.add("noise.offset_random_strength = true needs noise.offset > 0: the strength is drawn as "
                  "U[0,1) * noise.offset, so with offset 0 it would do nothing.")
    if adaptive_scale is not None:
        found.check(_finite_number, "noise.adaptive_scale", adaptive_scale, "or null; kohya's --adaptive_noise_scale")
        if offset == 0:
            found.add("noise.adaptive_scale is set but noise.offset is 0: the adaptive scale adjusts the "
                      "noise offset, so set noise.offset > 0 or set noise.adaptive_scale to null "
                      "(kohya: adaptive_noise_scale requires noise_offset).")
    if isinstance(multires_iterations, bool) or not isinstance(multires_iterations, int) or multires_iterations < 0:
        found.add(f"noise.multires_iterations = {multires_iterations!r} is not valid: it must be an integer "
                  ">= 0 (0 = pyramid noise off; 6 to 10 are common).")
    discount = found.check(_finite_number, "noise.multires_discount", multires_discount, "in (0, 1], default 0.3")
    if discount is not None and not 0 < discount <= 1:
        found.add(f"noise.multires_discount = {discount} is out of range: it must be in (0, 1] (level i is "
                  "weighted discount**i; kohya's default 0.3).")
    ip_gamma = found.check(_finite_number, "noise.ip_gamma", ip_gamma,
                           ">= 0; 0 turns input perturbation off, 0.1 is common")
    if ip_gamma is not None and ip_gamma < 0:
        found.add(f"noise.ip_gamma = {ip_gamma} is negative: use a strength >= 0 (0 = off; 0.1 is common).")
    if found.check(_flag, "noise.ip_gamma_random_strength", ip_gamma_random_strength) and ip_gamma == 0:
        found.add("noise.ip_gamma_random_strength = true needs noise.ip_gamma > 0: the strength is drawn as "
                  "U[0,1) * noise.ip_gamma, so with gamma 0 it would do nothing.")
    low = found.check(_timestep_bound, "noise.min_timestep", min_timestep, 0, num_timesteps - 1, 0)
    high = found.check(_timestep_bound, "noise.max_timestep", max_timestep, 1, num_timesteps, num_timesteps)
    if low is not None and high is not None and low >= high:
        found.add(f"noise.min_timestep = {low} is not below noise.max_timestep = {high}"
                  f"{' (null: the default)' if max_timestep is None else ''}: timesteps are drawn from "
                  f"[min_timestep, max_timestep), the maximum excluded, so 0 <= min_timestep < max_timestep "
                  f"<= {num_timesteps} is required (kohya's --min_timestep / --max_timestep; null = 0 / "
                  f"{num_timesteps}).")
    found.raise_any()
