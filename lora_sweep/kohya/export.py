"""A composed config -> sd-scripts v0.8.7's files: `config.toml`, `dataset.toml` and `command.sh` (issue 29).

`kohya_args` maps each setting to its v0.8.7 flag (the inverse of `checks.keys.KOHYA_NAMES`, with the value
conversions), typed as v0.8.7's argparse types them (`flags.typed`), and keeps only what differs from
`V087_DEFAULTS` plus the essentials. v0.8.7 sets `--config_file`'s values without argparse's type conversion
(train_util.py read_config_from_file), so the TOML holds the argparse types: `resolution` a string, `network_alpha`
a float, `optimizer_args` a list of "key=value" strings. The caption and bucket flags stay in config.toml:
`--dataset_config` falls back to the flags for every key a subset, its dataset and [general] leave unset
(config_util.py BlueprintGenerator).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lora_sweep.checks.keys import KOHYA_NAMES
from lora_sweep.checks.kohya_flags import ANY, KOHYA_FLAGS, Fixed
from lora_sweep.config import flatten, to_container
from lora_sweep.kohya.flags import V087_DEFAULTS, typed

ESSENTIAL = ("pretrained_model_name_or_path", "output_dir", "output_name", "seed", "network_module")
# written at any value: v0.8.7's default is the int 1, which it stores as int64 alpha tensors and writes as "1" in
# ss_network_alpha; the float (as --network_alpha's argparse type gives) makes them float32 and "1.0", as lora-sweep's
ALWAYS_FLOAT = ("network_alpha",)
# flags whose value and type are the setting's own (the setting: checks/keys.py KOHYA_NAMES)
_SAME_FLAGS = (
    "v_parameterization", "clip_skip", "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale",
    "multires_noise_discount", "ip_noise_gamma_random_strength", "min_timestep", "max_timestep", "loss_type",
    "huber_schedule", "huber_c", "min_snr_gamma", "debiased_estimation_loss", "prior_loss_weight",
    "zero_terminal_snr", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "learning_rate", "text_encoder_lr",
    "lr_scheduler", "lr_warmup_steps", "lr_scheduler_num_cycles", "lr_scheduler_power", "full_fp16", "full_bf16",
    "network_dim", "network_alpha", "dim_from_weights", "scale_weight_norms", "network_train_text_encoder_only",
    "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "seed", "max_grad_norm",
    "gradient_checkpointing", "output_name", "max_train_epochs", "save_last_n_epochs", "save_last_n_steps",
    "save_precision", "torch_compile", "dynamo_backend", "sdpa", "xformers", "mem_eff_attn", "sample_every_n_steps",
    "sample_sampler", "shuffle_caption", "keep_tokens", "caption_separator", "caption_extension", "max_token_length",
    "flip_aug", "random_crop", "color_aug", "enable_bucket", "bucket_no_upscale", "bucket_reso_steps",
    "caption_prefix", "caption_suffix", "caption_dropout_rate", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
    "token_warmup_min", "token_warmup_step", "max_data_loader_n_workers",
)
_SAME = {flag: KOHYA_NAMES[flag] for flag in _SAME_FLAGS}
# settings at which lora-sweep's 0 means what v0.8.7's None (off) means
_ZERO_IS_OFF = ("noise_offset", "ip_noise_gamma", "multires_noise_iterations", "save_every_n_steps",
                "save_every_n_epochs", "sample_every_n_steps", "v_pred_like_loss", "scale_weight_norms",
                "network_dropout")


def kohya_args(cfg: DictConfig) -> dict[str, Any]:
    """The v0.8.7 flags that train what `cfg` trains: every flag away from `V087_DEFAULTS`, plus `ESSENTIAL` and
    `ALWAYS_FLOAT`."""
    tree = to_container(cfg)
    flat = flatten(tree)
    args: dict[str, Any] = {flag: flat[key] for flag, key in _SAME.items()}
    args |= _precision_args(flat) | _optimizer_args(tree["optimizer"]) | _network_args(flat) | _data_args(cfg, flat)
    args |= _path_args(cfg, flat)
    args |= {flag: rule.value for flag, rule in KOHYA_FLAGS.items() if isinstance(rule, Fixed) and rule.value != ANY}
    args["console_log_simple"] = True  # v0.8.7 then draws its dataset seed first after set_seed (data/order.py)
    args["multires_noise_iterations"] = flat["noise.multires_iterations"]
    args["ip_noise_gamma"] = flat["noise.ip_gamma"]
    args["save_every_n_steps"] = flat["train.save_every"]
    args["save_every_n_epochs"] = flat["train.save_every_epochs"]
    for flag in _ZERO_IS_OFF:
        if args.get(flag) == 0:
            args[flag] = None
    return {flag: typed(flag, value) for flag, value in args.items()
            if value is not None and (flag in ESSENTIAL + ALWAYS_FLOAT or value != V087_DEFAULTS[flag])}


def _precision_args(flat: dict[str, Any]) -> dict[str, Any]:
    from lora_sweep.training.precision import PRECISION_TO_KOHYA

    mixed_precision, fp8_base = PRECISION_TO_KOHYA[flat["precision.name"]]
    return {"mixed_precision": mixed_precision, "fp8_base": fp8_base}


def _optimizer_args(optimizer: dict[str, Any]) -> dict[str, Any]:
    """optimizer_type and optimizer_args: the option's arguments away from its class's defaults, then the
    optimizer.optimizer_args strings as given (v0.8.7 reads each value with ast.literal_eval)."""
    from lora_sweep.training.optim import OPTIMIZERS, resolve_optimizer_name

    option = OPTIMIZERS[resolve_optimizer_name(optimizer["name"])]
    changed = [f"{key}={_literal(value)}" for key, value in optimizer["args"].items()
               if _literal(value) != _literal(option.defaults.get(key, object()))]
    schedule = [f"{key}={_literal(value)}" for key, value in optimizer["lr_scheduler_args"].items()]
    return {"optimizer_type": option.kohya_name, "optimizer_args": (changed + optimizer["optimizer_args"]) or None,
            "lr_scheduler_args": schedule or None}


def _literal(value: Any) -> str:
    """A value as Python source that ast.literal_eval reads back: lists become tuples (betas=(0.9,0.99))."""
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_literal(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float) and math.isinf(value):
        return "1e309" if value > 0 else "-1e309"  # literal_eval reads 1e309 as inf; "inf" is a name
    return repr(value)


def _network_args(flat: dict[str, Any]) -> dict[str, Any]:
    """network_dropout and the networks.lora keys that are --network_args, then network.network_args as given."""
    keys = {"conv_dim": flat["network.conv_dim"], "conv_alpha": flat["network.conv_alpha"],
            "rank_dropout": flat["network.rank_dropout"], "module_dropout": flat["network.module_dropout"]}
    listed = [f"{key}={value}" for key, value in keys.items() if value is not None]
    unet_only = flat["network.network_train_unet_only"] or not flat["network.train_text_encoder"]
    return {"network_dropout": flat["network.dropout"], "network_train_unet_only": unet_only,
            "network_args": (listed + list(flat["network.network_args"])) or None}


def _data_args(cfg: DictConfig, flat: dict[str, Any]) -> dict[str, Any]:
    """resolution as v0.8.7's string ("1024" or "W,H"); the bucket sizes lora-sweep derives when they are null."""
    from lora_sweep.data.buckets import bucket_settings, parse_resolution

    width, height = parse_resolution(flat["data.resolution"])
    found: dict[str, Any] = {"resolution": str(width) if width == height else f"{width},{height}"}
    if flat["data.enable_bucket"]:
        settings = bucket_settings(cfg.data)
        found |= {"min_bucket_reso": settings["min_reso"], "max_bucket_reso": settings["max_reso"]}
    return found


def _path_args(cfg: DictConfig, flat: dict[str, Any]) -> dict[str, Any]:
    """The model, the LoRA to start from, the output folder (null: the export's, `write_export` sets it) and the
    sample prompts, absolute."""
    paths = {"pretrained_model_name_or_path": "model.path", "network_weights": "network.network_weights",
             "output_dir": "train.output_dir", "sample_prompts": "sampling.prompt_file"}
    return {flag: str(Path(flat[key]).resolve()) if flat[key] else None for flag, key in paths.items()}


def dataset_tables(cfg: DictConfig) -> dict[str, Any]:
    """The run's datasets as v0.8.7's --dataset_config reads them ({"datasets": [...]}, maybe "general"), image_dir
    paths absolute: data.dataset_config's file, data.datasets, or data.dir's `<repeats>_<class>` folders (and
    data.reg_data_dir's, is_reg) as one dataset's subsets, in sorted order (v0.8.7 lists them in iterdir order)."""
    if cfg.data.dataset_config:
        path = Path(cfg.data.dataset_config)
        if path.suffix == ".json":
            tables = json.loads(path.read_text(encoding="utf-8"))
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python < 3.11
                import tomli as tomllib

            tables = tomllib.loads(path.read_text(encoding="utf-8"))
    elif cfg.data.datasets:
        tables = {"datasets": to_container(cfg)["data"]["datasets"]}
    else:
        subsets = _photos_subsets(cfg) if cfg.data.name == "photos" and not cfg.data.dir else \
            _folder_subsets(Path(cfg.data.dir), is_reg=False)
        if cfg.data.reg_data_dir:
            subsets += _folder_subsets(Path(cfg.data.reg_data_dir), is_reg=True)
        tables = {"datasets": [{"subsets": subsets}]}
    for dataset in tables.get("datasets", []):
        for subset in dataset.get("subsets", []):
            if "image_dir" in subset:
                subset["image_dir"] = str(Path(subset["image_dir"]).resolve())
    return tables


def _photos_subsets(cfg: DictConfig) -> list[dict[str, Any]]:
    """The bundled photos' one folder, where the first run writes it (data/photos.py), written or not."""
    from lora_sweep.data.photos import FOLDER, photos_path
    from lora_sweep.paths import cache_root

    repeats, _, class_tokens = FOLDER.partition("_")
    return [{"image_dir": str(photos_path(cache_root(cfg)) / FOLDER), "num_repeats": int(repeats),
             "class_tokens": class_tokens}]


def _folder_subsets(folder: Path, *, is_reg: bool) -> list[dict[str, Any]]:
    subsets = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        repeats, _, class_tokens = sub.name.partition("_")
        if not repeats.isdigit() or int(repeats) < 1:
            continue  # v0.8.7 skips such a folder
        subset = {"image_dir": str(sub.resolve()), "num_repeats": int(repeats), "class_tokens": class_tokens}
        subsets.append(subset | ({"is_reg": True} if is_reg else {}))
    return subsets


def not_expressible(cfg: DictConfig) -> list[str]:
    """What `cfg` sets that v0.8.7's flags cannot hold: one line each, for command.sh's header."""
    flat = flatten(to_container(cfg))
    lines = []
    if flat["model.name"] in ("tiny", "tiny_random"):
        lines.append(f"model={flat['model.name']}: kohya cannot load lora-sweep's tiny stand-in model; set model=sdxl "
                     f"model.path=...")
    elif not flat["model.path"]:
        lines.append("model.path is null: config.toml has no pretrained_model_name_or_path; add the SDXL checkpoint")
    if flat["validation.fit_images"] or flat["validation.every"]:
        lines.append(f"validation.every={flat['validation.every']}, validation.fit_images="
                     f"{flat['validation.fit_images']}: kohya v0.8.7 logs no val/loss or fit/loss")
    if flat["data.validation_split"] or flat["data.validation_dir"]:
        lines.append("data.validation_split / data.validation_dir: kohya v0.8.7 has no validation set")
    if flat["loss.per_sample_timesteps"]:
        lines.append("loss.per_sample_timesteps is true: v0.8.7 draws one timestep per batch for huber/smooth_l1")
    if flat["data.latent_sample"] != "sample":
        lines.append(f"data.latent_sample={flat['data.latent_sample']}: v0.8.7 caches one posterior sample")
    if flat["train.on_nan"] != "stop":
        lines.append(f"train.on_nan={flat['train.on_nan']}: v0.8.7 has no NaN handling")
    if flat["sampling.prompts"] or flat["sampling.prompt_file"]:
        lines += _sampling_lines(flat)
    return lines


def _sampling_lines(flat: dict[str, Any]) -> list[str]:
    """How kohya's sampling differs: its `euler` is not SDXL base's (timestep spacing), and it has no sample at
    the last step."""
    lines = []
    if flat["sampling.sampler"] is None:
        lines.append("sampling.sampler=null (SDXL base's Euler, timestep_spacing leading, steps_offset 1): kohya's "
                     "--sample_sampler default is ddim, and its euler spaces timesteps linspace")
    every, steps = flat["sampling.every"], flat["train.max_steps"]
    if every == 0 or steps is None or steps % every:
        lines.append(f"sampling.every={every}: lora-sweep also samples at the last step, kohya v0.8.7 only at step 0 "
                     "(sample_at_first) and every sample_every_n_steps")
    return lines


def prompts_text(cfg: DictConfig, specs: list | None = None) -> str:
    """sample_prompts.txt: sampling.prompts and sampling.prompt_file's lines as lora-sweep draws them, each option
    spelt out (the sampling group's defaults and seed + index, where v0.8.7 would draw a random seed; one line per
    prompt and seed of `sampling.seeds`); "" when the config samples nothing. `specs`: the PromptSpecs a job already
    read (its prompt file is read once)."""
    from lora_sweep.training.evaluate import read_prompts

    if specs is None:
        specs, _, _ = read_prompts(cfg)
    lines = []
    for spec in specs:
        options = f" --w {spec.width} --h {spec.height} --d {spec.seed} --s {spec.steps} --l {spec.cfg}"
        options += f" --ss {spec.sampler}" if spec.sampler else ""
        options += f" --n {spec.negative}" if spec.negative else ""
        lines.append(spec.prompt + options)
    return "".join(f"{line}\n" for line in lines)


def kohya_subset(cfg: DictConfig) -> dict[str, Any]:
    """What of `cfg` kohya v0.8.7 holds, as its export says it: config.toml's flags (without the paths of the
    export's own files), dataset.toml's tables and sample_prompts.txt's lines with the sampler kohya draws each with.
    Importing an export's config.toml and dataset.toml gives a config with the same subset (the round trip)."""
    import dataclasses

    from lora_sweep.training.evaluate import read_prompts

    args = kohya_args(cfg)
    args.pop("sample_prompts", None)  # the export's own file; its lines are compared instead
    specs, _, _ = read_prompts(cfg)
    # a prompt without --ss draws with --sample_sampler, ddim when unset (SDXL base's Euler has no kohya name)
    sampler = args.get("sample_sampler", V087_DEFAULTS["sample_sampler"])
    specs = [dataclasses.replace(spec, sampler=spec.sampler or sampler) for spec in specs]
    return {"config.toml": args, "dataset.toml": dataset_tables(cfg),
            "sample_prompts.txt": prompts_text(cfg, specs).splitlines()}


def toml_text(tables: dict[str, Any]) -> str:
    """`tables` as TOML: top-level values first, then tables and arrays of tables (values tomllib reads back as
    the same Python types; None is left out, as TOML has no null)."""
    lines: list[str] = []
    _write_table(tables, [], lines)
    return "\n".join(lines).strip() + "\n"


def _write_table(table: dict[str, Any], path: list[str], lines: list[str], array: bool = False) -> None:
    if path:
        lines.append("")
        lines.append(f"[[{'.'.join(path)}]]" if array else f"[{'.'.join(path)}]")
    nested = {k: v for k, v in table.items() if isinstance(v, dict) or _is_table_list(v)}
    lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items()
                 if key not in nested and value is not None)
    for key, value in nested.items():
        if isinstance(value, dict):
            _write_table(value, [*path, key], lines)
        else:
            for item in value:
                _write_table(item, [*path, key], lines, array=True)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def cpu_threads() -> int:
    """The CPU threads torch computes with in this process: what a run started here trains with, and what the
    export passes to `accelerate launch` (`command_text`)."""
    import torch

    return torch.get_num_threads()


def command_text(cfg: DictConfig, threads: int | None = None) -> str:
    """command.sh: what kohya cannot hold as comments, then the sd-scripts command (run in the export's folder).

    `threads` (None: `cpu_threads()`) goes to `--num_cpu_threads_per_process`: accelerate 0.25.0's launch sets the
    script's OMP_NUM_THREADS to that option, 1 when it is not given, whatever the shell's is. On the CPU the U-Net's
    products sum in an order that depends on the thread count (5e-7 apart on SDXL's U-Net at 1 and 2 threads), so
    kohya computes as lora-sweep did only with the same count (docs/kohya-exact.md).
    """
    header = ["#!/bin/sh", "# sd-scripts v0.8.7 (kohya-ss/sd-scripts tag v0.8.7), exported by lora-sweep.",
              "# Run it from sd-scripts' folder: sh /path/to/command.sh (EXPORT: the folder of these files)."]
    notes = not_expressible(cfg)
    if notes:
        header.append("# Not expressible in kohya v0.8.7 (this export trains without them):")
        header += [f"#   - {line}" for line in notes]
    threads = cpu_threads() if threads is None else threads
    header.append(f"# {threads} CPU thread{'s' * (threads != 1)}, as lora-sweep computed with here: the same count "
                  "gives the same sums on the CPU.")
    command = (f'accelerate launch --num_cpu_threads_per_process {threads} sdxl_train_network.py '
               '--config_file "$EXPORT/config.toml" --dataset_config "$EXPORT/dataset.toml"')
    return "\n".join([*header, 'EXPORT="${EXPORT:-$(cd "$(dirname "$0")" && pwd)}"', command]) + "\n"


def write_export(cfg: DictConfig, out: Path, prompts: list | None = None, threads: int | None = None) -> list[Path]:
    """config.toml, dataset.toml and command.sh of `cfg` in `out` (made if missing), and sample_prompts.txt when it
    samples; returns their paths. Without train.output_dir, kohya writes its LoRA files to `out`/output. `threads`:
    the CPU threads command.sh gives kohya (None: this process's, `cpu_threads`)."""
    out.mkdir(parents=True, exist_ok=True)
    args = kohya_args(cfg)
    args.setdefault("output_dir", str((out / "output").resolve()))
    args["dataset_config"] = str((out / "dataset.toml").resolve())
    files = {"dataset.toml": toml_text(dataset_tables(cfg)), "command.sh": command_text(cfg, threads)}
    prompt_lines = prompts_text(cfg, prompts)
    if prompt_lines:
        files["sample_prompts.txt"] = prompt_lines
        args["sample_prompts"] = str((out / "sample_prompts.txt").resolve())
        args["sample_at_first"] = True  # lora-sweep samples at step 0 whenever it samples
    files = {"config.toml": toml_text(args)} | files
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    (out / "command.sh").chmod(0o755)
    return [out / name for name in files]
