"""kohya's names mapped or refused: every sd-scripts v0.8.7 SDXL LoRA flag is a lora-sweep setting, or a flag
refused or fixed with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config

from lora_sweep.checks.keys import KOHYA_NAMES, schema_keys
from lora_sweep.checks.kohya_flags import KOHYA_FLAGS, NETWORK_ARGS, Fixed, Refused

DATA = Path(__file__).parent / "data"


def v087_flags() -> list[str]:
    lines = (DATA / "kohya_v087_sdxl_network_flags.txt").read_text().splitlines()
    return [line.split("\t")[0] for line in lines if line and not line.startswith("#")]


def mapping(flag: str) -> str:
    """A flag's lora-sweep setting, or its refusal; fails the test for a flag neither table has."""
    if flag in KOHYA_NAMES:
        return KOHYA_NAMES[flag]
    assert flag in KOHYA_FLAGS, f"kohya's {flag} is neither a setting (KOHYA_NAMES) nor in KOHYA_FLAGS"
    return type(KOHYA_FLAGS[flag]).__name__


def test_every_v087_sdxl_lora_flag_is_a_setting_or_refused_or_fixed_by_name():
    flags = v087_flags()
    assert len(flags) == 170 and flags[:2] == ["console_log_level", "console_log_file"]
    settings = [f for f in flags if f in KOHYA_NAMES]
    refused = [f for f in flags if isinstance(KOHYA_FLAGS.get(f), Refused)]
    fixed = [f for f in flags if isinstance(KOHYA_FLAGS.get(f), Fixed)]
    assert sorted(settings + refused + fixed) == sorted(flags)  # each flag in exactly one of the three
    assert (len(settings), len(refused), len(fixed)) == (96, 32, 42)
    assert set(KOHYA_NAMES.values()) <= set(schema_keys())
    assert set(KOHYA_FLAGS) <= set(flags) | NETWORK_ARGS, "an entry for a name v0.8.7 does not have"
    assert all(entry.reason and not entry.reason.endswith(".") for entry in KOHYA_FLAGS.values())


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
