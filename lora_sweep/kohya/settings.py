"""kohya args -> lora-sweep: group choices (model, noise, loss, optimizer, precision) and in-group values, each with
where it came from, and a row per kohya flag for the import's table.

A flag the sources leave out means v0.8.7's default (flags.V087_DEFAULTS), not lora-sweep's: it is written wherever
the two differ. Each flag maps through checks.keys.KOHYA_NAMES (a setting) or checks.kohya_flags.KOHYA_FLAGS
(Refused: "not supported"; Fixed: ignored at its value, else "not supported"); a flag v0.8.7 lacks is a newer
sd-scripts' ("unknown": version drift).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lora_sweep.checks.keys import KOHYA_NAMES
from lora_sweep.checks.kohya_flags import ANY, KOHYA_FLAGS, Fixed, Refused
from lora_sweep.data.subsets import NO_PIXELS_EACH_STEP
from lora_sweep.errors import ConfigError
from lora_sweep.kohya.flags import NEWER_FLAGS, NEWER_TEXT, V087_DEFAULTS
from lora_sweep.training.optim import parse_kohya_args, resolve_optimizer_name
from lora_sweep.training.precision import KOHYA_TO_PRECISION

# flags the group choices below consume, and data.datasets keys only a dataset config sets
_GROUPED = {"mixed_precision", "fp8_base", "optimizer_type", "use_8bit_adam", "learning_rate", "unet_lr",
            "text_encoder_lr", "lr_scheduler_args"}
_DATASET_ONLY = {"num_repeats", "class_tokens", "is_reg", "image_dir", "subsets", "network_multiplier", "dim",
                 "dataset_repeats"}
# flags with a setting an import leaves unset: a sweep's runs would all write to the one folder
_RUN_FOLDER = {"output_dir": "every lora-sweep run writes its LoRA in its own run folder; set train.output_dir for a "
                             "single run"}

# flags whose v0.8.7 default is None where lora-sweep has a value: the row (kind, text with the setting and its value)
_UNSET = {
    "seed": ("ignored", "v0.8.7 draws a random seed; lora-sweep's {} {} applies"),
    "save_every_n_steps": ("ignored", "kohya default None: lora-sweep saves every {1} steps ({0}); saving changes "
                                      "no trained number"),
    "output_name": ("ignored", "kohya default None names the file 'last': lora-sweep names it {1!r} ({0}); a name "
                               "changes no trained number"),
}

@dataclass
class Row:
    """One line of the import's table: `kind` mapped | default | same as default | ignored | not supported |
    missing | not recorded (a LoRA's metadata lacks it) | unknown (not a v0.8.7 flag)."""

    kind: str
    kohya: str
    value: object
    detail: str = ""


@dataclass
class Imported:
    """What an import writes: `groups` (group -> option or options), `values` (dotted setting -> value), `why`
    (a group or setting -> the source key and value, or "kohya default"), and the table's `rows`."""

    groups: dict[str, object] = field(default_factory=dict)
    values: dict[str, object] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # a file beside the experiment (path) -> its text

    def put(self, key: str, value: object, why: str) -> None:
        self.values[key] = value
        self.why[key] = why


def to_lora_sweep(args: dict[str, object], origin: dict[str, str],
                  lora_sweep_defaults: Callable[[dict[str, object]], dict[str, object]],
                  *, unknown: dict[str, object] | None = None, missing: dict[str, str] | None = None,
                  unrecorded: set[str] | frozenset[str] = frozenset()) -> Imported:
    """`args` (only what the sources set; `origin`: flag -> the source's key and value) with every other flag at
    v0.8.7's default, as lora-sweep settings. `lora_sweep_defaults(groups)`: dotted setting -> its value in
    lora-sweep's config with those group choices (a v0.8.7 default equal to it is left out of the file, "same as
    default"); `unrecorded`: flags a LoRA's metadata does not hold, at v0.8.7's default and shown as unknown."""
    full = {**V087_DEFAULTS, **args}
    out = Imported()

    def why(flag: str) -> str:
        if flag in unrecorded:
            return "not in the LoRA's metadata: kohya default"
        return origin.get(flag, "kohya default")

    _groups(full, args, why, out)
    defaults = lora_sweep_defaults(out.groups)
    for flag, value in full.items():
        if flag not in _GROUPED:
            _flag_row(flag, value, flag in args, full, defaults, why, unrecorded, out)
    # v0.8.7 trains the text encoders' LoRA unless --network_train_unet_only; lora-sweep's default is U-Net only
    text_encoder = not full["network_train_unet_only"]
    if text_encoder != defaults.get("network.train_text_encoder"):
        out.put("network.train_text_encoder", text_encoder, why("network_train_unet_only"))
        out.rows.append(Row("mapped" if "network_train_unet_only" in args else "default", "network_train_unet_only",
                            full["network_train_unet_only"], "network.train_text_encoder=true"))
    for flag in sorted(unrecorded):
        out.rows.append(Row("not recorded", flag, V087_DEFAULTS.get(flag), "not in the LoRA's metadata: kohya default "
                                                                      "assumed"))
    for flag, value in (unknown or {}).items():
        if flag in NEWER_FLAGS:
            out.rows.append(Row("not supported", flag, value, NEWER_TEXT))
        else:
            out.rows.append(Row("unknown", flag, value, "not a flag of sd-scripts v0.8.7 (a newer version?): ignored"))
    missing = missing or {}
    if full["pretrained_model_name_or_path"] is None and "pretrained_model_name_or_path" not in missing:
        out.rows.append(Row("missing", "pretrained_model_name_or_path", None, "model.path: the SDXL model to train"))
    if full["train_data_dir"] is None and full["dataset_config"] is None and not {"train_data_dir",
                                                                                    "dataset_config"} & set(missing):
        out.rows.append(Row("missing", "train_data_dir", None, "data.dir (or data.dataset_config): the images"))
    for flag, reason in missing.items():
        out.rows.append(Row("missing", flag, None, f"{KOHYA_NAMES.get(flag, flag)}: {reason}"))
    return out


def _flag_row(flag: str, value: object, given: bool, full: dict, defaults: dict, why, unrecorded,
              out: Imported) -> None:
    """One flag outside the group choices: its setting (written where it differs from lora-sweep's default) or its
    row: ignored, not supported (KOHYA_FLAGS), missing."""
    if flag in _RUN_FOLDER:
        if given:
            out.rows.append(Row("ignored", flag, value, _RUN_FOLDER[flag]))
        return
    if flag in ("train_data_dir", "reg_data_dir") and full["dataset_config"] is not None:
        if given:  # v0.8.7 reads the dataset config alone and warns that it ignores these
            out.rows.append(Row("ignored", flag, value, "a --dataset_config is given: v0.8.7 ignores the folder"))
        return
    if flag in ("color_aug", "random_crop"):  # settings lora-sweep has only to refuse them before a run
        if value:
            out.rows.append(Row("not supported", flag, value, f"data.{flag} {NO_PIXELS_EACH_STEP}"))
        return
    if flag in KOHYA_NAMES:
        setting = KOHYA_NAMES[flag]
        if flag in _DATASET_ONLY or setting == "data.datasets":
            if given:
                out.rows.append(Row("not supported", flag, value, "a dataset key: give a --dataset_config"))
            return
        if setting in ("optimizer.name", "precision.name"):
            return
        if value is None and setting in defaults and defaults[setting] is not None:
            if flag in _UNSET:
                kind, text = _UNSET[flag]
                out.rows.append(Row(kind, flag, value, text.format(setting, defaults[setting])))
            elif flag == "resolution" and full["dataset_config"] is None:  # train_util asserts one is given
                out.rows.append(Row("missing", flag, value, "data.resolution: v0.8.7 requires --resolution"))
            return
        if not given and defaults.get(setting, object()) == value:
            out.rows.append(Row("same as default", flag, value, setting))
            return
        out.put(setting, value, why(flag))
        out.rows.append(Row("mapped" if given else "default", flag, value, setting))
    elif flag in KOHYA_FLAGS and flag not in unrecorded:
        entry = KOHYA_FLAGS[flag]
        at_default = value == V087_DEFAULTS.get(flag)
        if isinstance(entry, Refused):
            if not at_default:
                out.rows.append(Row("not supported", flag, value, entry.reason))
        elif isinstance(entry, Fixed):
            if entry.value is ANY or value == entry.value:
                if given:
                    out.rows.append(Row("ignored", flag, value, entry.reason))
            elif given:  # an unset flag is kohya's default, which the user never chose: no problem to report
                out.rows.append(Row("not supported", flag, value,
                                    f"lora-sweep behaves as {entry.value!r}: {entry.reason}"))


def _groups(full: dict, args: dict, why, out: Imported) -> None:
    """The group choices: model=sdxl, precision, optimizer (with train.lr), noise and loss options."""
    out.groups["model"] = "sdxl"
    out.why["model"] = "sdxl_train_network.py"
    precision = KOHYA_TO_PRECISION.get((full["mixed_precision"], bool(full["fp8_base"])))
    if precision is None:
        out.rows.append(Row("not supported", "mixed_precision", full["mixed_precision"],
                            "--fp8_base needs fp16 or bf16" if full["fp8_base"] else "not no, fp16 or bf16"))
    else:
        out.groups["precision"] = precision
        out.why["precision"] = ", ".join(why(f) for f in ("mixed_precision", "fp8_base") if f in args) or \
            "kohya default"
        out.rows.append(Row("mapped" if "mixed_precision" in args else "default", "mixed_precision",
                            full["mixed_precision"], f"precision={precision}"))
    kohya_name = full["optimizer_type"] or ("AdamW8bit" if full["use_8bit_adam"] else "AdamW")
    try:
        option = resolve_optimizer_name(kohya_name)
    except ConfigError as err:
        out.rows.append(Row("not supported", "optimizer_type", kohya_name, str(err)))
    else:
        out.groups["optimizer"] = option
        out.why["optimizer"] = why("optimizer_type") if "optimizer_type" in args else "kohya default (AdamW)"
        out.rows.append(Row("mapped" if "optimizer_type" in args else "default", "optimizer_type", kohya_name,
                            f"optimizer={option}"))
    _learning_rates(full, args, why, out)
    if full["lr_scheduler_args"]:
        try:
            out.put("optimizer.lr_scheduler_args", parse_kohya_args(full["lr_scheduler_args"], "lr_scheduler_args"),
                    why("lr_scheduler_args"))
            out.rows.append(Row("mapped", "lr_scheduler_args", full["lr_scheduler_args"],
                                "optimizer.lr_scheduler_args"))
        except ConfigError as err:
            out.problems.append(str(err))
    offset, multires, ip = full["noise_offset"], full["multires_noise_iterations"], full["ip_noise_gamma"]
    noise = "multires" if multires else "offset" if offset else ""
    noise = f"{noise}_ip" if ip and noise else noise or ("ip" if ip else "none")
    out.groups["noise"] = noise
    out.why["noise"] = ", ".join(why(f) for f in ("noise_offset", "multires_noise_iterations", "ip_noise_gamma")
                                 if f in args) or "kohya default: no noise offset"
    loss = {"l2": "l2", "huber": "huber_snr", "smooth_l1": "smooth_l1_snr"}.get(full["loss_type"])
    if loss is None:
        out.rows.append(Row("not supported", "loss_type", full["loss_type"], "not l2, huber or smooth_l1"))
        loss = "l2"
    options = [loss] + (["min_snr"] if full["min_snr_gamma"] else []) + \
        (["debiased"] if full["debiased_estimation_loss"] else [])
    out.groups["loss"] = options[0] if len(options) == 1 else options
    out.why["loss"] = ", ".join(why(f) for f in ("loss_type", "min_snr_gamma", "debiased_estimation_loss")
                                if f in args) or "kohya default: l2"


def _learning_rates(full: dict, args: dict, why, out: Imported) -> None:
    """--learning_rate is train.lr; a --unet_lr apart from it is train.lr with train.text_encoder_lr the
    --learning_rate (or --text_encoder_lr) (docs/kohya.md)."""
    lr, unet, text = full["learning_rate"], full["unet_lr"], full["text_encoder_lr"]
    if unet is not None and unet != lr:
        out.put("train.lr", unet, why("unet_lr"))
        out.rows.append(Row("mapped", "unet_lr", unet, "train.lr"))
        if text is None:
            out.put("train.text_encoder_lr", lr, why("learning_rate"))
            out.rows.append(Row("mapped" if "learning_rate" in args else "default", "learning_rate", lr,
                                "train.text_encoder_lr"))
        elif lr != unet:
            out.rows.append(_optimizer_lr_row(lr, unet, full["lr_scheduler"]))
    else:
        out.put("train.lr", lr, why("learning_rate"))
        out.rows.append(Row("mapped" if "learning_rate" in args else "default", "learning_rate", lr, "train.lr"))
        if unet is not None:
            out.rows.append(Row("mapped", "unet_lr", unet, "train.lr (the same as --learning_rate)"))
    if text is not None:
        out.put("train.text_encoder_lr", text, why("text_encoder_lr"))
        out.rows.append(Row("mapped", "text_encoder_lr", text, "train.text_encoder_lr"))


def _optimizer_lr_row(lr: object, unet: object, scheduler: object) -> Row:
    """--learning_rate when --unet_lr and --text_encoder_lr give every group its lr: v0.8.7 still makes it the
    optimizer's default lr, polynomial's and adafactor's start lr; lora-sweep reads train.lr (the U-Net's) there."""
    if scheduler in ("polynomial", "adafactor"):
        return Row("not supported", "learning_rate", lr, f"lr_scheduler {scheduler} starts from it; lora-sweep has no "
                                                         f"lr apart from the groups' and starts from train.lr {unet}")
    return Row("ignored", "learning_rate", lr, "unet_lr and text_encoder_lr set every group's lr; it is only "
                                               "ss_learning_rate and polynomial's or adafactor's start lr")
