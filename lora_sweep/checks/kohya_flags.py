"""kohya's names that are not lora-sweep settings, and how the kohya_ss GUI's keys reach sd-scripts' flags.

Three tables, with `checks.keys.KOHYA_NAMES` (a flag -> its lora-sweep setting) the whole mapping that an import of a
kohya config reads (docs/kohya.md):
- `KOHYA_FLAGS`: every other sd-scripts v0.8.7 `sdxl_train_network.py` flag (and `network_args` key), `Refused`
  (lora-sweep lacks what it does) or `Fixed` (lora-sweep always behaves one way, or the flag changes nothing trained);
- `GUI_KEYS`: the kohya_ss v24.1.4 LoRA tab's keys that do not become the sd-scripts flag of the same name: renamed,
  converted, spread over several flags, or GUI-only (`flags` empty);
- `LORA_TYPES`: the GUI `LoRA_type`s lora-sweep trains; `lora_type_problem` names any other.
The GUI's TOML leaves out every value that is "", False, None or 0 (docs/kohya.md), so a GUI key at such a value
sets nothing and sd-scripts' default applies.
"""

from __future__ import annotations

from dataclasses import dataclass

ANY = "any value"  # a `Fixed` flag whose value changes nothing lora-sweep trains


@dataclass(frozen=True)
class Refused:
    """A kohya flag lora-sweep does not support: set away from kohya's default, a run (or an import) stops."""

    reason: str


@dataclass(frozen=True)
class Fixed:
    """A kohya flag without a setting: lora-sweep always does what `value` asks (`ANY`: it changes nothing trained);
    another value is refused with `reason`."""

    value: object
    reason: str


# network_args keys (`--network_args block_dims=...`), not flags of their own
NETWORK_ARGS = frozenset({"conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "block_dims",
                          "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
                          "up_lr_weight", "block_lr_zero_threshold"})

_STATES = "lora-sweep saves its own training states (train.save_every, train.keep_states) and resumes from them " \
          "(train.resume); an accelerate state folder is not one"
_DEEPSPEED = "it configures DeepSpeed; lora-sweep trains each job on one device without it"
_HUB = "it uploads to (or downloads from) the Hugging Face Hub; lora-sweep writes local files only"
_LOGS = "it configures kohya's logging; lora-sweep records every run in MLflow (tracking.experiment, tracking.uri)"
_METADATA = "it only fills a modelspec.* field of the LoRA file; lora-sweep writes the title from train.output_name " \
            "and leaves author, description, license and tags out"
_BLOCKWISE = "v0.8.7 gives every SDXL U-Net module block index -1, so block-wise dims, alphas and lr weights do not " \
             "act per block"
_TE_CACHE = "lora-sweep caches a caption's text-encoder outputs itself when processing cannot change the caption, " \
            "after prefix, suffix and separators, which v0.8.7's cache ignores (docs/data.md)"

KOHYA_FLAGS: dict[str, Refused | Fixed] = {
    # models and data
    "v2": Refused("it loads a Stable Diffusion 2.x model; lora-sweep trains SDXL (model=sdxl) and its tiny "
                  "stand-in"),
    "vae": Refused("it loads a separate VAE; lora-sweep encodes with the VAE of model.path"),
    "tokenizer_cache_dir": Fixed(ANY, "lora-sweep reads the tokenizers from model.path's folder or its bundled "
                                      "copy, never the Hub"),
    "in_json": Refused("it reads a fine-tuning dataset (a metadata JSON); lora-sweep reads DreamBooth-style "
                       "datasets (data.dir, data.dataset_config)"),
    "dataset_class": Refused("it loads a user dataset class; lora-sweep reads data.dir or data.dataset_config"),
    "conditioning_data_dir": Refused("it reads mask images for --masked_loss, which lora-sweep lacks"),
    "face_crop_aug_range": Refused("it needs the pixels encoded at every step, which lora-sweep's latent cache "
                                   "does not do (docs/datasets.md)"),
    "debug_dataset": Refused("it shows the dataset instead of training; `python sweep.py --cfg job` prints the "
                             "composed config"),
    "weighted_captions": Refused("it reads (word:1.2) weights in training captions; lora-sweep encodes them as "
                                 "text"),
    "cache_info": Fixed(ANY, "lora-sweep keeps its own content-keyed cache"),
    "cache_latents": Fixed(True, "lora-sweep always caches one latent per image and flip (data.latent_sample) "
                                 "and never encodes at every step"),
    "cache_latents_to_disk": Fixed(ANY, "lora-sweep's latent cache is always on disk, in data.cache_dir"),
    "vae_batch_size": Fixed(ANY, "it only batches the latent caching"),
    "no_half_vae": Fixed(True, "lora-sweep always encodes latents with the VAE in fp32"),
    "cache_text_encoder_outputs": Fixed(ANY, _TE_CACHE),
    "cache_text_encoder_outputs_to_disk": Fixed(ANY, _TE_CACHE),
    "persistent_data_loader_workers": Fixed(False, "lora-sweep serves batches in the order of workers started anew "
                                                   "each epoch (docs/kohya-exact.md#data-order); persistent workers "
                                                   "keep their shuffled order from epoch to epoch"),
    "lowram": Fixed(ANY, "it only moves models between devices; lora-sweep places them itself"),
    "highvram": Fixed(ANY, "it only moves models between devices; lora-sweep places them itself"),
    # network
    "network_module": Fixed("networks.lora", "lora-sweep trains kohya's networks.lora: LoRA, and LoCon with "
                                             "network.conv_dim; it has no LyCORIS or DyLoRA network"),
    "base_weights": Refused("it merges LoRA files into the model before training; lora-sweep trains on "
                            "model.path as it is"),
    "base_weights_multiplier": Refused("it scales --base_weights, which lora-sweep lacks"),
    "block_dims": Refused(_BLOCKWISE), "block_alphas": Refused(_BLOCKWISE),
    "conv_block_dims": Refused(_BLOCKWISE), "conv_block_alphas": Refused(_BLOCKWISE),
    "down_lr_weight": Refused(_BLOCKWISE), "mid_lr_weight": Refused(_BLOCKWISE),
    "up_lr_weight": Refused(_BLOCKWISE), "block_lr_zero_threshold": Refused(_BLOCKWISE),
    "training_comment": Fixed(ANY, "it only fills ss_training_comment of the LoRA file"),
    "no_metadata": Fixed(False, "lora-sweep always writes the whole ss_* set"),
    "save_model_as": Fixed("safetensors", "lora-sweep saves .safetensors files only"),
    # loss, optimizer, schedule
    "masked_loss": Refused("it weights the loss by a mask (an image's alpha channel or conditioning_data_dir); "
                           "lora-sweep's loss has no mask"),
    "use_lion_optimizer": Refused("lion_pytorch's Lion is not an optimizer option; optimizer=lion8bit is "
                                  "bitsandbytes' Lion8bit"),
    "lr_scheduler_type": Refused("it builds a scheduler class by import path; lora-sweep builds v0.8.7's named "
                                 "schedules (optimizer.scheduler)"),
    # length, saving, sampling
    "save_n_epoch_ratio": Refused("set train.save_every_epochs instead (v0.8.7: floor(epochs / ratio), at least 1)"),
    "save_state": Refused(_STATES), "save_state_on_train_end": Refused(_STATES), "resume": Refused(_STATES),
    "save_last_n_epochs_state": Refused(_STATES), "save_last_n_steps_state": Refused(_STATES),
    "sample_every_n_epochs": Refused("lora-sweep samples every sampling.every optimizer steps, never by epoch"),
    "sample_at_first": Fixed(ANY, "lora-sweep samples at step 0 whenever it samples; samples never change what "
                                  "is trained"),
    # multi-GPU, DeepSpeed, the Hub, logging, the config file
    "ddp_timeout": Fixed(ANY, "one process per job: no distributed data parallel"),
    "ddp_gradient_as_bucket_view": Fixed(ANY, "one process per job: no distributed data parallel"),
    "ddp_static_graph": Fixed(ANY, "one process per job: no distributed data parallel"),
    "deepspeed": Refused(_DEEPSPEED), "zero_stage": Refused(_DEEPSPEED),
    "offload_optimizer_device": Refused(_DEEPSPEED), "offload_optimizer_nvme_path": Refused(_DEEPSPEED),
    "offload_param_device": Refused(_DEEPSPEED), "offload_param_nvme_path": Refused(_DEEPSPEED),
    "zero3_init_flag": Refused(_DEEPSPEED), "zero3_save_16bit_model": Refused(_DEEPSPEED),
    "fp16_master_weights_and_gradients": Refused(_DEEPSPEED),
    "huggingface_repo_id": Fixed(ANY, _HUB), "huggingface_repo_type": Fixed(ANY, _HUB),
    "huggingface_path_in_repo": Fixed(ANY, _HUB), "huggingface_token": Fixed(ANY, _HUB),
    "huggingface_repo_visibility": Fixed(ANY, _HUB), "save_state_to_huggingface": Fixed(ANY, _HUB),
    "async_upload": Fixed(ANY, _HUB), "resume_from_huggingface": Refused(_HUB),
    "logging_dir": Fixed(ANY, _LOGS), "log_with": Fixed(ANY, _LOGS), "log_prefix": Fixed(ANY, _LOGS),
    "log_tracker_name": Fixed(ANY, _LOGS), "log_tracker_config": Fixed(ANY, _LOGS),
    "wandb_run_name": Fixed(ANY, _LOGS), "wandb_api_key": Fixed(ANY, _LOGS),
    "console_log_level": Fixed(ANY, _LOGS), "console_log_file": Fixed(ANY, _LOGS),
    "console_log_simple": Fixed(ANY, _LOGS),
    "metadata_title": Fixed(ANY, _METADATA), "metadata_author": Fixed(ANY, _METADATA),
    "metadata_description": Fixed(ANY, _METADATA), "metadata_license": Fixed(ANY, _METADATA),
    "metadata_tags": Fixed(ANY, _METADATA),
    "config_file": Refused("lora-sweep reads Hydra configs: give each setting on the command line or in an "
                           "experiment file (conf/experiment/)"),
    "output_config": Refused("`python sweep.py --cfg job` prints the composed config without training"),
}


@dataclass(frozen=True)
class GuiKey:
    """How the GUI passes one of its keys on: `flags`, the sd-scripts flags (or network_args keys) it becomes, and
    `how`, the conversion when it is not the value as is; no flags: a GUI-only key, `how` says what it does."""

    flags: tuple[str, ...]
    how: str = ""


_LYCORIS = "used by the LyCORIS and DyLoRA types only; Standard and Kohya LoCon ignore it"
_ACCELERATE = "an `accelerate launch` option (one device per lora-sweep job)"
_GUI_IGNORES = "a key of an older GUI that v24.1.4 does not read"

GUI_KEYS: dict[str, GuiKey] = {
    "LoRA_type": GuiKey(("network_module", "network_args"),
                        "Standard: networks.lora; Kohya LoCon: networks.lora with network_args conv_dim and "
                        "conv_alpha; any other type is refused (LORA_TYPES)"),
    "sdxl": GuiKey((), "GUI only: true runs sdxl_train_network.py, whose flags this mapping covers; lora-sweep "
                       "trains SDXL only"),
    "max_resolution": GuiKey(("resolution",)),
    "optimizer": GuiKey(("optimizer_type",)),
    "lr_warmup": GuiKey(("lr_warmup_steps",), "a percentage of the GUI's max_train_steps: "
                                              "round(lr_warmup × max_train_steps / 100), half to even"),
    "epoch": GuiKey((), "GUI only: when the max_train_steps field is 0 and no dataset config is set, max_train_steps "
                        "= ceil(images × repeats / batch / accumulation × epoch × (2 with reg images)); and "
                        "lr_scheduler_num_cycles when that field is empty"),
    "max_train_steps": GuiKey(("max_train_steps",), "0 or empty: the GUI's estimate from epoch (see epoch)"),
    "lr_scheduler_num_cycles": GuiKey(("lr_scheduler_num_cycles",), "empty: the GUI's epoch"),
    "xformers": GuiKey(("xformers", "sdpa"), '"xformers" sets --xformers, "sdpa" sets --sdpa, "none" neither; '
                                             "an older preset's true means xformers"),
    "sdxl_cache_text_encoder_outputs": GuiKey(("cache_text_encoder_outputs",)),
    "sdxl_no_half_vae": GuiKey(("no_half_vae",)),
    "lora_network_weights": GuiKey(("network_weights",), "an older GUI's name, renamed on load"),
    "conv_dim": GuiKey(("conv_dim",), "a network_args entry for Kohya LoCon only; Standard ignores it"),
    "conv_alpha": GuiKey(("conv_alpha",), "a network_args entry for Kohya LoCon only; Standard ignores it"),
    "rank_dropout": GuiKey(("rank_dropout",), "a network_args entry when non-zero"),
    "module_dropout": GuiKey(("module_dropout",), "a network_args entry when non-zero"),
    **{key: GuiKey((key,), "a network_args entry when non-empty")
       for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                   "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")},
    "additional_parameters": GuiKey((), "more sd-scripts flags, appended to the command line as typed (quotes "
                                        "removed, split on spaces); each maps as its flag does"),
    "noise_offset_type": GuiKey((), "GUI only: it shows the Original or the Multires fields; both noise_offset and "
                                    "multires_noise_* are written as set, hidden or not"),
    "learning_rate": GuiKey(("learning_rate",), "0 is left out, so v0.8.7's 2e-6 applies"),
    "unet_lr": GuiKey(("unet_lr", "network_train_unet_only", "network_train_text_encoder_only"),
                      "0 is left out (learning_rate applies); non-zero with text_encoder_lr 0 sets "
                      "network_train_unet_only, 0 with text_encoder_lr non-zero network_train_text_encoder_only. "
                      "lora-sweep has no separate U-Net lr: one apart from learning_rate is train.lr, with "
                      "train.text_encoder_lr the learning_rate"),
    "text_encoder_lr": GuiKey(("text_encoder_lr", "network_train_unet_only", "network_train_text_encoder_only"),
                              "0 is left out (learning_rate applies); 0 with unet_lr non-zero sets "
                              "network_train_unet_only, non-zero with unet_lr 0 network_train_text_encoder_only"),
    "max_grad_norm": GuiKey(("max_grad_norm",), "0 is left out, so v0.8.7 clips at 1.0: the GUI cannot turn "
                                                "clipping off"),
    "network_alpha": GuiKey(("network_alpha",), "0 is left out, so alpha is 1, not network_dim"),
    "sample_prompts": GuiKey(("sample_prompts",), "the prompts' text, which the GUI writes to "
                                                  "<output_dir>/prompt.txt and passes as the file"),
    "stop_text_encoder_training": GuiKey((), "GUI only: v24.1.4 ignores it with a warning"),
    "stop_text_encoder_training_pct": GuiKey((), "GUI only: v24.1.4 ignores it with a warning"),
    "model_list": GuiKey((), "GUI only: the model dropdown; pretrained_model_name_or_path is what trains"),
    "training_preset": GuiKey((), "GUI only: the preset's name"),
    "num_cpu_threads_per_process": GuiKey((), _ACCELERATE),
    "num_processes": GuiKey((), _ACCELERATE), "num_machines": GuiKey((), _ACCELERATE),
    "multi_gpu": GuiKey((), _ACCELERATE), "gpu_ids": GuiKey((), _ACCELERATE),
    "main_process_port": GuiKey((), _ACCELERATE), "extra_accelerate_launch_args": GuiKey((), _ACCELERATE),
    "dynamo_mode": GuiKey((), _ACCELERATE), "dynamo_use_fullgraph": GuiKey((), _ACCELERATE),
    "dynamo_use_dynamic": GuiKey((), _ACCELERATE),
    "dynamo_backend": GuiKey(("dynamo_backend",), "also an accelerate option; v0.8.7 uses it only with "
                                                  "--torch_compile, which the GUI cannot set"),
    **{key: GuiKey((), _LYCORIS)
       for key in ("LyCORIS_preset", "factor", "bypass_mode", "dora_wd", "use_cp", "use_tucker", "use_scalar",
                   "rank_dropout_scale", "constrain", "rescaled", "train_norm", "decompose_both", "train_on_input",
                   "unit")},
    "conv_dims": GuiKey((), _GUI_IGNORES), "conv_alphas": GuiKey((), _GUI_IGNORES),
    "no_token_padding": GuiKey((), _GUI_IGNORES),
}

# GUI LoRA_type -> its network_args keys (both train v0.8.7's networks.lora)
LORA_TYPES = {"Standard": (), "Kohya LoCon": ("conv_dim", "conv_alpha")}


def flag_text(name: str) -> str:
    """`--masked_loss` for a flag; `network_args block_dims=` for a network_args key."""
    return f"network_args {name}=" if name in NETWORK_ARGS else f"--{name}"


def not_a_setting_message(name: str) -> str | None:
    """One paragraph for kohya's `name` typed as a lora-sweep setting: why it is refused, or why no setting is
    needed; None when `name` is not in KOHYA_FLAGS."""
    entry = KOHYA_FLAGS.get(name)
    if entry is None:
        return None
    verdict = "is not supported by lora-sweep" if isinstance(entry, Refused) else "is not a lora-sweep setting"
    return f"kohya's {flag_text(name)} {verdict}: {entry.reason}."


def gui_key_flags(key: str) -> tuple[str, ...]:
    """The sd-scripts flags (or network_args keys) GUI `key` becomes: GUI_KEYS' entry, else the flag of its name."""
    return GUI_KEYS[key].flags if key in GUI_KEYS else (key,)


def lora_type_problem(lora_type: str) -> str | None:
    """None for a LoRA_type lora-sweep trains; else one paragraph naming it."""
    if lora_type in LORA_TYPES:
        return None
    return (f"The kohya_ss LoRA_type '{lora_type}' is not supported by lora-sweep: it trains kohya's networks.lora "
            f"only, LoRA_type {' or '.join(repr(t) for t in LORA_TYPES)} (LoCon with network.conv_dim); LyCORIS, "
            f"DyLoRA and LoRA-FA networks are other modules.")
