"""OneTrainer's `ot_config` header (a JSON of its TrainConfig, modules/util/config/TrainConfig.py, written into a
.safetensors when "include train config" is on) read into kohya args: each field that has a lora-sweep setting is
translated to the kohya flag of that setting; every other field is "not supported: OneTrainer ...".
"""

from __future__ import annotations

import json

from lora_sweep.kohya.sources import KohyaSource

# OneTrainer's Optimizer, LearningRateScheduler and DataType names -> kohya's --optimizer_type, --lr_scheduler and
# --mixed_precision; one missing here has no lora-sweep counterpart
OPTIMIZERS = {"ADAMW": "AdamW", "ADAMW_8BIT": "AdamW8bit", "PRODIGY": "Prodigy", "ADAFACTOR": "Adafactor",
              "DADAPT_ADAM": "DAdaptAdam", "LION_8BIT": "Lion8bit", "PAGED_ADAMW_8BIT": "PagedAdamW8bit"}
SCHEDULERS = {"CONSTANT": "constant", "LINEAR": "linear", "COSINE": "cosine",
              "COSINE_WITH_RESTARTS": "cosine_with_restarts", "ADAFACTOR": "adafactor"}
PRECISIONS = {"FLOAT_16": "fp16", "BFLOAT_16": "bf16", "FLOAT_32": "no"}
# TrainConfig field -> the kohya flag of the same meaning
SAME = {"learning_rate": "learning_rate", "lora_rank": "network_dim", "lora_alpha": "network_alpha",
        "batch_size": "train_batch_size", "epochs": "max_train_epochs",
        "gradient_accumulation_steps": "gradient_accumulation_steps", "offset_noise_weight": "noise_offset",
        "perturbation_noise_weight": "ip_noise_gamma", "dropout_probability": "network_dropout"}
# optimizer fields -> kohya's --optimizer_args key
OPTIMIZER_ARGS = ("weight_decay", "eps", "d0", "d_coef", "decouple", "use_bias_correction", "safeguard_warmup",
                  "relative_step", "scale_parameter", "warmup_init")
# fields read below, not listed as unsupported
_READ = set(SAME) | {"optimizer", "learning_rate_scheduler", "learning_rate_warmup_steps", "learning_rate_cycles",
                     "train_dtype", "resolution", "loss_weight_fn", "loss_weight_strength", "clip_grad_norm",
                     "model_type", "base_model_name", "unet", "text_encoder", "text_encoder_2", "concepts",
                     "generalized_offset_noise", "min_noising_strength", "max_noising_strength"}


def read_onetrainer(text: str, src: KohyaSource) -> None:
    """`ot_config` into `src`: flags with their origin "ot_config <field> = value"; the base model and the concepts'
    folders missing; every other field in `src.unsupported`."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        src.problem("ot_config", f"not OneTrainer's JSON ({err})")
        return
    if config.get("model_type") != "STABLE_DIFFUSION_XL_10_BASE":
        src.problem("ot_config", f"model_type {config.get('model_type')!r}: lora-sweep trains SDXL "
                                 f"(STABLE_DIFFUSION_XL_10_BASE) LoRAs")
        return

    def put(flag: str, value: object, field: str) -> None:
        src.set(flag, value, f"ot_config {field} = {value!r}")

    for field, flag in SAME.items():
        if config.get(field) not in (None, 0, 0.0) or field in ("learning_rate", "lora_alpha"):
            put(flag, config.get(field), field)
    _optimizer(config, src, put)
    _schedule(config, src, put)
    precision = PRECISIONS.get(str(config.get("train_dtype")))
    if precision is None:
        src.unsupported["train_dtype"] = (config.get("train_dtype"), "OneTrainer's train_dtype: lora-sweep trains "
                                                                     "in fp16, bf16 or fp32")
    else:
        put("mixed_precision", precision, "train_dtype")
    resolution = str(config.get("resolution", ""))
    if resolution.isdigit():
        put("resolution", f"{resolution},{resolution}", "resolution")
    elif "x" in resolution and resolution.replace("x", "").isdigit():
        put("resolution", resolution.replace("x", ","), "resolution")
    else:
        src.unsupported["resolution"] = (resolution, "OneTrainer's multi-resolution list: give one resolution")
    weight = config.get("loss_weight_fn", "CONSTANT")
    if weight == "MIN_SNR_GAMMA":
        put("min_snr_gamma", config.get("loss_weight_strength"), "loss_weight_strength")
    elif weight == "DEBIASED_ESTIMATION":
        put("debiased_estimation_loss", True, "loss_weight_fn")
    elif weight != "CONSTANT":
        src.unsupported["loss_weight_fn"] = (weight, "OneTrainer's loss weighting: lora-sweep has min_snr and "
                                                     "debiased only")
    put("max_grad_norm", config.get("clip_grad_norm") or 0.0, "clip_grad_norm")  # None: OneTrainer does not clip
    if config.get("generalized_offset_noise"):
        src.unsupported["generalized_offset_noise"] = (True, "OneTrainer's generalized offset noise: lora-sweep "
                                                             "has kohya's offset noise")
    low, high = config.get("min_noising_strength", 0.0), config.get("max_noising_strength", 1.0)
    if (low, high) != (0.0, 1.0):
        put("min_timestep", round(low * 1000), "min_noising_strength")
        put("max_timestep", round(high * 1000), "max_noising_strength")
    _parts(config, src, put)
    for field, value in config.items():
        if field not in _READ and not field.startswith("__"):
            src.unsupported.setdefault(field, (value, f"OneTrainer's {field}: no lora-sweep setting"))


def _optimizer(config: dict, src: KohyaSource, put) -> None:
    optimizer = config.get("optimizer") or {}
    name = optimizer.get("optimizer")
    if name not in OPTIMIZERS:
        src.problem("ot_config", f"optimizer {name!r}: lora-sweep has no such optimizer; it has "
                                 f"{', '.join(OPTIMIZERS)}")
        return
    put("optimizer_type", OPTIMIZERS[name], "optimizer.optimizer")
    args = [f"{key}={optimizer[key]}" for key in OPTIMIZER_ARGS if optimizer.get(key) is not None]
    if optimizer.get("beta1") is not None and optimizer.get("beta2") is not None:
        args.append(f"betas=({optimizer['beta1']},{optimizer['beta2']})")
    if args:
        put("optimizer_args", args, "optimizer")


def _schedule(config: dict, src: KohyaSource, put) -> None:
    name = config.get("learning_rate_scheduler", "CONSTANT")
    warmup = config.get("learning_rate_warmup_steps") or 0
    scheduler = SCHEDULERS.get(name)
    if scheduler is None:
        src.unsupported["learning_rate_scheduler"] = (name, f"OneTrainer's {name}: lora-sweep has "
                                                            f"{', '.join(SCHEDULERS)}")
        return
    if scheduler == "constant" and warmup:  # OneTrainer warms up any schedule; kohya's constant does not
        scheduler = "constant_with_warmup"
    put("lr_scheduler", scheduler, "learning_rate_scheduler")
    if warmup and float(warmup).is_integer():
        put("lr_warmup_steps", int(warmup), "learning_rate_warmup_steps")
    elif warmup:
        src.unsupported["learning_rate_warmup_steps"] = (warmup, "a fraction of the steps: give a step count")
    if config.get("learning_rate_cycles") not in (None, 1, 1.0):
        put("lr_scheduler_num_cycles", int(config["learning_rate_cycles"]), "learning_rate_cycles")


def _parts(config: dict, src: KohyaSource, put) -> None:
    """unet / text_encoder / text_encoder_2: which are trained and their learning rates; the base model and the
    concepts' folders, which are this machine's paths no longer."""
    unet, te1, te2 = (config.get(part) or {} for part in ("unet", "text_encoder", "text_encoder_2"))
    if unet.get("train", True) and not te1.get("train", True) and not te2.get("train", True):
        put("network_train_unet_only", True, "text_encoder.train")
    elif not unet.get("train", True):
        put("network_train_text_encoder_only", True, "unet.train")
    if unet.get("learning_rate") is not None:
        put("unet_lr", unet["learning_rate"], "unet.learning_rate")
    if te1.get("learning_rate") is not None:
        put("text_encoder_lr", te1["learning_rate"], "text_encoder.learning_rate")
    src.missing["pretrained_model_name_or_path"] = f"OneTrainer records the name {config.get('base_model_name')!r}"
    folders = [c.get("path") for c in config.get("concepts") or [] if isinstance(c, dict)]
    src.missing["train_data_dir"] = ("OneTrainer's concepts: " + ", ".join(map(repr, folders)) + "; lay them out "
                                     "as <repeats>_<name> folders") if folders else "OneTrainer records no concept"
