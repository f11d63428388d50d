"""The schema's keys, and `unknown_key_message` for a key it lacks: the closest real keys, kohya's names included."""

from __future__ import annotations

import functools
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_sweep.checks.kohya_flags import not_a_setting_message
from lora_sweep.config import CONF_DIR, Config, flatten, to_container

FREE_FORM = ("optimizer.args", "optimizer.lr_scheduler_args")  # any key goes; checked against the class / schedule
# kohya's flag name -> ours (`network_dim` -> network.rank); `<group>.<rest>` also matches `<group>_<rest>`
KOHYA_NAMES = {
    "network_dim": "network.rank", "dim": "network.rank", "network_alpha": "network.alpha",
    "network_dropout": "network.dropout", "noise_offset": "noise.offset",
    "noise_offset_random_strength": "noise.offset_random_strength", "adaptive_noise_scale": "noise.adaptive_scale",
    "multires_noise_iterations": "noise.multires_iterations", "multires_noise_discount": "noise.multires_discount",
    "ip_noise_gamma": "noise.ip_gamma", "ip_noise_gamma_random_strength": "noise.ip_gamma_random_strength",
    "loss_type": "loss.type", "debiased_estimation_loss": "loss.debiased", "optimizer_type": "optimizer.name",
    "optimizer_args": "optimizer.optimizer_args",
    # the lr of every group without its own, polynomial's lr_init, adafactor:<lr>, ss_learning_rate: all read
    # train.lr, which follows optimizer.lr (the option's default lr)
    "learning_rate": "train.lr",
    "lr_scheduler": "optimizer.scheduler", "lr_warmup_steps": "optimizer.warmup_steps",
    "mixed_precision": "precision.name",
    "max_train_steps": "train.max_steps", "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "save_every_n_steps": "train.save_every",
    "save_every_n_epochs": "train.save_every_epochs", "v_parameterization": "model.v_prediction",
    "pretrained_model_name_or_path": "model.path", "train_data_dir": "data.dir",
    "sample_prompts": "sampling.prompt_file", "sample_every_n_steps": "sampling.every",
    "sample_sampler": "sampling.sampler",
    "dataset_config": "data.dataset_config", "reg_data_dir": "data.reg_data_dir",
    "prior_loss_weight": "loss.prior_loss_weight",
    "caption_dropout_rate": "data.caption_dropout_rate",
    "caption_dropout_every_n_epochs": "data.caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate": "data.caption_tag_dropout_rate", "caption_prefix": "data.caption_prefix",
    "caption_suffix": "data.caption_suffix", "keep_tokens_separator": "data.keep_tokens_separator",
    "secondary_separator": "data.secondary_separator", "enable_wildcard": "data.enable_wildcard",
    "token_warmup_min": "data.token_warmup_min", "token_warmup_step": "data.token_warmup_step",
    "shuffle_caption": "data.shuffle_caption", "keep_tokens": "data.keep_tokens",
    "caption_separator": "data.caption_separator", "caption_extension": "data.caption_extension",
    "max_token_length": "data.max_token_length",
    # issue 33: the workers v0.8.7's image order depends on
    "max_data_loader_n_workers": "data.max_data_loader_n_workers",
    "flip_aug": "data.flip_aug", "random_crop": "data.random_crop", "color_aug": "data.color_aug",
    "enable_bucket": "data.enable_bucket", "bucket_no_upscale": "data.bucket_no_upscale",
    "bucket_reso_steps": "data.bucket_reso_steps", "min_bucket_reso": "data.min_bucket_reso",
    "max_bucket_reso": "data.max_bucket_reso", "resolution": "data.resolution", "num_repeats": "data.datasets",
    "dataset_repeats": "data.datasets", "class_tokens": "data.datasets", "is_reg": "data.datasets",
    "image_dir": "data.datasets", "subsets": "data.datasets", "network_multiplier": "data.datasets",
    # issue 27: the network
    "conv_dim": "network.conv_dim", "conv_alpha": "network.conv_alpha", "rank_dropout": "network.rank_dropout",
    "module_dropout": "network.module_dropout", "network_weights": "network.network_weights",
    "dim_from_weights": "network.dim_from_weights", "scale_weight_norms": "network.scale_weight_norms",
    "network_train_unet_only": "network.network_train_unet_only",
    "network_train_text_encoder_only": "network.network_train_text_encoder_only",
    "network_args": "network.network_args",
    # issue 28: schedules, optimizers, epochs, saving and switches
    "lr_scheduler_num_cycles": "optimizer.lr_scheduler_num_cycles",
    "lr_scheduler_power": "optimizer.lr_scheduler_power", "lr_scheduler_args": "optimizer.lr_scheduler_args",
    # the U-Net's lr: no key of its own, so a --unet_lr apart from --learning_rate is train.lr with
    # train.text_encoder_lr set to the --learning_rate (docs/kohya.md)
    "unet_lr": "train.lr", "max_train_epochs": "train.max_train_epochs",
    "save_last_n_epochs": "train.save_last_n_epochs", "save_last_n_steps": "train.save_last_n_steps",
    "save_precision": "train.save_precision", "torch_compile": "train.torch_compile",
    "dynamo_backend": "train.dynamo_backend", "sdpa": "train.sdpa", "xformers": "train.xformers",
    "mem_eff_attn": "train.mem_eff_attn", "zero_terminal_snr": "loss.zero_terminal_snr",
    "scale_v_pred_loss_like_noise_pred": "loss.scale_v_pred_loss_like_noise_pred",
    "v_pred_like_loss": "loss.v_pred_like_loss", "full_fp16": "precision.full_fp16",
    "full_bf16": "precision.full_bf16", "clip_skip": "model.clip_skip",
    # the other v0.8.7 flags that are settings (checks/kohya_flags.py has the rest, refused or fixed)
    "seed": "train.seed", "output_dir": "train.output_dir", "output_name": "train.output_name",
    "max_grad_norm": "train.max_grad_norm", "gradient_checkpointing": "train.gradient_checkpointing",
    "text_encoder_lr": "train.text_encoder_lr", "min_timestep": "noise.min_timestep",
    "max_timestep": "noise.max_timestep", "huber_c": "loss.huber_c", "huber_schedule": "loss.huber_schedule",
    "min_snr_gamma": "loss.min_snr_gamma", "fp8_base": "precision.name", "use_8bit_adam": "optimizer.name",
    "caption_extention": "data.caption_extension",
}


def schema_keys() -> list[str]:
    """Every setting of the schema, dotted (`noise.offset`, ..., `optimizer.args`)."""
    return list(_schema_keys())


@functools.lru_cache(maxsize=1)
def _schema_keys() -> tuple[str, ...]:
    return tuple(flatten(to_container(OmegaConf.structured(Config))))


def config_groups() -> list[str]:
    """The config groups of conf/ (`noise`, `experiment`, ...): what `group=option` may name."""
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra") if CONF_DIR.is_dir() else []


def is_free_form(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FREE_FORM)


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys of a composed config the schema lacks (added with `+key=value`; nothing would read them).
    Free-form maps and the `hydra` node are not checked."""
    known = set(schema_keys())
    prefixes = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    found = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if is_free_form(name):
                continue
            if isinstance(value, dict) and name in prefixes:
                walk(value, f"{name}.")
            elif name not in known:
                found.append(name)

    walk(tree, "")
    return found


def kohya_name(key: str) -> str | None:  # `network.dim`, `network_dim` -> network.rank
    parent, _, leaf = key.rpartition(".")
    return KOHYA_NAMES.get(leaf) or (KOHYA_NAMES.get(f"{parent}_{leaf}") if parent else None)


def _respelt(key: str, candidates: list[str]) -> list[str]:
    """`optimizer.arg.eps` -> `optimizer.args.eps`: the first non-leaf part naming no node, respelt as the closest."""
    import difflib

    parts = key.split(".")
    nodes = {c.rsplit(".", i)[0] for c in candidates for i in range(c.count(".") + 1)}
    for i in range(len(parts) - 1):
        if ".".join(parts[:i + 1]) in nodes:
            continue
        parent = ".".join(parts[:i])
        children = [n.rpartition(".")[2] for n in nodes if n.count(".") == i and n.rpartition(".")[0] == parent]
        fixed = [".".join([*parts[:i], near, *parts[i + 1:]]) for near in
                 difflib.get_close_matches(parts[i], children, n=3, cutoff=0.6)]
        return [f for f in fixed if f in candidates or (is_free_form(f) and f not in FREE_FORM)]
    return []


def closest_keys(key: str, candidates: list[str] | None = None, n: int = 3) -> list[str]:
    """Up to `n` settings a misspelt `key` meant: the key under the closest node, or kohya's name's setting; else
    the closest spellings, siblings first (`noise.ofset` -> `noise.offset`), then any (`noise.huber_c` -> loss's)."""
    import difflib

    candidates = list(candidates if candidates is not None else schema_keys())
    kohya = kohya_name(key)
    exact = _respelt(key, candidates) + ([kohya] if kohya in candidates and kohya != key else [])
    if exact:
        return list(dict.fromkeys(exact))[:n]
    parent, _, leaf = key.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == parent}
    near = [siblings[s] for s in difflib.get_close_matches(leaf, list(siblings), n=n, cutoff=0.6)]
    near += difflib.get_close_matches(key, candidates, n=n, cutoff=0.75)
    return list(dict.fromkeys(near))[:n]


def unknown_key_message(key: str, *, added: bool = False, known: list[str] | None = None) -> str:
    """One paragraph for a key the schema lacks: the closest real settings and its group's settings, or, for a kohya
    flag lora-sweep has no setting for (`masked_loss`, `train.masked_loss`), why (checks/kohya_flags.py).
    `added`: it came with `+`, so say nothing reads it. `known`: the keys to match against instead of the schema's
    (e.g. the active launcher's, for `hydra.launcher.cpu_slot`)."""
    parent, _, leaf = key.rpartition(".")
    kohya = not_a_setting_message(leaf) or (not_a_setting_message(f"{parent}_{leaf}") if parent else None)
    if known is None and kohya:
        return kohya
    added_text = f": '+{key}=...' adds it, but nothing reads it, so the run would train without it" if added else ""
    keys = schema_keys() if known is None else known
    if known is None and "." not in key:  # `nosie=offset`: a group or a node was meant
        import difflib

        groups, nodes = config_groups(), sorted({k.split(".")[0] for k in keys} - set(config_groups()))
        near = [kohya_name(key)] if kohya_name(key) else difflib.get_close_matches(key, groups + nodes, n=2, cutoff=0.6)
        return (f"{key} is neither a config group nor a setting{added_text}."
                + (f" Did you mean {' or '.join(near)}?" if near else "")
                + f" The config groups (group=option) are: {', '.join(groups)}; other settings are under "
                  f"{', '.join(nodes)}.")
    parent = key.split(".", 1)[0] if known is None else key.rpartition(".")[0]
    near = closest_keys(key, keys)
    text = f"{key} is not a setting{added_text}." + (f" Did you mean {' or '.join(near)}?" if near else "")
    group = dict.fromkeys(k[len(parent) + 1:].split(".")[0] for k in keys if k.startswith(parent + "."))
    return text + (f" The {parent} settings are: {', '.join(group)}." if group else "")
