"""kohya's names mapped or refused: every sd-scripts v0.8.7 SDXL LoRA flag and every key of the kohya_ss v24.1.4
SDXL LoRA presets is a lora-sweep setting, a flag refused or fixed with its reason, or a GUI-only key (docs/kohya.md).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, compose_config

from lora_sweep.checks.keys import KOHYA_NAMES, schema_keys
from lora_sweep.checks.kohya_flags import (
    ANY,
    GUI_KEYS,
    KOHYA_FLAGS,
    LORA_TYPES,
    NETWORK_ARGS,
    Fixed,
    Refused,
    flag_text,
    gui_key_flags,
    lora_type_problem,
)
from lora_sweep.kohya.flags import V087_DEFAULTS, V087_TYPES, typed

DATA = Path(__file__).parent / "data"
PRESETS = json.loads((DATA / "kohya_ss_v24.1.4_sdxl_presets.json").read_text(encoding="utf-8"))["presets"]
STANDARD = {name: p for name, p in PRESETS.items() if p["LoRA_type"] in LORA_TYPES}
LYCORIS = {name: p for name, p in PRESETS.items() if p["LoRA_type"] not in LORA_TYPES}


def v087_flags() -> list[str]:
    lines = (DATA / "kohya_v087_sdxl_network_flags.txt").read_text().splitlines()
    return [line.split("\t")[0] for line in lines if line and not line.startswith("#")]


def mapping(flag: str) -> str:
    """A flag's lora-sweep setting, or its refusal; fails the test for a flag neither table has."""
    if flag in KOHYA_NAMES:
        return KOHYA_NAMES[flag]
    assert flag in KOHYA_FLAGS, f"kohya's {flag} is neither a setting (KOHYA_NAMES) nor in KOHYA_FLAGS"
    return type(KOHYA_FLAGS[flag]).__name__


def additional_flags(text: str) -> list[str]:
    """The flag names in a GUI `additional_parameters` string, split as the GUI splits it."""
    return [arg[2:].split("=")[0] for arg in text.replace('"', "").split() if arg.startswith("--")]


def test_every_v087_sdxl_lora_flag_is_a_setting_or_refused_or_fixed_by_name():
    flags = v087_flags()
    assert len(flags) == 170 and flags[:2] == ["console_log_level", "console_log_file"]
    settings = [f for f in flags if f in KOHYA_NAMES]
    refused = [f for f in flags if isinstance(KOHYA_FLAGS.get(f), Refused)]
    fixed = [f for f in flags if isinstance(KOHYA_FLAGS.get(f), Fixed)]
    assert sorted(settings + refused + fixed) == sorted(flags)  # each flag in exactly one of the three
    assert (len(settings), len(refused), len(fixed)) == (97, 32, 41)
    assert set(KOHYA_NAMES.values()) <= set(schema_keys())
    assert set(KOHYA_FLAGS) <= set(flags) | NETWORK_ARGS, "an entry for a name v0.8.7 does not have"
    assert all(entry.reason and not entry.reason.endswith(".") for entry in KOHYA_FLAGS.values())


@pytest.mark.parametrize("name", sorted(STANDARD))
def test_every_key_of_an_sdxl_lora_preset_maps_to_a_setting_or_a_named_refusal(name):
    flags = set(v087_flags())
    preset = STANDARD[name]
    for key, value in preset.items():
        if key not in GUI_KEYS:
            assert key in flags, f"{key}: passed on under its own name, so it must be a v0.8.7 flag"
        targets = gui_key_flags(key)
        assert targets or GUI_KEYS[key].how, f"{key}: a GUI-only key says what it does"
        for flag in targets:
            mapping(flag)
        if key == "additional_parameters":
            for flag in additional_flags(value):
                assert flag in flags, flag
                mapping(flag)


def test_the_presets_and_their_mapping():
    """16 Standard and 3 LyCORIS SDXL presets at v24.1.4, none Kohya LoCon: their conv_dim never reaches sd-scripts."""
    assert len(STANDARD) == 16 and {p["LoRA_type"] for p in STANDARD.values()} == {"Standard"}
    prodigy = STANDARD["SDXL - LoRA AI_Now prodigy v1.0.json"]
    assert (prodigy["conv_dim"], prodigy["conv_alpha"], prodigy["scale_weight_norms"]) == (32, 32, 5)
    assert LORA_TYPES["Standard"] == () and "Kohya LoCon only" in GUI_KEYS["conv_dim"].how
    assert [mapping(f) for f in gui_key_flags("max_resolution")] == ["data.resolution"]
    assert [mapping(f) for f in gui_key_flags("lr_warmup")] == ["optimizer.warmup_steps"]
    assert [mapping(f) for f in gui_key_flags("xformers")] == ["train.xformers", "train.sdpa"]
    assert [mapping(f) for f in gui_key_flags("lora_network_weights")] == ["network.network_weights"]
    assert gui_key_flags("epoch") == () and "max_train_steps" in GUI_KEYS["epoch"].how
    assert additional_flags(STANDARD["SDXL - LoRA kudou-reira prodigy v4.0.json"]["additional_parameters"]) == [
        "lr_scheduler_type", "lr_scheduler_args", "network_train_unet_only"]
    assert mapping("lr_scheduler_type") == "Refused" and mapping("cache_latents") == "Fixed"


@pytest.mark.parametrize("name", sorted(LYCORIS))
def test_the_lycoris_presets_are_refused_naming_their_lora_type(name):
    lora_type = LYCORIS[name]["LoRA_type"]
    assert lora_type in ("LyCORIS/LoHa", "LyCORIS/LoKr")
    assert lora_type_problem(lora_type).startswith(f"The kohya_ss LoRA_type '{lora_type}' is not supported")


@pytest.mark.parametrize("argv, message", [
    (["masked_loss=true"], "kohya's --masked_loss is not supported by lora-sweep: it weights the loss by a mask"),
    (["train.masked_loss=true"], "kohya's --masked_loss is not supported by lora-sweep: it weights the loss"),
    (["base_weights=x"], "kohya's --base_weights is not supported by lora-sweep: it merges LoRA files"),
    (["network.block_dims=[2,2]"], "kohya's network_args block_dims= is not supported by lora-sweep: v0.8.7 gives"),
    (["cache_latents=false"], "kohya's --cache_latents is not a lora-sweep setting: lora-sweep always caches"),
])
def test_a_kohya_flag_without_a_setting_is_named_with_its_reason(argv, message):
    from lora_sweep.checks.command_line import command_line_problems

    (problem,) = command_line_problems(argv)
    assert problem.startswith(message) and "Did you mean" not in problem


def test_a_kohya_flag_added_with_plus_is_named_with_its_reason():
    from lora_sweep.checks.validate import config_problems

    (problem,) = config_problems(compose_config("+train.masked_loss=true"))
    assert problem == ("kohya's --masked_loss is not supported by lora-sweep: it weights the loss by a mask (an "
                       "image's alpha channel or conditioning_data_dir); lora-sweep's loss has no mask.")


def table_rows(text: str) -> dict[str, list[str]]:
    """Each name in a table row's first cell (`--a`, `--b`) -> that row's other cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            first, *rest = [cell.strip() for cell in line.strip()[1:-1].split("|")]
            rows.update({name: rest for name in re.findall(r"`([^`]+)`", first)})
    return rows


def test_the_coming_from_kohya_page_lists_every_refused_and_fixed_flag_and_gui_key():
    text = (ROOT / "docs" / "kohya.md").read_text(encoding="utf-8")
    rows = table_rows(text)
    for name, entry in KOHYA_FLAGS.items():
        value = [] if isinstance(entry, Refused) else ["any" if entry.value == ANY else f"`{entry.value}`"]
        assert rows.get(flag_text(name)) == [*value, entry.reason], name
    for key, entry in GUI_KEYS.items():
        flags = "the same" if entry.flags == (key,) else ", ".join(f"`{flag_text(f)}`" for f in entry.flags)
        assert rows.get(key) == [flags or "none", entry.how], key
    assert all(f"- `{name}`: {preset['LoRA_type']}\n" in text for name, preset in PRESETS.items())


def test_learning_rate_and_unet_lr_are_train_lr():
    """v0.8.7's --learning_rate (every group's default lr, polynomial's lr_init, adafactor:<lr>, ss_learning_rate) is
    what train.lr plays; optimizer.lr is the option's default lr that train.lr follows, and --unet_lr has no key of
    its own."""
    assert mapping("learning_rate") == mapping("unet_lr") == "train.lr"
    assert "optimizer.lr" not in KOHYA_NAMES.values()
    assert "no separate U-Net lr" in GUI_KEYS["unet_lr"].how


def test_the_v087_defaults_in_the_package_are_the_fixtures_flags_in_parser_order():
    lines = (DATA / "kohya_v087_sdxl_network_flags.txt").read_text().splitlines()
    rows = [line.split("\t") for line in lines if line and not line.startswith("#")]
    assert [(flag, ast.literal_eval(default)) for flag, default in rows] == list(V087_DEFAULTS.items())
    assert len(V087_DEFAULTS) == 170
    assert (V087_DEFAULTS["optimizer_type"], V087_DEFAULTS["learning_rate"], V087_DEFAULTS["network_dim"]) == \
        ("", 2e-06, None)


def test_a_flags_value_is_typed_as_v087s_argparse_types_it():
    assert (V087_TYPES["network_dim"], V087_TYPES["network_alpha"], V087_TYPES["xformers"]) == (int, float, bool)
    assert (typed("clip_skip", "2"), typed("network_alpha", 16), typed("max_train_steps", 800.0)) == (2, 16.0, 800)
    assert typed("optimizer_args", "a=1  b=(1,2)") == ["a=1", "b=(1,2)"]
    assert (typed("xformers", "true"), typed("sdpa", False)) == (True, False)
    with pytest.raises(ValueError, match="'eight' is not an integer"):
        typed("network_dim", "eight")
