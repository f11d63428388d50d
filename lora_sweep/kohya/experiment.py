"""`python -m lora_sweep import`: kohya sources -> conf/experiment/user/<name>.yaml (with
conf/<group>/user/<name>.yaml for a chosen group whose settings it sets) and a table of what became of each flag.
Bad input (a file that cannot be read, a value of the wrong type) is reported one paragraph per problem, all at
once, and nothing is written.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from lora_sweep.config import CONF_DIR, flatten
from lora_sweep.kohya.metadata import read_lora
from lora_sweep.kohya.problems import source_problems
from lora_sweep.kohya.settings import Imported, Row, to_lora_sweep
from lora_sweep.kohya.sources import (
    SOURCE_KINDS,
    KohyaSource,
    read_command_line,
    read_config_file,
    read_dataset_config,
    read_gui,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def lora_sweep_defaults(groups: dict[str, object]) -> dict[str, object]:
    """Every setting's value in lora-sweep's config composed with `groups` (group -> option or options), dotted;
    interpolations kept as text, so they never equal a kohya value."""
    from hydra import compose, initialize_config_dir

    from lora_sweep.config import register_configs

    register_configs()
    overrides = [f"{group}={option}" if isinstance(option, str) else f"{group}=[{','.join(option)}]"
                 for group, option in groups.items()]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    return dict(flatten(tree))


def read_source(path: Path, data: Path | None = None) -> KohyaSource:
    """By kind: .safetensors -> a LoRA's metadata; a TOML or JSON with `datasets` -> a --dataset_config; JSON ->
    the GUI's config; a command naming train_network.py ->
    a command line; else an sd-scripts --config_file TOML."""
    with path.open("rb") as f:
        head = f.read(1 << 20)
    if path.suffix == ".safetensors" or head[8:9] == b"{":  # 8 bytes of header size, then the header's JSON
        return read_lora(path, data)
    if not head.strip() or b"\0" in head:
        src = KohyaSource(str(path))
        kind = "binary" if head.strip() else "empty"
        src.problem("the file", f"{kind}, not a source: the import reads {SOURCE_KINDS}")
        return src
    text = head.decode("utf-8", errors="replace")
    if _is_dataset_config(path, text):
        return read_dataset_config(path)
    if text.lstrip().startswith("{"):
        return read_gui(path)
    if "train_network.py" in text:
        return read_command_line(path)
    return read_config_file(path)


def _is_dataset_config(path: Path, text: str) -> bool:
    """A --dataset_config file: a top-level `datasets` array (TOML `[[datasets]]`, or JSON's "datasets" list)."""
    import json

    import tomllib

    try:
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("datasets"), list)


def import_sources(paths: list[Path], target: Path | None = None,
                   data: Path | None = None) -> tuple[Imported, list[KohyaSource]]:
    """Read every source (a later one's flags win) and map the union; problems of all sources are collected. A
    source's text for a file (the GUI's prompts) goes beside `target`, the experiment file (without one: a required
    value); a LoRA's image folders are looked for in `data`."""
    sources = [read_source(path, data) for path in paths]
    source_problems(sources)
    files: dict[str, str] = {}
    for src in sources:
        for flag, text in src.texts.items():
            if target is None:
                src.missing[flag] = "the GUI holds the prompts' text: write it to a file and set sampling.prompt_file"
                continue
            file = target.with_name(f"{target.stem}.prompts.txt").resolve()
            files[str(file)] = text if text.endswith("\n") else text + "\n"
            src.args[flag] = str(file)
            src.origin[flag] = f"{flag} = {_short(text)} (its text, written to {file.name})"
    args, origin, unknown, missing, unrecorded = {}, {}, {}, {}, set()
    for src in sources:
        unrecorded.update(src.unrecorded)
        args.update(src.args)
        origin.update({flag: f"{Path(src.path).name}: {text}" for flag, text in src.origin.items()})
        unknown.update(src.unknown)
        missing.update(src.missing)
    for flag in args:
        missing.pop(flag, None)
        unrecorded.discard(flag)
    imported = to_lora_sweep(args, origin, lora_sweep_defaults, unknown=unknown, missing=missing,
                             unrecorded=unrecorded)
    imported.problems[:0] = [p for src in sources for p in src.problems]
    imported.files = files
    for src in sources:
        for key, (value, why) in src.settings.items():
            imported.put(key, value, f"{Path(src.path).name}: {why}")
            shown = f"{len(value)} entries" if isinstance(value, list) else value
            imported.rows.append(Row("mapped", why.split(",")[0], shown, key))
            if key == "data.datasets":  # the datasets hold the images and resolutions: neither flag is missing
                imported.rows = [r for r in imported.rows if r.kind != "missing" or r.kohya not in ("train_data_dir",
                                                                                                  "resolution")]
    imported.rows += [Row("mapped", f"{key} (GUI)", value, became) for src in sources
                      for key, (value, became) in src.converted.items()]
    _required_values(imported)
    return imported, sources


# missing flag -> its setting and the group option whose pre-flight refuses it unset (a `???` merged over the
# schema's default keeps the default, so the option is what refuses)
_REQUIRED = {"pretrained_model_name_or_path": ("model.path", "sdxl"), "train_data_dir": ("data.dir", "folder")}


def _required_values(imported: Imported) -> None:
    """The model or image folder the sources cannot give: `???` in the file, with the reason, under model=sdxl or
    data=folder, so the run refuses to start until it is set."""
    for row in imported.rows:
        if row.kind == "missing" and row.kohya in _REQUIRED:
            setting, option = _REQUIRED[row.kohya]
            group = setting.split(".")[0]
            imported.groups[group] = option
            imported.why.setdefault(group, f"{setting} is a required value")
            imported.put(setting, "???", f"required value ({row.kohya}): {row.detail.split(': ', 1)[-1]}")


def required_settings(imported: Imported) -> list[str]:
    """The settings a missing row names (model.path, data.dir, ...), in the table's order."""
    return [r.detail.split(":")[0] for r in imported.rows if r.kind == "missing"]


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _yaml_value(value: object) -> str:
    if value == "???":  # Hydra's required value
        return "???"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return {"inf": ".inf", "-inf": "-.inf", "nan": ".nan"}.get(text, text)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    return "  # " + " ".join(text.split())


# keys that only act with an option's key, so they go with the option: the chosen optimizer's arguments in
# kohya's form, and the noise strengths' modifiers (pre-flight refuses them beside a 0 strength)
_TIED = {"optimizer": {"optimizer_args"},
         "noise": {"adaptive_scale", "offset_random_strength", "ip_gamma_random_strength"}}


def option_keys(group: str) -> set[str]:
    """The keys the shipped options of `group` set (conf/<group>/*.yaml) and those tied to them: what choosing
    another option replaces."""
    keys = set(_TIED.get(group, ()))
    for path in (CONF_DIR / group).glob("*.yaml"):
        keys |= set(OmegaConf.load(path).keys()) - {"defaults"}
    return keys


def experiment_files(imported: Imported, sources: list[str], name: str) -> dict[str, str]:
    """The files an import writes, by path under a config folder: experiment/user/<name>.yaml (the group choices,
    then each setting under its group, every line commented with the source key and value it came from, or "kohya
    default") and, for a chosen group with imported values of keys its options set (option_keys),
    <group>/user/<name>.yaml: an option of that group that extends the chosen option(s) with those values, so a
    group chosen on the command line replaces them all. The group's other keys stay in the experiment file."""
    head = [f"# Imported from kohya by `python -m lora_sweep import {' '.join(sources)}`.",
            "# A flag the sources leave out is sd-scripts v0.8.7's default (\"kohya default\")."]
    by_group: dict[str, list[str]] = {}
    in_option: dict[str, list[str]] = {}
    for key, value in imported.values.items():
        group, _, leaf = key.partition(".")
        chosen = group in imported.groups and leaf.split(".")[0] in option_keys(group)
        (in_option if chosen else by_group).setdefault(group, []).append(
            f"{leaf}: {_yaml_value(value)}{_comment(imported.why[key])}")
    files = {}
    lines = ["# @package _global_", *head, "defaults:"]
    for group, option in imported.groups.items():
        options = [option] if isinstance(option, str) else list(option)
        choice = option if isinstance(option, str) else "[" + ", ".join(option) + "]"
        if group in in_option:
            files[f"{group}/user/{name}.yaml"] = "\n".join(
                [f"# @package {group}", *head, f"# {group}={choice} with the imported values below.", "defaults:",
                 *[f"  - /{group}/{o}@_here_" for o in options], "  - _self_", *in_option[group]]) + "\n"
            choice = f"user/{name}"
        lines.append(f"  - override /{group}: {choice}{_comment(imported.why[group])}")
    lines.append("  - _self_")
    for group, entries in by_group.items():
        lines += [f"{group}:", *[f"  {entry}" for entry in entries]]
    return {f"experiment/user/{name}.yaml": "\n".join(lines) + "\n", **files}


KINDS = ("mapped", "default", "same as default", "ignored", "not supported", "missing", "not recorded", "unknown")
_HEADINGS = {"mapped": "mapped", "default": "kohya default, written (lora-sweep's differs)",
             "same as default": "kohya default, the same as lora-sweep's (not written)",
             "ignored": "ignored", "not supported": "not supported", "missing": "required value missing",
             "not recorded": "unknown: not in the LoRA's metadata (kohya default assumed)",
             "unknown": "unknown flags (newer than v0.8.7?): ignored"}


def table_text(imported: Imported, ignored_keys: dict[str, tuple[object, str]],
               unsupported: dict[str, tuple[object, str]] | None = None) -> str:
    """The table: per kind, one line per kohya flag (or GUI or OneTrainer key) with its value and the setting or
    the reason."""
    unsupported = unsupported or {}
    out = []
    for kind in KINDS:
        these = [r for r in imported.rows if r.kind == kind]
        if kind == "ignored":
            these += [Row("ignored", f"{key} (GUI)", value, why) for key, (value, why) in ignored_keys.items()]
        if kind == "not supported":
            these += [Row(kind, f"{key} (OneTrainer)", value, why) for key, (value, why) in unsupported.items()]
        if not these:
            continue
        out.append(f"{_HEADINGS[kind]} ({len(these)}):")
        out += [f"  {r.kohya} = {r.value!r}" + (f" -> {r.detail}" if r.detail else "") for r in these]
    return "\n".join(out) + "\n"


def config_root(into: Path | None) -> Path:
    """The config folder the files go under: conf/, or --into's (for hydra.searchpath=[file://DIR])."""
    return into if into is not None else CONF_DIR


def name_problems(name: str, into: Path | None, force: bool, paths: list[str] = ()) -> list[str]:
    """A bad --name, a shipped experiment's name, or one of `paths` (under the config folder) there already."""
    problems = []
    if not _NAME.fullmatch(name):
        problems.append(f"--name {name!r}: letters, digits, '_', '.' and '-' only, starting with a letter or digit.")
    elif (CONF_DIR / "experiment" / f"{name}.yaml").exists():  # --into too: user/NAME beside NAME misleads
        problems.append(f"--name {name!r} is a shipped experiment's name (conf/experiment/{name}.yaml): choose "
                        f"another.")
    for path in [config_root(into) / p for p in paths or [f"experiment/user/{name}.yaml"]]:
        if path.exists() and not force:
            problems.append(f"{path} exists: give --force to overwrite it, or another --name.")
    return problems


def run_import(paths: list[Path], name: str | None, into: Path | None, force: bool,
               data: Path | None = None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr): 0 with the files written and the table; 2 with every problem, nothing
    written."""
    name = name or (paths[0].stem if paths else "imported")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") if name else name
    problems = [f"{p}: not found." for p in paths if not p.is_file()]
    problems += name_problems(name, into, force)
    if data is not None and not data.is_dir():
        problems.append(f"--data {data}: not a folder.")
    target = config_root(into) / f"experiment/user/{name}.yaml"
    imported, sources = import_sources([p for p in paths if p.is_file()], target, data)
    problems += imported.problems
    if problems:
        return 2, "", "\n\n".join(problems) + "\n"
    files = experiment_files(imported, [str(p) for p in paths], name)
    problems = name_problems(name, into, force, list(files))
    if problems:
        return 2, "", "\n\n".join(problems) + "\n"
    for file, text in imported.files.items():
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        Path(file).write_text(text, encoding="utf-8")
    for relative, text in files.items():
        path = config_root(into) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    ignored = {key: why for src in sources for key, why in src.ignored.items()}
    unsupported = {key: why for src in sources for key, why in src.unsupported.items()}
    search = "" if into is None else f"'hydra.searchpath=[file://{into.resolve()}]' "
    written = ", ".join(str(config_root(into) / relative) for relative in files)
    table = table_text(imported, ignored, unsupported)
    return 0, table + f"\nwrote {written}; train it with `python sweep.py {search}experiment=user/{name}`." + \
        required_text(required_settings(imported)) + "\n", ""


def required_text(required: list[str]) -> str:
    """The import's last words on the required values: those written as ??? stop the run until set; any other
    takes lora-sweep's value unless set."""
    if not required:
        return ""
    written = {setting for setting, _ in _REQUIRED.values()}
    refused = [s for s in required if s in written or s.startswith("datasets[")]  # an image_dir is ??? in data.datasets
    others = [s for s in required if s not in refused]
    text = f"\n{len(required)} required value(s) the sources cannot give: {', '.join(required)}."
    if refused:
        text += (f" {', '.join(refused)}: ??? in the files, so the run refuses to start until each is set on "
                 f"sweep.py's command line (a LoRA's image folders: import it again with --data DIR, the folder "
                 f"holding them).")
    if others:
        text += f" {', '.join(others)}: lora-sweep's default applies unless set on sweep.py's command line."
    return text
