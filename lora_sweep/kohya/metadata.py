"""A LoRA .safetensors's ss_* metadata (sd-scripts v0.8.7 and nearby, or lora-sweep's, which adds lora_sweep_* keys)
read back into kohya args. What v0.8.7 does not record (reference §10.3) is listed as unknown: the import writes
v0.8.7's default for it and says so.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lora_sweep.kohya.flags import V087_DEFAULTS
from lora_sweep.kohya.onetrainer import read_onetrainer
from lora_sweep.kohya.sources import KohyaSource
from lora_sweep.training.precision import KOHYA_TO_PRECISION

# ss_* keys whose flag has another name
_RENAMED = {"ss_debiased_estimation": "debiased_estimation_loss", "ss_vae_name": "vae",
            "ss_batch_size_per_device": "train_batch_size",
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
# v0.8.7 flags its metadata does not record (reference §10.3; the rest of the 170 are runtime or logging; fp8_base,
# which picks the precision option, is a required value instead)
UNRECORDED = ("lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_args", "lr_scheduler_type",
              "network_train_unet_only", "network_train_text_encoder_only", "network_weights", "dim_from_weights",
              "base_weights", "base_weights_multiplier", "full_bf16", "no_half_vae", "save_precision",
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
                        "sample_prompts", "sample_every_n_steps", "sample_sampler", "max_data_loader_n_workers")


def read_header(path: Path) -> dict[str, str]:
    """The safetensors header's __metadata__ (strings), read without loading a tensor; ValueError if not one."""
    return read_header_and_names(path)[0]


def read_header_and_names(path: Path) -> tuple[dict[str, str], list[str]]:
    """The header's __metadata__ and its tensors' names, read without loading a tensor; ValueError if not one."""
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
    return meta, [name for name in header if name != "__metadata__"]


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


def read_lora(path: Path, data: Path | None = None) -> KohyaSource:
    """A LoRA file's metadata as the flags that trained it; the model path is missing and the §10.3 flags unknown.
    Only the image folders' names are recorded: each is looked for in `data` (--data DIR), else missing; a
    dataset config's ss_datasets is rebuilt as data.datasets."""
    src = KohyaSource(str(path))
    try:
        meta, names = read_header_and_names(path)
    except (OSError, ValueError) as err:
        src.problem("the file", f"not a readable .safetensors file ({err})")
        return src
    if "ot_config" in meta:  # OneTrainer's, which adds ss_base_model_version only
        read_onetrainer(meta["ot_config"], src)
        return src
    if not any(key.startswith("ss_") for key in meta):
        src.problem("the file", "its metadata has no ss_* keys (nor OneTrainer's ot_config): not written by "
                                "sd-scripts, lora-sweep or OneTrainer with its config")
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
        elif key == "ss_dataset_dirs" and "ss_datasets" not in meta:
            dirs = json.loads(text)
            if data is not None and dirs and all((data / name).is_dir() for name in dirs):
                src.set("train_data_dir", str(data.resolve()), f"{key}: its folders, found in --data {data}")
                continue
            src.missing["train_data_dir"] = "the LoRA records only the folder names " + ", ".join(
                f"{name!r} ({d['img_count']} images x {d['n_repeats']})" for name, d in dirs.items()) \
                if dirs else "the LoRA records no image folder"
        elif key == "ss_datasets":
            datasets = json.loads(text)
            src.settings["data.datasets"] = (rebuilt_datasets(datasets, data, src), f"{key}, rebuilt")
            if datasets:
                src.set("train_batch_size", datasets[0]["batch_size_per_device"], origin)
        elif flag in V087_DEFAULTS and text != "None":
            src.set(flag, text, origin)
        elif flag not in V087_DEFAULTS:  # a newer sd-scripts' key: shown, as an unknown TOML or GUI key is
            src.unknown[flag] = text
    timesteps = meta.get("modelspec.timestep_range")
    if timesteps:
        low, _, high = timesteps.partition(",")
        src.set("min_timestep", low, f"modelspec.timestep_range = {timesteps!r}")
        src.set("max_timestep", high, f"modelspec.timestep_range = {timesteps!r}")
    _trained_modules(names, src)
    src.unrecorded = [flag for flag in UNRECORDED if flag not in src.args]
    _fp8_base(src)
    return src


def _fp8_base(src: KohyaSource) -> None:
    """--fp8_base, which v0.8.7's metadata does not record, picks the precision option: a required value unless the
    mixed precision rules fp8 out (no kohya default may pick it silently)."""
    mixed = src.args.get("mixed_precision", V087_DEFAULTS["mixed_precision"])
    fp8 = KOHYA_TO_PRECISION.get((mixed, True))
    if "fp8_base" not in src.args and fp8 is not None:
        src.missing["fp8_base"] = (f"the LoRA does not record --fp8_base: precision={fp8} if it loaded the model in "
                                   f"fp8, else precision={KOHYA_TO_PRECISION[(mixed, False)]}")


def _trained_modules(names: list[str], src: KohyaSource) -> None:
    """network_train_unet_only / _text_encoder_only from the tensors' names when the metadata does not say:
    kohya's networks.lora names them lora_unet_*, lora_te1_* and lora_te2_*."""
    if not names or {"network_train_unet_only", "network_train_text_encoder_only"} & set(src.args):
        return
    unet = any(name.startswith("lora_unet_") for name in names)
    text = any(name.startswith(("lora_te1_", "lora_te2_", "lora_te_")) for name in names)
    if unet and not text:
        src.set("network_train_unet_only", True, "its tensors: lora_unet_* only")
    elif text and not unet:
        src.set("network_train_text_encoder_only", True, "its tensors: lora_te1_*/lora_te2_* only")


# a subset's ss_datasets keys a dataset config takes, at v0.8.7's default (left out of the rebuilt subset)
_SUBSET_DEFAULTS = {"num_repeats": None, "class_tokens": None, "is_reg": False, "keep_tokens": 0, "flip_aug": False,
                    "shuffle_caption": False, "keep_tokens_separator": "", "secondary_separator": None,
                    "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None, "color_aug": False,
                    "random_crop": False}


def rebuilt_datasets(datasets: list[dict], data: Path | None, src: KohyaSource) -> list[dict]:
    """ss_datasets as data.datasets: each dataset's resolution, batch size and bucket settings, each subset's keys
    (ss_datasets holds no caption extension, caption dropout or bucket steps: kohya's defaults apply). An image_dir
    is only a name: found in `data`, else "???" (Hydra's required value) and a missing row asking where it is."""
    rebuilt = []
    for i, dataset in enumerate(datasets):
        entry: dict[str, object] = {}
        width, height = dataset.get("resolution") or (None, None)
        if width is not None:
            entry["resolution"] = width if width == height else [width, height]
        entry["batch_size"] = dataset.get("batch_size_per_device", 1)
        for key in ("enable_bucket", "min_bucket_reso", "max_bucket_reso"):
            if dataset.get(key) is not None:
                entry[key] = dataset[key]
        entry["subsets"] = []
        for j, subset in enumerate(dataset.get("subsets", [])):
            name = str(subset.get("image_dir", ""))
            folder = data / name if data is not None and name else None
            rebuilt_subset: dict[str, object] = {"image_dir": "???"}
            if folder is not None and folder.is_dir():
                rebuilt_subset["image_dir"] = str(folder.resolve())
            else:
                src.missing[f"datasets[{i}].subsets[{j}].image_dir"] = (
                    f"where is {name!r} ({subset.get('img_count')} images)? Give --data DIR, a folder holding a "
                    f"folder of that name, or write its path in the experiment")
            rebuilt_subset |= {key: subset[key] for key, default in _SUBSET_DEFAULTS.items()
                               if key in subset and subset[key] != default}
            entry["subsets"].append(rebuilt_subset)
        rebuilt.append(entry)
    return rebuilt
