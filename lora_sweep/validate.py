"""Range and cross-field checks on a composed config, run before anything heavy loads.

Hydra's schema already rejects unknown keys and wrong types; this adds what a type cannot say (ranges, enums,
combinations, paths). Each failure is a `ConfigError` naming the field and what it accepts; all failures of one
config are reported together, so a user fixes them in one go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lora_sweep.errors import ConfigError, UserError

MODELS = ("tiny", "sdxl")
DATASETS = ("photos", "folder")
ON_NAN = ("stop", "skip_step")
DEVICES = ("auto", "cpu", "cuda")
LATENT_SAMPLE = ("sample", "mean")


def _enum(field: str, value, accepted) -> None:
    if value not in accepted:
        raise ConfigError(f"{field}: '{value}' is not one of {', '.join(map(str, accepted))}.")


def _positive(field: str, value, *, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{field}: must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def _checks(cfg) -> list[Callable[[], None]]:
    from lora_sweep import buckets, loss, noise, optim, precision

    t, d, n, lo = cfg.train, cfg.data, cfg.noise, cfg.loss
    return [
        lambda: _enum("model.name", cfg.model.name, MODELS),
        lambda: _check_model_path(cfg),
        lambda: _enum("data.name", d.name, DATASETS),
        lambda: _check_data_dir(cfg),
        lambda: _enum("data.latent_sample", d.latent_sample, LATENT_SAMPLE),
        lambda: _positive("data.keep_tokens", d.keep_tokens, allow_zero=True),
        lambda: buckets.check_bucket_options(
            resolution=d.resolution, reso_steps=d.bucket_reso_steps, min_reso=d.min_bucket_reso,
            max_reso=d.max_bucket_reso),
        lambda: (0.0 <= d.validation_split < 1.0) or _fail("data.validation_split", d.validation_split, "in [0, 1)"),
        lambda: noise.check_noise_options(
            offset=n.offset, offset_random_strength=n.offset_random_strength, adaptive_scale=n.adaptive_scale,
            multires_iterations=n.multires_iterations, multires_discount=n.multires_discount,
            ip_gamma=n.ip_gamma, ip_gamma_random_strength=n.ip_gamma_random_strength),
        lambda: loss.check_loss_options(
            loss_type=lo.type, huber_schedule=lo.huber_schedule, huber_c=lo.huber_c,
            min_snr_gamma=lo.min_snr_gamma, debiased=lo.debiased),
        lambda: optim.resolve_optimizer_name(cfg.optimizer.name),
        lambda: _check_scheduler(optim, cfg),
        lambda: precision.precision_policy(cfg.precision.name, "cuda" if t.device == "auto" else t.device),
        lambda: _positive("network.rank", cfg.network.rank),
        lambda: _positive("network.alpha", cfg.network.alpha),
        lambda: (0.0 <= cfg.network.dropout < 1.0) or _fail("network.dropout", cfg.network.dropout, "in [0, 1)"),
        lambda: _positive("train.max_steps", t.max_steps),
        lambda: _positive("train.batch_size", t.batch_size),
        lambda: _positive("train.grad_accum", t.grad_accum),
        lambda: _positive("train.lr", t.lr, allow_zero=True),
        lambda: t.text_encoder_lr is None or _positive("train.text_encoder_lr", t.text_encoder_lr, allow_zero=True),
        lambda: _positive("train.max_grad_norm", t.max_grad_norm, allow_zero=True),
        lambda: _positive("train.save_every", t.save_every, allow_zero=True),
        lambda: _positive("train.keep_states", t.keep_states),
        lambda: _enum("train.on_nan", t.on_nan, ON_NAN),
        lambda: _enum("train.device", t.device, DEVICES),
        lambda: _positive("sampling.every", cfg.sampling.every, allow_zero=True),
        lambda: _positive("sampling.steps", cfg.sampling.steps),
        lambda: _positive("validation.every", cfg.validation.every, allow_zero=True),
        lambda: _positive("tracking.flush_every", cfg.tracking.flush_every),
    ]


def _fail(field: str, value, accepted: str) -> None:
    raise ConfigError(f"{field}: must be {accepted}, got {value}.")


def _check_scheduler(optim, cfg) -> None:
    if cfg.optimizer.scheduler not in optim.SCHEDULERS:
        _enum("optimizer.scheduler", cfg.optimizer.scheduler, optim.SCHEDULERS)
    _positive("optimizer.warmup_steps", cfg.optimizer.warmup_steps, allow_zero=True)
    if cfg.optimizer.scheduler == "constant" and cfg.optimizer.warmup_steps:
        raise ConfigError(f"optimizer.warmup_steps={cfg.optimizer.warmup_steps} needs a scheduler that warms up: "
                          "optimizer.scheduler=constant does not (kohya refuses it too); use constant_with_warmup, "
                          "cosine or linear, or set optimizer.warmup_steps=0.")


def _check_model_path(cfg) -> None:
    from lora_sweep.model import check_model_path

    if cfg.model.name == "sdxl" or cfg.model.path:
        check_model_path(cfg.model.path)


def _check_data_dir(cfg) -> None:
    if cfg.data.name == "folder" or cfg.data.dir:
        if not cfg.data.dir or not Path(cfg.data.dir).expanduser().is_dir():
            raise ConfigError(
                f"data.dir: '{cfg.data.dir}' is not a folder. Set data.dir to a dataset in kohya's layout "
                "(<dir>/<repeats>_<name>/ with images and .txt captions), or use data=photos for the bundled photos."
            )


def validate(cfg) -> None:
    """Raise one `ConfigError` listing every problem of `cfg` (each names its field)."""
    problems = []
    for check in _checks(cfg):
        try:
            check()
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("Invalid configuration:\n- " + "\n- ".join(problems))
