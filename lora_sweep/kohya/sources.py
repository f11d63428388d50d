"""Readers of kohya's settings, each into "kohya args" (sd-scripts v0.8.7 flag -> value, kohya/flags.py): a kohya_ss
v24.1.4 GUI config (JSON), an sd-scripts --config_file TOML, an `accelerate launch ... sdxl_train_network.py` command
line. Each collects every problem (file, key, what is wrong) rather than stopping at the first.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from lora_sweep.checks.kohya_flags import GUI_KEYS, LORA_TYPES, NETWORK_ARGS, lora_type_problem
from lora_sweep.kohya.flags import LIST_FLAGS, V087_DEFAULTS, V087_TYPES, typed


@dataclass
class KohyaSource:
    """What one source says: `args` (flag -> value, only what it sets), `origin` (flag -> the source's key and value
    it came from), `ignored` (a source key -> its value and why it sets nothing), `unknown` (flags v0.8.7 lacks: a newer
    sd-scripts), `missing` (a flag whose value the source cannot give -> why), `unrecorded` (flags a LoRA's metadata
    does not hold), `problems` (one paragraph each)."""

    path: str
    args: dict[str, object] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, tuple[object, str]] = field(default_factory=dict)
    unknown: dict[str, object] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    unrecorded: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # flag -> text the import writes to a file (GUI prompts)
    unsupported: dict[str, tuple[object, str]] = field(default_factory=dict)  # a key of another tool -> why
    settings: dict[str, tuple[object, str]] = field(default_factory=dict)  # no flag holds it: setting -> value, origin
    converted: dict[str, tuple[object, str]] = field(default_factory=dict)  # a GUI-only key -> value, what it became
    text: str = ""  # the file's text, for the line of a key in a problem

    def set(self, flag: str, value: object, origin: str) -> None:
        if flag not in V087_DEFAULTS:
            self.unknown[flag] = value
            return
        try:
            self.args[flag] = typed(flag, value)
        except ValueError as err:
            self.problem(origin, f"{err} (v0.8.7's --{flag} takes {V087_TYPES[flag].__name__})")
            return
        self.origin[flag] = origin

    def problem(self, where: str, text: str) -> None:
        line = self.line_of(where.split(" ")[0])
        self.problems.append(f"{self.path}{f' line {line}' if line else ''}: {where}: {text}.")

    def line_of(self, key: str) -> int | None:
        """The first line of the file where `key` is set (`"key":` in JSON, `key =` in TOML), if any."""
        pattern = re.compile(rf'^\s*"?{re.escape(key)}"?\s*[:=]')
        return next((i for i, line in enumerate(self.text.splitlines(), 1) if pattern.match(line)), None)


SOURCE_KINDS = ("a kohya_ss GUI config (JSON), an sd-scripts --config_file or --dataset_config TOML, a text file "
                "with an sdxl_train_network.py command line, or a LoRA .safetensors")


def _dropped(value: object) -> bool:
    """The GUI leaves out every "", False, None and 0 (0 == False in Python): sd-scripts' default applies."""
    return value is None or value == "" or value is False or (isinstance(value, (int, float)) and value == 0)


def _gui_number(value: object) -> object:
    """The GUI's string-typed numbers ("1", "0.5") as numbers; anything else as it is."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


# kohya_ss v24.1.4's field defaults, which it passes on for a key its saved config lacks (open_configuration keeps
# the field's value): class_basic_training.py (with lora_gui.py's learning_rate 1e-4, cosine, warmup 10),
# class_advanced_training.py, class_source_model.py, class_accelerate_launch.py, class_sample_images.py and
# lora_gui.py's network fields. "", False and 0 fields are left out: the GUI passes them on as nothing. The optimizer
# is update_my_data's (AdamW, or AdamW8bit with use_8bit_adam), which is v0.8.7's default too.
GUI_FIELD_DEFAULTS = {
    "LoRA_type": "Standard", "train_batch_size": 1, "epoch": 1, "max_train_steps": 1600, "save_every_n_epochs": 1,
    "caption_extension": ".txt", "cache_latents": True, "lr_scheduler": "cosine", "max_grad_norm": 1.0,
    "learning_rate": 0.0001, "lr_warmup": 10, "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1.0,
    "max_resolution": "512,512", "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048,
    "gradient_accumulation_steps": 1, "prior_loss_weight": 1.0, "loss_type": "l2", "huber_schedule": "snr",
    "huber_c": 0.1, "clip_skip": 1, "max_token_length": 75, "xformers": "xformers", "bucket_reso_steps": 64,
    "max_timestep": 1000, "multires_noise_discount": 0.3, "output_name": "last", "save_precision": "fp16",
    "save_model_as": "safetensors", "mixed_precision": "fp16", "sample_sampler": "euler_a", "text_encoder_lr": 0.0001,
    "unet_lr": 0.0001, "network_dim": 8, "network_alpha": 1, "conv_dim": 1, "conv_alpha": 1,
    "max_data_loader_n_workers": 0,  # passed on even at 0
}


# update_my_data's int() of these GUI strings, and what it uses when int() fails (common_gui.py)
_GUI_INTS = {"adaptive_noise_scale": 0, "clip_skip": 0, "epoch": 0, "gradient_accumulation_steps": 0, "keep_tokens": 0,
             "lr_warmup": 0, "max_data_loader_n_workers": 0, "max_train_epochs": 0, "save_every_n_epochs": 0,
             "seed": 0, "lr_scheduler_num_cycles": 1, "max_train_steps": 0, "max_token_length": 75}


def read_gui(path: Path) -> KohyaSource:
    """A kohya_ss v24.1.4 LoRA config (the GUI's saved JSON) as the flags the GUI passes to sd-scripts."""
    src = KohyaSource(str(path))
    try:
        src.text = path.read_text(encoding="utf-8")
        gui = json.loads(src.text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        src.problem("the file", f"not a kohya_ss JSON config ({err})")
        return src
    if not isinstance(gui, dict):
        src.problem("the file", "not a kohya_ss JSON config (a JSON object of GUI fields)")
        return src
    read_gui_fields(gui, src)
    return src


def read_gui_fields(gui: dict, src: KohyaSource) -> None:
    """The GUI's fields into `src`, converted as v24.1.4's train_model converts them (docs/kohya.md, GUI_KEYS)."""
    gui = {("lora_network_weights" if k == "network_weights" else k): v for k, v in gui.items()}
    absent = set(GUI_FIELD_DEFAULTS) - set(gui)
    gui |= {key: value for key, value in GUI_FIELD_DEFAULTS.items() if key in absent}
    lora_type = gui["LoRA_type"]
    if (problem := lora_type_problem(lora_type)) is not None:  # one problem among the others, all reported at once
        src.problem("LoRA_type", problem.rstrip("."))
    for key, fallback in _GUI_INTS.items():
        raw = gui.get(key)
        if isinstance(raw, str) and raw.strip() and not re.fullmatch(r"\s*[-+]?\d+\s*", raw):
            src.problem(f"{key} = {raw!r}", f"kohya_ss v24.1.4 trains it as {fallback} (int() of the text fails); "
                                            f"write a whole number")
            gui[key] = fallback
    network_args: list[str] = []
    network_origin = [f"LoRA_type = {lora_type!r}"]
    for key, raw in gui.items():
        value = _gui_number(raw)
        origin = f"{key} = {raw!r}"
        entry = GUI_KEYS.get(key)
        if key in ("LoRA_type", "lr_warmup", "max_train_steps", "lr_scheduler_num_cycles", "unet_lr",
                   "text_encoder_lr", "xformers", "additional_parameters", "epoch"):
            continue  # below
        if entry is not None and not entry.flags:
            src.ignored[key] = (raw, entry.how)
            continue
        if key in NETWORK_ARGS:
            if key in ("conv_dim", "conv_alpha") and key not in LORA_TYPES.get(lora_type, ()):
                src.ignored[key] = (raw, f"LoRA_type {lora_type} ignores it")
            elif key in LORA_TYPES.get(lora_type, ()) or not _dropped(value):  # LoCon's conv pair: 0 written too
                network_args.append(f"{key}={value}")
                network_origin.append(origin)
            continue
        flags = entry.flags if entry is not None else (key,)
        if key not in V087_DEFAULTS and entry is None:
            src.unknown[key] = raw
            continue
        if flags[0] in LIST_FLAGS and isinstance(value, str):
            value = value.replace('"', "")
        if key == "sample_prompts":
            if not _dropped(value):  # the GUI writes the text to a prompt file; so does the import
                src.texts["sample_prompts"] = str(raw)
            continue
        if key == "max_data_loader_n_workers" or not _dropped(value):  # always written, 0 included
            src.set(flags[0], value, origin)
    src.set("network_module", "networks.lora", f"LoRA_type = {lora_type!r}")
    if network_args:
        src.set("network_args", network_args + list(src.args.get("network_args", [])), ", ".join(network_origin))
    _gui_lengths(gui, src)
    _gui_lrs(gui, src)
    attention = gui.get("xformers", "none")
    if attention is True or attention == "xformers":
        src.set("xformers", True, f"xformers = {attention!r}")
    elif attention == "sdpa":
        src.set("sdpa", True, "xformers = 'sdpa'")
    extra = gui.get("additional_parameters") or ""
    if extra:
        _read_flags(str(extra).replace('"', "").split(), src, "additional_parameters")
    _gui_only_keys(gui, src)  # before the origins of absent keys are relabelled
    for flag, text in src.origin.items():
        if text.split(" ")[0] in absent:
            src.origin[flag] = f"kohya_ss GUI default: {text}"


# a GUI-only key -> the flags the GUI derives from it
_GUI_ONLY = {"LoRA_type": ("network_module", "network_args"), "lr_warmup": ("lr_warmup_steps",),
             "epoch": ("max_train_steps", "lr_scheduler_num_cycles")}


def _gui_only_keys(gui: dict, src: KohyaSource) -> None:
    """A table row for each GUI-only key: the flags it became, or why it sets none here."""
    for key, flags in _GUI_ONLY.items():
        if key not in gui:
            continue
        from_key = [flag for flag in flags if src.origin.get(flag, "").startswith(f"{key} =")
                    or key == "epoch" and "the GUI's estimate" in src.origin.get(flag, "")]
        if from_key:
            src.converted[key] = (gui[key], ", ".join(f"--{flag} {src.args[flag]!r}" for flag in from_key))
        else:
            src.ignored[key] = (gui[key], f"GUI only: it sets {' and '.join(flags)}, which the config gives or "
                                          f"leaves at kohya's default")


def _gui_lengths(gui: dict, src: KohyaSource) -> None:
    """max_train_steps (0 or empty: the GUI's estimate from the image folders), lr_warmup's percent of it (half to
    even), and lr_scheduler_num_cycles (empty: the GUI's epoch)."""
    steps = _gui_number(gui.get("max_train_steps", 1600)) or 0  # the field's default, v0.8.7's too
    origin = f"max_train_steps = {gui.get('max_train_steps')!r}"
    if steps and "max_train_steps" in gui:
        src.set("max_train_steps", steps, origin)
    elif not steps and not gui.get("dataset_config"):
        estimate = gui_estimated_steps(gui)
        if isinstance(estimate, str):
            src.missing["max_train_steps"] = estimate
            steps = None
        else:
            steps, how = estimate
            if steps:  # 0 is left out: sd-scripts' 1600 applies
                src.set("max_train_steps", steps, f"{origin}: the GUI's estimate {how}")
    warmup = _gui_number(gui.get("lr_warmup", 0)) or 0
    if warmup and steps is None:
        src.missing["lr_warmup_steps"] = f"lr_warmup = {warmup}% of the GUI's estimated max_train_steps"
    elif warmup and steps:
        src.set("lr_warmup_steps", round(float(int(warmup) * int(steps) / 100)),
                f"lr_warmup = {gui['lr_warmup']!r} (% of {steps} steps)")
    _gui_cycles(gui, src)


_GUI_IMAGES = (".jpg", ".jpeg", ".png", ".webp")


def gui_estimated_steps(gui: dict) -> tuple[int, str] | str:
    """v24.1.4's max_train_steps when its field is 0 and no dataset config is set, with how it was computed:
    ceil(sum of images x repeats over train_data_dir's `<repeats>_<name>` folders / batch / accumulation x epoch x
    (2 with a reg_data_dir)); without the folder, why it cannot be computed."""
    folder = str(gui.get("train_data_dir") or "")
    if not folder or not Path(folder).is_dir():
        where = f"train_data_dir {folder!r}, which does not exist here" if folder else "train_data_dir, which is empty"
        return (f"0: the GUI estimates it from the image folders of {where} (ceil(images x repeats / batch / "
                f"accumulation x epoch))")
    total = 0
    for sub in sorted(Path(folder).iterdir()):
        try:
            repeats = int(sub.name.split("_")[0])  # the GUI skips a folder without a number before "_"
        except ValueError:
            continue
        if sub.is_dir():
            total += repeats * sum(1 for f in sub.iterdir() if f.name.lower().endswith(_GUI_IMAGES))
    batch, accumulation, epoch = (int(_gui_number(gui.get(key) or 1)) for key in
                                  ("train_batch_size", "gradient_accumulation_steps", "epoch"))
    reg = 2 if gui.get("reg_data_dir") else 1  # the GUI doubles the steps for regularisation images
    steps = int(math.ceil(float(total) / batch / accumulation * epoch * reg))
    return steps, f"ceil({total} images x repeats in {folder} / {batch} / {accumulation} x {epoch} x {reg})"


def _gui_cycles(gui: dict, src: KohyaSource) -> None:
    """lr_scheduler_num_cycles: empty is the GUI's epoch."""
    cycles = gui.get("lr_scheduler_num_cycles", "")
    if cycles in ("", None) and not _dropped(_gui_number(gui.get("epoch", ""))):
        src.set("lr_scheduler_num_cycles", _gui_number(gui["epoch"]), f"epoch = {gui['epoch']!r}")
    elif not _dropped(_gui_number(cycles)):
        src.set("lr_scheduler_num_cycles", _gui_number(cycles), f"lr_scheduler_num_cycles = {cycles!r}")


def _gui_lrs(gui: dict, src: KohyaSource) -> None:
    """unet_lr / text_encoder_lr: 0 is left out; exactly one of them 0 sets the other group's *_only flag."""
    unet = _gui_number(gui.get("unet_lr", 0)) or 0
    text = _gui_number(gui.get("text_encoder_lr", 0)) or 0
    if unet:
        src.set("unet_lr", unet, f"unet_lr = {gui['unet_lr']!r}")
    if text:
        src.set("text_encoder_lr", text, f"text_encoder_lr = {gui['text_encoder_lr']!r}")
    if unet and not text and "text_encoder_lr" in gui:
        src.set("network_train_unet_only", True, "text_encoder_lr = 0 with unet_lr set")
    if text and not unet and "unet_lr" in gui:
        src.set("network_train_text_encoder_only", True, "unet_lr = 0 with text_encoder_lr set")


def _read_flags(tokens: list[str], src: KohyaSource, where: str) -> None:
    """`--flag value`, `--flag=value`, store_true `--flag`, nargs="*" `--flag a b c`: into src, later ones win."""
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--"):
            src.problem(where, f"{token!r} follows no flag")
            continue
        name, eq, inline = token[2:].partition("=")
        values = [inline] if eq else []
        kind = V087_TYPES.get(name)
        if not eq and kind is not bool:
            while i < len(tokens) and not tokens[i].startswith("--"):
                values.append(tokens[i])
                i += 1
                if kind is not list and name not in LIST_FLAGS and kind is not None:
                    break
        origin = f"{where} --{name}" + (f" {' '.join(values)}" if values else "")
        if kind is None:
            src.unknown[name] = " ".join(values) if values else True
        elif kind is bool:
            src.set(name, values[0] if values else True, origin)
        elif kind is list:
            src.set(name, values, origin)
        elif len(values) != 1:
            src.problem(where, f"--{name} needs one value")
        else:
            src.set(name, values[0], origin)


def read_config_file(path: Path) -> KohyaSource:
    """An sd-scripts --config_file TOML: v0.8.7 merges every section into one namespace (a later section's key
    wins) and converts no types, so values stay as TOML typed them."""
    src = KohyaSource(str(path))
    try:
        src.text = path.read_text(encoding="utf-8")
        data = tomllib.loads(src.text)
    except (OSError, UnicodeDecodeError) as err:
        src.problem("the file", f"not a TOML file ({err})")
        return src
    except tomllib.TOMLDecodeError as err:
        where = re.search(r"\(at line (\d+), column (\d+)\)", str(err))
        at = f" line {where[1]}, column {where[2]}" if where else ""
        reason = str(err).split(" (at ")[0]
        src.problems.append(f"{path}{at}: not valid TOML ({reason}); the import reads {SOURCE_KINDS}.")
        return src
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    for key, value in flat.items():
        if key not in V087_DEFAULTS:
            src.unknown[key] = value
        elif V087_TYPES[key] is list and isinstance(value, str):
            src.problem(key, f"{value!r}: v0.8.7 reads a TOML string here as one item per character; "
                             f"write a list of 'key=value' strings")
        elif not _toml_typed(V087_TYPES[key], value):
            src.problem(key, f"{value!r}: v0.8.7 converts no TOML value and --{key} takes "
                             f"{_TOML_KINDS[V087_TYPES[key]]}")
        else:
            src.args[key] = value
            src.origin[key] = f"{key} = {value!r}"
    return src


# what a TOML value of each argparse type must be, for v0.8.7 uses it as TOML typed it
_TOML_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _toml_typed(kind: type, value: object) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:  # v0.8.7 calls str methods on it (resolution.split)
        return isinstance(value, str)
    return True  # the rest: v0.8.7 uses any value as it is


def read_command_line(path: Path) -> KohyaSource:
    """A text file holding an `accelerate launch ... sdxl_train_network.py --flags` command (line continuations
    with a backslash allowed); the flags after the script are read as v0.8.7's argparse reads them."""
    src = KohyaSource(str(path))
    try:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        tokens = shlex.split(text, comments=True)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        src.problem("the file", f"not a shell command line ({err})")
        return src
    scripts = [i for i, t in enumerate(tokens) if t.endswith("train_network.py")]
    if not scripts:
        src.problem("the command", "names no sdxl_train_network.py")
        return src
    if not tokens[scripts[0]].endswith("sdxl_train_network.py"):
        src.problem("the command", f"{tokens[scripts[0]]} is not sdxl_train_network.py: lora-sweep trains SDXL")
    _read_flags(tokens[scripts[0] + 1:], src, "command line")
    config = src.args.get("config_file")
    if config:
        src.problem("--config_file", f"{config}: import the TOML itself as well (flags on the command line win)")
    return src


def read_dataset_config(path: Path) -> KohyaSource:
    """A --dataset_config file (TOML or JSON): passed through as data.dataset_config, its absolute path, for
    lora-sweep reads it as v0.8.7 does (data/subsets.py, checked before a run starts); a folder-mode
    train_data_dir or reg_data_dir from another source is then ignored, as v0.8.7 ignores it."""
    src = KohyaSource(str(path))
    src.set("dataset_config", str(path.resolve()), "its path, as --dataset_config")
    return src
