"""kohya's `ss_*` metadata for a saved LoRA, so A1111/ComfyUI extensions and kohya's tools can read the settings.

The names follow sd-scripts v0.8.7's `train_network.py`; values are strings (safetensors metadata is str -> str).
"""

from __future__ import annotations

import json
import time

from lora_sweep.config import config_hash
from lora_sweep.training import optim

PRECISION_TO_KOHYA = {  # name -> (mixed_precision, fp8_base)
    "fp32": ("no", False), "fp16": ("fp16", False), "bf16": ("bf16", False),
    "fp8": ("fp16", True), "fp8_bf16": ("bf16", True),
}


def kohya_metadata(cfg, prepared, optimizer, *, steps: int, epoch: int) -> dict[str, str]:
    """A saved LoRA's metadata: kohya v0.8.7's `ss_*` keys, the config hash and variant, the SAI model spec.

    `steps` optimizer steps in `epoch` (1-based). Values are strings (None: "None").
    """
    mixed, fp8 = PRECISION_TO_KOHYA.get(cfg.precision.name, (cfg.precision.name, False))
    te_lr = cfg.train.text_encoder_lr if cfg.train.text_encoder_lr is not None else cfg.train.lr
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": cfg.network.rank,
        "ss_network_alpha": cfg.network.alpha,
        "ss_network_train_unet_only": not cfg.network.train_text_encoder,
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": cfg.model.path or f"lora-sweep-{cfg.model.name}",
        "ss_learning_rate": cfg.train.lr,
        "ss_unet_lr": cfg.train.lr,
        "ss_text_encoder_lr": te_lr if cfg.network.train_text_encoder else 0.0,
        "ss_optimizer": optim.optimizer_description(optimizer),
        "ss_lr_scheduler": cfg.optimizer.scheduler,
        "ss_lr_warmup_steps": cfg.optimizer.warmup_steps,
        "ss_mixed_precision": mixed,
        "ss_fp8_base": fp8,
        "ss_seed": cfg.train.seed,
        "ss_max_train_steps": cfg.train.max_steps,
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_batch_size_per_device": cfg.train.batch_size,
        "ss_gradient_accumulation_steps": cfg.train.grad_accum,
        "ss_total_batch_size": cfg.train.batch_size * cfg.train.grad_accum,
        "ss_max_grad_norm": cfg.train.max_grad_norm,
        "ss_gradient_checkpointing": cfg.train.gradient_checkpointing,
        "ss_noise_offset": cfg.noise.offset or None,
        "ss_noise_offset_random_strength": cfg.noise.offset_random_strength,
        "ss_adaptive_noise_scale": cfg.noise.adaptive_scale,
        "ss_multires_noise_iterations": cfg.noise.multires_iterations or None,
        "ss_multires_noise_discount": cfg.noise.multires_discount,
        "ss_ip_noise_gamma": cfg.noise.ip_gamma or None,
        "ss_ip_noise_gamma_random_strength": cfg.noise.ip_gamma_random_strength,
        "ss_min_snr_gamma": cfg.loss.min_snr_gamma,
        "ss_debiased_estimation": cfg.loss.debiased,
        "ss_loss_type": cfg.loss.type,
        "ss_huber_schedule": cfg.loss.huber_schedule,
        "ss_huber_c": cfg.loss.huber_c,
        "ss_v_parameterization": cfg.model.v_prediction,
        "ss_resolution": str(cfg.data.resolution),
        "ss_enable_bucket": cfg.data.enable_bucket,
        "ss_bucket_no_upscale": cfg.data.bucket_no_upscale,
        "ss_bucket_info": json.dumps({"buckets": prepared.histogram}),
        "ss_num_train_images": sum(e.item.repeats for e in prepared.examples),
        "ss_flip_aug": cfg.data.flip_aug,
        "ss_shuffle_caption": cfg.data.shuffle_caption,
        "ss_keep_tokens": cfg.data.keep_tokens,
        "ss_caption_extension": cfg.data.caption_extension,
        "ss_training_finished_at": time.time(),
        "ss_output_name": cfg.train.output_name,
        "lora_sweep_config_hash": config_hash(cfg),
        "lora_sweep_variant": cfg.tracking.variant or "",
    }
    meta |= sai_model_spec(cfg)
    return {k: ("None" if v is None else str(v)) for k, v in meta.items()}


def sai_model_spec(cfg) -> dict[str, str]:
    """kohya's `get_sai_model_spec` keys for an SDXL LoRA; `modelspec.timestep_range` only if a bound is set."""
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": cfg.train.output_name,
    }
    low, high = cfg.noise.min_timestep, cfg.noise.max_timestep
    if low is not None or high is not None:
        spec["modelspec.timestep_range"] = f"{0 if low is None else low},{1000 if high is None else high}"
    return spec
