"""kohya's names that are not lora-sweep settings.

With `checks.keys.KOHYA_NAMES` (a flag -> its lora-sweep setting), `KOHYA_FLAGS` is the whole mapping of sd-scripts
v0.8.7's `sdxl_train_network.py` flags: every other flag (and `network_args` key), `Refused` (lora-sweep lacks what
it does) or `Fixed` (lora-sweep always behaves one way, or the flag changes nothing trained).
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
_TE_CACHE = "lora-sweep caches text-encoder outputs itself whenever the text encoders are frozen and a caption " \
            "cannot change between steps (docs/data.md); unlike v0.8.7 it applies prefix, suffix and wildcards first"

KOHYA_FLAGS: dict[str, Refused | Fixed] = {
    # models and data
    "v2": Refused("it loads a Stable Diffusion 2.x model; lora-sweep trains SDXL (model=sdxl) and its tiny "
                  "stand-in"),
    "vae": Refused("it loads a separate VAE; lora-sweep encodes with the VAE of model.path"),
    "tokenizer_cache_dir": Fixed(ANY, "lora-sweep reads the tokenizers from model.path"),
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
    "max_data_loader_n_workers": Fixed(0, "lora-sweep loads data in the training process, as v0.8.7 with 0 workers "
                                          "(the GUI's default): the epoch and step a batch sees lag as there "
                                          "(docs/data.md)"),
    "persistent_data_loader_workers": Fixed(ANY, "lora-sweep uses no data-loader worker processes"),
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
