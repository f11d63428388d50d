"""The training loss of one step, computed as kohya sd-scripts v0.8.7 computes it (docs/kohya-reference.md §2, §3).

Per micro-batch: element loss on fp32 copies of pred and target -> mean over (C, h, w) -> x prior_loss_weight ->
x min-SNR weight -> x SNR/(SNR+1) (scale_v_pred_loss_like_noise_pred) -> + lambda x loss / (SNR/(SNR+1))
(v_pred_like_loss) -> x debiased weight -> batch mean, v0.8.7's order; the caller divides by gradient accumulation.
Papers: min-SNR (arXiv 2303.09556), debiased estimation (2310.08442), scheduled pseudo-Huber (2403.16728).
Kohya quirk kept: the SNR weights use alphas_cumprod from before any zero-terminal-SNR rescale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lora_sweep.errors import ConfigError, Problems

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# kohya caps SNR at 1000 for the debiased weight and get_snr_scale (only t = 0 exceeds it).
DEBIASED_SNR_CAP = 1000.0


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR_t = abar_t / (1 - abar_t), fp32, shape (B,), on the timesteps' device (kohya's all_snr[t])."""
    abar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    all_snr = (abar.sqrt() / (1.0 - abar).sqrt()) ** 2
    return all_snr[timesteps]


def min_snr_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                   v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-gamma weight: min(SNR_t, gamma) / SNR_t, or / (SNR_t + 1) under v-prediction.

    Why: caps the weight of easy low-noise timesteps that would dominate the gradient (arXiv 2303.09556).
    """
    snr_t = snr(timesteps, alphas_cumprod)
    capped = torch.clamp(snr_t, max=float(gamma))
    return capped / (snr_t + 1) if v_prediction else capped / snr_t


def debiased_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Debiased-estimation weight 1 / sqrt(min(SNR_t, 1000)) (arXiv 2310.08442).

    v0.8.7 uses it for v-prediction too (newer sd-scripts, PR #1715, use 1 / (SNR + 1)).
    """
    snr_t = torch.clamp(snr(timesteps, alphas_cumprod), max=DEBIASED_SNR_CAP)
    return 1 / torch.sqrt(snr_t)


def snr_scale(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v0.8.7's `get_snr_scale`: S / (S + 1) with S = min(SNR_t, 1000), shape (B,): the eps loss's size relative to
    the v loss's at t (scale_v_pred_loss_like_noise_pred multiplies by it, v_pred_like_loss divides by it)."""
    snr_t = torch.clamp(snr(timesteps, alphas_cumprod), max=DEBIASED_SNR_CAP)
    return snr_t / (snr_t + 1)


def _unknown(field: str, value: Any, accepted: tuple[str, ...]) -> ConfigError:
    return ConfigError(f"{field} = {value!r} is not known: the accepted values are {', '.join(accepted)} "
                       "(as in kohya sd-scripts v0.8.7).")


def _check_choice(field: str, value: Any, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise _unknown(field, value, accepted)
    return value


def huber_c(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, schedule: str, c: float,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The pseudo-Huber c per timestep, shape (B,), in `dtype` (arXiv 2403.16728; kohya `get_timesteps_and_huber_c`).

    constant: c. exponential: c**(t/T), in Python doubles as kohya (pass float64 to keep them exact). snr:
    (1 - c) / (1 + sigma_t)**2 + c, sigma_t = sqrt((1 - abar_t) / abar_t), in fp32 as kohya. Per-sample timesteps
    get one c each (newer sd-scripts). Raises ConfigError for an unknown schedule.
    """
    if schedule == "constant":
        return torch.full(timesteps.shape, float(c), dtype=dtype, device=timesteps.device)
    if schedule == "exponential":
        alpha = -math.log(c) / alphas_cumprod.shape[0]  # kohya: / noise_scheduler.config.num_train_timesteps
        values = [math.exp(-alpha * t) for t in timesteps.tolist()]  # kohya: math.exp(-alpha * timesteps.item())
        return torch.tensor(values, dtype=torch.float64, device=timesteps.device).reshape(timesteps.shape).to(dtype)
    if schedule != "snr":
        raise _unknown("loss.huber_schedule", schedule, HUBER_SCHEDULES)
    abar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    sigma = ((1.0 - abar) / abar) ** 0.5
    return ((1 - c) / (1 + sigma) ** 2 + c).to(dtype)


_huber_c_schedule = huber_c  # kohya_loss's `huber_c` argument shadows the function name


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: float | torch.Tensor | None = None) -> torch.Tensor:
    """Per-element loss in fp32 (pred's shape), a = pred - target (kohya `train_util.conditional_loss`).

    l2: a**2. huber: 2c (sqrt(a**2 + c**2) - c). smooth_l1: 2 (sqrt(a**2 + c**2) - c), NOT torch's smooth_l1_loss.
    `huber_c` is a scalar or (B,). c**2 and 2c are computed in double and rounded to fp32 once, as kohya's Python
    float c is; the rest is kohya's fp32 expression, cancellation included. Raises ValueError for a missing or
    mis-sized huber_c, ConfigError for an unknown loss type.
    """
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if huber_c is None:
        raise ValueError(f"elementwise_loss: loss_type {loss_type!r} needs huber_c (a scalar or one per sample).")
    c = torch.as_tensor(huber_c, dtype=torch.float64, device=pred.device)  # a Python float is a double
    if c.ndim > 0:
        if c.numel() != pred.shape[0]:
            raise ValueError(f"elementwise_loss: huber_c has {c.numel()} values for a batch of {pred.shape[0]}.")
        c = c.reshape((-1,) + (1,) * (pred.ndim - 1))
    c_squared, twice_c, c = (c**2).float(), (2 * c).float(), c.float()  # each rounded once, as kohya's scalars are
    root = torch.sqrt((pred - target) ** 2 + c_squared)
    if loss_type == "huber":
        return twice_c * (root - c)
    if loss_type == "smooth_l1":
        return 2 * (root - c)
    raise _unknown("loss.type", loss_type, LOSS_TYPES)


def one_timestep_per_batch(loss_type: str, per_sample_timesteps: bool) -> bool:
    """Whether the batch shares one timestep: v0.8.7's huber and smooth_l1 do, unless `per_sample_timesteps`."""
    _check_choice("loss.type", loss_type, LOSS_TYPES)
    return loss_type != "l2" and not per_sample_timesteps


@dataclass(frozen=True)
class LossTerms:
    """One micro-batch's loss: `loss` = per_sample.mean() (before the grad-accumulation division).

    (B,) each: `per_sample` weighted, `raw_per_sample` unweighted, `weight` the SNR weights' product, `huber_c` (NaN
    for l2).
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    raw_per_sample: torch.Tensor
    weight: torch.Tensor
    huber_c: torch.Tensor


@dataclass(frozen=True)
class LossOptions:
    """kohya's loss flags (docs/kohya-reference.md §2, §3); min_snr_gamma None or 0: off.

    Checked once, before training, by `check_loss_options`.
    """

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    min_snr_gamma: float | None = None
    debiased: bool = False
    v_prediction: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None  # None and 0: off


def prior_loss_weights(is_reg: list[bool], prior_loss_weight: float) -> torch.Tensor | None:
    """kohya's batch["loss_weights"]: prior_loss_weight for a reg image, 1.0 for a train image (docs/datasets.md,
    reference §2.3); None for a batch without reg images, so that nothing is multiplied."""
    if not any(is_reg):
        return None
    return torch.tensor([float(prior_loss_weight) if reg else 1.0 for reg in is_reg], dtype=torch.float32)


def kohya_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
               options: LossOptions = LossOptions(), *, sample_weights: torch.Tensor | None = None,
               snr_alphas_cumprod: torch.Tensor | None = None) -> LossTerms:
    """kohya v0.8.7's loss, in the order of the module docstring; min-SNR and debiased multiply when both are on.

    `pred`, `target` (B, C, h, w); `target` from `noise.prediction_target`; `sample_weights` (B,) optional.
    `alphas_cumprod` is the training schedule's (the Huber snr schedule reads it); the SNR weights read
    `snr_alphas_cumprod` (default: the same), v0.8.7's all_snr from before a zero-terminal-SNR rescale.
    """
    o = options
    snr_abar = alphas_cumprod if snr_alphas_cumprod is None else snr_alphas_cumprod
    timesteps = timesteps.to(pred.device)
    if o.loss_type == "l2":
        c_used = torch.full(timesteps.shape, float("nan"), dtype=torch.float32, device=pred.device)
        elements = elementwise_loss(pred, target, o.loss_type)
    else:
        c_exact = _huber_c_schedule(timesteps, alphas_cumprod, o.huber_schedule, o.huber_c, dtype=torch.float64)
        c_used = c_exact.float()
        elements = elementwise_loss(pred, target, o.loss_type, c_exact)
    raw = elements.mean(dim=tuple(range(1, elements.ndim)))
    per_sample = raw if sample_weights is None else raw * sample_weights.to(raw.device)
    weight = torch.ones_like(raw)
    if o.min_snr_gamma:  # kohya: `if args.min_snr_gamma:` (None and 0 are off)
        snr_factor = min_snr_weight(timesteps, snr_abar, o.min_snr_gamma, o.v_prediction)
        per_sample, weight = per_sample * snr_factor, weight * snr_factor
    if o.scale_v_pred_loss_like_noise_pred:
        scale = snr_scale(timesteps, snr_abar)
        per_sample, weight = per_sample * scale, weight * scale
    if o.v_pred_like_loss:  # kohya: `if args.v_pred_like_loss:` (None and 0 are off)
        scale = snr_scale(timesteps, snr_abar)
        per_sample = per_sample + per_sample / scale * o.v_pred_like_loss
        weight = weight * (1 + o.v_pred_like_loss / scale)
    if o.debiased:
        debias_factor = debiased_weight(timesteps, snr_abar)
        per_sample, weight = debias_factor * per_sample, weight * debias_factor
    return LossTerms(per_sample.mean(), per_sample, raw, weight, c_used)


def _finite_number(field: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{field} = {value!r} is not valid: it must be a finite number ({what}).")
    return float(value)


def check_v_pred_options(scale_v_pred_loss_like_noise_pred: Any, v_pred_like_loss: Any, v_prediction: bool) -> None:
    """Raise ConfigError for the v-prediction loss scalings v0.8.7 refuses (`verify_training_args` ValueErrors):
    scale_v_pred_loss_like_noise_pred without model.v_prediction, v_pred_like_loss together with it."""
    found = Problems()
    if not isinstance(scale_v_pred_loss_like_noise_pred, bool):
        found.add(f"loss.scale_v_pred_loss_like_noise_pred = {scale_v_pred_loss_like_noise_pred!r} is not valid: it "
                  "must be true or false.")
    elif scale_v_pred_loss_like_noise_pred and not v_prediction:
        found.add("loss.scale_v_pred_loss_like_noise_pred = true needs model.v_prediction = true: it scales a "
                  "v-prediction loss like an eps loss (kohya sd-scripts v0.8.7 refuses it without "
                  "--v_parameterization too). Set model.v_prediction=true or "
                  "loss.scale_v_pred_loss_like_noise_pred=false.")
    if v_pred_like_loss is not None:
        value = found.check(_finite_number, "loss.v_pred_like_loss", v_pred_like_loss,
                            "the weight of the added v-like loss; 0 or null is off")
        if value and v_prediction:
            found.add(f"loss.v_pred_like_loss = {value} cannot be used with model.v_prediction = true: it adds a "
                      "v-like loss to an eps-prediction loss (kohya sd-scripts v0.8.7 refuses it with "
                      "--v_parameterization too). Set loss.v_pred_like_loss=null or model.v_prediction=false.")
    found.raise_any()


def check_loss_options(loss_type: str, huber_schedule: str, huber_c: float, min_snr_gamma: float | None,
                       debiased: bool = False, per_sample_timesteps: bool = False) -> None:
    """Raise ConfigError listing bad loss settings, before anything heavy loads.

    huber_c in (0, 1] for every loss type (the schedules take its log / decay to it), so a typo does not wait for
    a huber run; min_snr_gamma null (off) or > 0.
    """
    found = Problems()  # every bad setting is reported, not the first
    found.check(_check_choice, "loss.type", loss_type, LOSS_TYPES)
    found.check(_check_choice, "loss.huber_schedule", huber_schedule, HUBER_SCHEDULES)
    c = found.check(_finite_number, "loss.huber_c", huber_c, "in (0, 1], default 0.1")
    if c is not None and not 0 < c <= 1:
        found.add(f"loss.huber_c = {c} is out of range: it must be in (0, 1] (kohya's --huber_c, default "
                  "0.1; with the snr and exponential schedules it is the value c reaches at high noise).")
    if min_snr_gamma is not None:
        gamma = found.check(_finite_number, "loss.min_snr_gamma", min_snr_gamma,
                            "> 0, or null to turn min-SNR weighting off")
        if gamma is not None and gamma <= 0:
            found.add(f"loss.min_snr_gamma = {gamma} is not valid: it must be > 0 (5 is the paper's value), "
                      "or null to turn min-SNR weighting off.")
    for field, value in (("loss.debiased", debiased), ("loss.per_sample_timesteps", per_sample_timesteps)):
        if not isinstance(value, bool):
            found.add(f"{field} = {value!r} is not valid: it must be true or false.")
    found.raise_any()
