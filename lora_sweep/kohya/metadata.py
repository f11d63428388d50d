"""A LoRA .safetensors's ss_* metadata (sd-scripts v0.8.7 and nearby, or lora-sweep's, which adds lora_sweep_* keys)
read back into kohya args. What v0.8.7 does not record (reference §10.3) is listed as unknown: the import writes
v0.8.7's default for it and says so.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lora_sweep.kohya.flags import V087_DEFAULTS
from lora_sweep.kohya.sources import KohyaSource

# ss_* keys whose flag has another name
_RENAMED = {"ss_debiased_estimation": "debiased_estimation_loss", "ss_batch_size_per_device": "train_batch_size",
            "lora_sweep_fp8_base": "fp8_base", "lora_sweep_full_bf16": "full_bf16",
            "lora_sweep_v_parameterization": "v_parameterization", "lora_sweep_v_pred_like_loss": "v_pred_like_loss",
            "lora_sweep_scale_v_pred_loss_like_noise_pred": "scale_v_pred_loss_like_noise_pred",
            "lora_sweep_caption_extension": "caption_extension",
            "lora_sweep_train_unet_only": "network_train_unet_only"}
# facts of one training, not settings
_FACTS = {"ss_session_id", "ss_training_started_at", "ss_training_finished_at", "ss_num_train_images",
          "ss_num_reg_images", "ss_num_batches_per_epoch", "ss_num_epochs", "ss_steps", "ss_epoch",
          "ss_sd_scripts_commit_hash", "ss_tag_frequency", "ss_bucket_info", "ss_total_batch_size",
          "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_vae_hash", "ss_new_vae_hash", "sshs_model_hash",
          "sshs_legacy_hash", "ss_base_model_version", "ss_reg_dataset_dirs"}
# v0.8.7 flags its metadata does not record (reference §10.3; the rest of the 170 are runtime or logging)
UNRECORDED = ("lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_args", "lr_scheduler_type",
              "network_train_unet_only", "network_train_text_encoder_only", "network_weights", "dim_from_weights",
              "base_weights", "base_weights_multiplier", "full_bf16", "fp8_base", "no_half_vae", "save_precision",
              "xformers", "sdpa", "mem_eff_attn", "torch_compile", "dynamo_backend", "max_data_loader_n_workers",
              "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "masked_loss", "caption_separator",
              "caption_extension", "token_warmup_min", "token_warmup_step", "enable_wildcard",
              "keep_tokens_separator", "secondary_separator", "caption_prefix", "caption_suffix",
              "bucket_reso_steps", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
              "save_last_n_steps", "v_parameterization", "sample_prompts", "sample_every_n_steps",
              "sample_sampler")
# what a LoRA lora-sweep wrote cannot give back: UNRECORDED less the flags its lora_sweep_* keys record and those
# lora-sweep fixes or refuses (docs/kohya.md "What round-trips")
NOT_IN_LORA_METADATA = ("lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_args",
                        "network_train_text_encoder_only", "network_weights", "dim_from_weights", "save_precision",
                        "xformers", "sdpa", "mem_eff_attn", "torch_compile", "dynamo_backend", "caption_separator",
                        "token_warmup_min", "token_warmup_step", "enable_wildcard", "keep_tokens_separator",
                        "secondary_separator", "caption_prefix", "caption_suffix", "bucket_reso_steps",
                        "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps",
                        "sample_prompts", "sample_every_n_steps", "sample_sampler")


def read_header(path: Path) -> dict[str, str]:
    """The safetensors header's __metadata__ (strings), read without loading a tensor; ValueError if not one."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise ValueError("not a safetensors file (header size)")
        header = json.loads(f.read(size))
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("not a safetensors header")
    return meta


def _optimizer(text: str) -> tuple[str, list[str]]:
    """`prodigyopt.prodigy.Prodigy(decouple=True,betas=(0.9, 0.99))` -> ("Prodigy", ["decouple=True", ...])."""
    name, _, rest = text.partition("(")
    kind = name.rsplit(".", 1)[-1]
    kind = "SGDNesterov" if kind == "SGD" else kind
    items, depth, current = [], 0, ""
    for char in rest[:-1] if rest.endswith(")") else rest:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items += [current] if current else []
    return kind, [item.strip().replace(" ", "") for item in items]


def read_lora(path: Path) -> KohyaSource:
    """A LoRA file's metadata as the flags that trained it; data and model paths are missing (only basenames are
    recorded) and the §10.3 flags unknown."""
    src = KohyaSource(str(path))
    try:
        meta = read_header(path)
    except (OSError, ValueError) as err:
        src.problem("the file", f"not a readable .safetensors file ({err})")
        return src
    if not any(key.startswith("ss_") for key in meta):
        src.problem("the file", "its metadata has no ss_* keys: not written by sd-scripts or lora-sweep")
        return src
    version = meta.get("ss_base_model_version", "")
    if version and not version.startswith("sdxl"):
        src.problem("ss_base_model_version", f"{version!r}: lora-sweep trains SDXL LoRAs")
    for key, text in meta.items():
        origin = f"{key} = {text!r}"
        flag = _RENAMED.get(key, key[3:] if key.startswith("ss_") else "")
        if key in _FACTS or not flag:
            continue
        if key == "ss_optimizer":
            kind, items = _optimizer(text)
            src.set("optimizer_type", kind, origin)
            if items:
                src.set("optimizer_args", items, origin)
        elif key == "ss_network_args":
            args = json.loads(text)
            src.set("network_args", [f"{k}={v}" for k, v in args.items() if k != "dropout"], origin)
        elif key == "ss_resolution":
            src.set("resolution", text.strip("()").replace(" ", ""), origin)
        elif key == "ss_sd_model_name":
            src.missing["pretrained_model_name_or_path"] = f"the LoRA records only the name {text!r}"
        elif key == "ss_dataset_dirs":
            dirs = json.loads(text)
            src.missing["train_data_dir"] = "the LoRA records only the folder names " + ", ".join(
                f"{name!r} ({d['img_count']} images x {d['n_repeats']})" for name, d in dirs.items()) \
                if dirs else "the LoRA records no image folder"
        elif key == "ss_datasets":
            src.missing["dataset_config"] = "the LoRA was trained from a dataset config, which it records only " \
                                           "in part (folder basenames)"
            datasets = json.loads(text)
            if datasets:
                src.set("train_batch_size", datasets[0]["batch_size_per_device"], origin)
        elif flag in V087_DEFAULTS and text != "None":
            src.set(flag, text, origin)
    timesteps = meta.get("modelspec.timestep_range")
    if timesteps:
        low, _, high = timesteps.partition(",")
        src.set("min_timestep", low, f"modelspec.timestep_range = {timesteps!r}")
        src.set("max_timestep", high, f"modelspec.timestep_range = {timesteps!r}")
    src.unrecorded = [flag for flag in UNRECORDED if flag not in src.args]
    return src
