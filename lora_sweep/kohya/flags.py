"""sd-scripts v0.8.7's flags as data: the currency of the kohya import and export (issue 29).

"kohya args" are a plain dict of sdxl_train_network.py v0.8.7 flag name -> value, typed as v0.8.7's argparse types
them. A flag a source leaves out means its v0.8.7 default below, not lora-sweep's default.
"""

from __future__ import annotations

# Every flag of sdxl_train_network.py at tag v0.8.7 (commit bfb352bc433326a77aca3124248331eb60c49e8c) with its
# argparse default, in parser order (-h/--help left out); tests/data/kohya_v087_sdxl_network_flags.txt is checked
# against it.
V087_DEFAULTS: dict[str, object] = {
    "console_log_level": None,
    "console_log_file": None,
    "console_log_simple": False,
    "v2": False,
    "v_parameterization": False,
    "pretrained_model_name_or_path": None,
    "tokenizer_cache_dir": None,
    "train_data_dir": None,
    "cache_info": False,
    "shuffle_caption": False,
    "caption_separator": ",",
    "caption_extension": ".caption",
    "caption_extention": None,
    "keep_tokens": 0,
    "keep_tokens_separator": "",
    "secondary_separator": None,
    "enable_wildcard": False,
    "caption_prefix": None,
    "caption_suffix": None,
    "color_aug": False,
    "flip_aug": False,
    "face_crop_aug_range": None,
    "random_crop": False,
    "debug_dataset": False,
    "resolution": None,
    "cache_latents": False,
    "vae_batch_size": 1,
    "cache_latents_to_disk": False,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "token_warmup_min": 1,
    "token_warmup_step": 0,
    "dataset_class": None,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "reg_data_dir": None,
    "in_json": None,
    "dataset_repeats": 1,
    "output_dir": None,
    "output_name": None,
    "huggingface_repo_id": None,
    "huggingface_repo_type": None,
    "huggingface_path_in_repo": None,
    "huggingface_token": None,
    "huggingface_repo_visibility": None,
    "save_state_to_huggingface": False,
    "resume_from_huggingface": False,
    "async_upload": False,
    "save_precision": None,
    "save_every_n_epochs": None,
    "save_every_n_steps": None,
    "save_n_epoch_ratio": None,
    "save_last_n_epochs": None,
    "save_last_n_epochs_state": None,
    "save_last_n_steps": None,
    "save_last_n_steps_state": None,
    "save_state": False,
    "save_state_on_train_end": False,
    "resume": None,
    "train_batch_size": 1,
    "max_token_length": None,
    "mem_eff_attn": False,
    "torch_compile": False,
    "dynamo_backend": "inductor",
    "xformers": False,
    "sdpa": False,
    "vae": None,
    "max_train_steps": 1600,
    "max_train_epochs": None,
    "max_data_loader_n_workers": 8,
    "persistent_data_loader_workers": False,
    "seed": None,
    "gradient_checkpointing": False,
    "gradient_accumulation_steps": 1,
    "mixed_precision": "no",
    "full_fp16": False,
    "full_bf16": False,
    "fp8_base": False,
    "ddp_timeout": None,
    "ddp_gradient_as_bucket_view": False,
    "ddp_static_graph": False,
    "clip_skip": None,
    "logging_dir": None,
    "log_with": None,
    "log_prefix": None,
    "log_tracker_name": None,
    "wandb_run_name": None,
    "log_tracker_config": None,
    "wandb_api_key": None,
    "noise_offset": None,
    "noise_offset_random_strength": False,
    "multires_noise_iterations": None,
    "ip_noise_gamma": None,
    "ip_noise_gamma_random_strength": False,
    "multires_noise_discount": 0.3,
    "adaptive_noise_scale": None,
    "zero_terminal_snr": False,
    "min_timestep": None,
    "max_timestep": None,
    "loss_type": "l2",
    "huber_schedule": "snr",
    "huber_c": 0.1,
    "lowram": False,
    "highvram": False,
    "sample_every_n_steps": None,
    "sample_at_first": False,
    "sample_every_n_epochs": None,
    "sample_prompts": None,
    "sample_sampler": "ddim",
    "config_file": None,
    "output_config": False,
    "metadata_title": None,
    "metadata_author": None,
    "metadata_description": None,
    "metadata_license": None,
    "metadata_tags": None,
    "prior_loss_weight": 1.0,
    "conditioning_data_dir": None,
    "masked_loss": False,
    "deepspeed": False,
    "zero_stage": 2,
    "offload_optimizer_device": None,
    "offload_optimizer_nvme_path": None,
    "offload_param_device": None,
    "offload_param_nvme_path": None,
    "zero3_init_flag": False,
    "zero3_save_16bit_model": False,
    "fp16_master_weights_and_gradients": False,
    "optimizer_type": "",
    "use_8bit_adam": False,
    "use_lion_optimizer": False,
    "learning_rate": 2e-06,
    "max_grad_norm": 1.0,
    "optimizer_args": None,
    "lr_scheduler_type": "",
    "lr_scheduler_args": None,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "lr_scheduler_num_cycles": 1,
    "lr_scheduler_power": 1,
    "dataset_config": None,
    "min_snr_gamma": None,
    "scale_v_pred_loss_like_noise_pred": False,
    "v_pred_like_loss": None,
    "debiased_estimation_loss": False,
    "weighted_captions": False,
    "no_metadata": False,
    "save_model_as": "safetensors",
    "unet_lr": None,
    "text_encoder_lr": None,
    "network_weights": None,
    "network_module": None,
    "network_dim": None,
    "network_alpha": 1,
    "network_dropout": None,
    "network_args": None,
    "network_train_unet_only": False,
    "network_train_text_encoder_only": False,
    "training_comment": None,
    "dim_from_weights": False,
    "scale_weight_norms": None,
    "base_weights": None,
    "base_weights_multiplier": None,
    "no_half_vae": False,
    "cache_text_encoder_outputs": False,
    "cache_text_encoder_outputs_to_disk": False,
}

# The argparse type of each flag whose default's type does not say it: store_true flags are the False defaults,
# nargs="*" flags are lists of str, and the rest take one str unless named here.
_INTS = ("save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio", "save_last_n_epochs",
         "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state", "max_token_length",
         "max_train_epochs", "seed", "ddp_timeout", "clip_skip", "multires_noise_iterations", "min_timestep",
         "max_timestep", "sample_every_n_steps", "sample_every_n_epochs", "network_dim")
_FLOATS = ("noise_offset", "ip_noise_gamma", "adaptive_noise_scale", "min_snr_gamma", "v_pred_like_loss", "unet_lr",
           "text_encoder_lr", "network_dropout", "scale_weight_norms", "network_alpha", "lr_scheduler_power",
           "token_warmup_step", "max_grad_norm", "learning_rate", "prior_loss_weight", "huber_c",
           "multires_noise_discount", "caption_dropout_rate", "caption_tag_dropout_rate")
LIST_FLAGS = frozenset({"optimizer_args", "lr_scheduler_args", "network_args", "base_weights",
                        "base_weights_multiplier"})


# sd-scripts flags added after v0.8.7 (v0.9.x and main up to 48d368f, train_util.py, train_network.py and
# sdxl_train*.py) that act on training; the log, mmap and cache-check switches left out change no number
NEWER_FLAGS = frozenset({"alpha_mask", "blocks_to_swap", "cpu_offload_checkpointing", "fp8_base_unet",
                         "fused_backward_pass", "huber_scale", "initial_epoch", "initial_step", "logit_mean",
                         "logit_std", "lr_decay_steps", "lr_scheduler_min_lr_ratio", "lr_scheduler_timescale",
                         "max_validation_steps", "mode_scale", "resize_interpolation", "skip_until_initial_step",
                         "text_encoder_batch_size", "validate_every_n_epochs", "validate_every_n_steps",
                         "validation_seed", "validation_split", "weighting_scheme"})
NEWER_TEXT = "newer than v0.8.7 (version drift: it would change the numbers)"


def _flag_type(flag: str, default: object) -> type:
    if flag in LIST_FLAGS:
        return list
    if flag in _INTS:
        return int
    if flag in _FLOATS:
        return float
    return str if default is None else type(default)


V087_TYPES: dict[str, type] = {flag: _flag_type(flag, default) for flag, default in V087_DEFAULTS.items()}


def typed(flag: str, value: object) -> object:
    """`value` (a string from a command line or a GUI field, or a TOML value) as v0.8.7's argparse types `flag`;
    ValueError naming what it cannot read. A list flag's string is split on whitespace; bool flags take true/false."""
    kind = V087_TYPES[flag]
    if kind is list:
        items = value.split() if isinstance(value, str) else list(value)
        return [str(item) for item in items]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in ("true", "1"):
            return True
        if str(value).strip().lower() in ("false", "0", ""):
            return False
        raise ValueError(f"{value!r} is not true or false")
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ValueError(f"{value!r} is not {kind.__name__}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not {'an integer' if kind is int else 'a number'}") from None
