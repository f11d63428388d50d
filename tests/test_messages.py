"""Messages name only what exists: every setting a message suggests is a key of the schema, every `key=value` it
suggests composes and validates, every `group=option` is a file in conf/ (never, say, `train.unet_lr`: no such setting).

Read from the source with `ast`: the strings of every error, warning, log call and `Fallback` in lora_sweep/ and
sweep.py (f-strings by their literal parts), so a new message with a wrong name fails here by name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from lora_sweep.checks.validate import config_problems
from lora_sweep.config import Config, flatten, to_container

SOURCES = sorted((ROOT / "lora_sweep").rglob("*.py")) + [ROOT / "sweep.py"]
GROUPS = ("model", "data", "noise", "loss", "optimizer", "precision", "network", "train", "sampling", "validation",
          "tracking", "sweep")
CONF_GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "hydra")
# Run params that are not settings (logged beside the config's own params); each must be logged somewhere.
PARAMS = {"data.images", "data.skipped_images", "data.entries_with_repeats", "data.validation_images",
          "data.warnings", "train.total_batch_size"}
MESSAGE_CALLS = {"UserError", "ConfigError", "NonFiniteCacheError", "NonFiniteLoss", "JobFailed", "Fallback",
                 "_fail", "warn", "warning", "error", "info", "exception", "append"}
SETTING = re.compile(r"(?<![\w./-])(" + "|".join(GROUPS) + r")\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?)"
                     r"(?:=([^\s,;)'\"]*))?")
FILE_SUFFIXES = {"py", "yaml", "yml", "txt", "json", "md", "log", "db", "html", "png", "safetensors"}
GROUP_OPTION = re.compile(r"(?<![\w.])(" + "|".join(CONF_GROUPS) + r")=([a-z][a-z0-9_]*)\b")


def _call_name(node: ast.Call) -> str:
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")


def message_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every literal string inside a message call; an f-string's parts joined with '{}'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and _call_name(node) in MESSAGE_CALLS:
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                for sub in ast.walk(arg):
                    if isinstance(sub, ast.JoinedStr):
                        text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in sub.values)
                        found.append((sub.lineno, text))
                    elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        found.append((sub.lineno, sub.value))
    return found


def schema_keys() -> set[str]:
    return set(flatten(to_container(OmegaConf.structured(Config))))


def suggestions() -> list[tuple[str, str, str | None]]:
    """(where, key, value or None) for every setting named in a message."""
    out = []
    for path in SOURCES:
        for line, text in message_texts(path):
            for match in SETTING.finditer(text):
                if match[2] in FILE_SUFFIXES:  # a file name such as sweep.py or data/warnings.txt, not a setting
                    continue
                where = f"{path.relative_to(ROOT)}:{line}"
                out.append((where, f"{match[1]}.{match[2]}", match[3] or None))
    return out


def test_the_scan_finds_the_messages():
    keys = {key for _, key, _ in suggestions()}
    assert {"train.text_encoder_lr", "data.caption_extension", "sampling.prompt_file", "train.resume"} <= keys


def test_every_setting_a_message_names_is_a_schema_key():
    keys = schema_keys()
    wrong = [f"{where}: {key}" for where, key, _ in suggestions()
             if key not in keys and key not in PARAMS
             and not key.startswith(("optimizer.args.", "optimizer.lr_scheduler_args."))]  # free-form maps
    assert not wrong, "messages name settings that do not exist:\n" + "\n".join(wrong)


def test_the_listed_params_are_really_logged():
    source = "\n".join(p.read_text() for p in SOURCES)
    assert all(f'"{name}"' in source for name in PARAMS)


def _literal_values() -> list[tuple[str, str, str]]:
    """Suggestions with a concrete value (not a placeholder such as PATH or STEP, not an f-string or %-format hole)."""
    return sorted({(where, key, value) for where, key, value in suggestions()
                   if value and "{}" not in value and not re.search(r"%[sdrf]", value)
                   and not re.fullmatch(r"[A-Z_@]+", value.split("@")[0] or "X")
                   and not value.endswith(".")})


@pytest.mark.parametrize("where, key, value", _literal_values())
def test_every_suggested_value_composes_and_validates(where, key, value):
    cfg = compose_config(f"{key}={value}")
    named = [p for p in config_problems(cfg) if p.startswith(key) or f" {key}" in p]
    if key.startswith(("sampling.every", "validation.every")) and value != "0":
        pytest.skip("needs prompts / held-out images beside it")
    assert not named, f"{where}: '{key}={value}' is suggested but refused: {named}"


def test_every_group_option_a_message_names_exists():
    missing = []
    for path in SOURCES:
        for line, text in message_texts(path):
            for group, option in GROUP_OPTION.findall(text):
                if not (ROOT / "conf" / group / f"{option}.yaml").is_file():
                    missing.append(f"{path.relative_to(ROOT)}:{line}: {group}={option}")
    assert not missing, "\n".join(missing)
