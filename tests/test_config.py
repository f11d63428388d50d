"""Composition of the real conf/ tree: every option composes and validates; bad keys and values fail readably."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from conftest import ROOT, compose_config, compose_configs
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from lora_sweep.checks.validate import config_problems
from lora_sweep.config import config_hash

GROUPS = ["noise", "loss", "optimizer", "precision", "model", "data", "network", "train", "tracking"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["noise", "loss", "optimizer", "precision", "network", "train", "tracking"])
def test_every_group_option_composes_and_validates(group):
    assert options(group), f"conf/{group} has no options"
    for option in options(group):
        cfg = compose_config(f"{group}={option}")
        assert config_problems(cfg) == [], option
        assert cfg[group].get("name", option) == option or group in ("network", "train", "tracking")


def test_required_keys_exist_with_defaults():
    cfg = compose_config()
    for key in ["train.max_steps", "train.batch_size", "train.grad_accum", "train.seed", "train.lr",
                "network.rank", "network.alpha", "tracking.experiment"]:
        group, name = key.split(".")
        assert name in cfg[group], key
    assert cfg.train.lr == cfg.optimizer.lr  # train.lr follows the optimizer's default unless set


def test_command_line_overrides_compose():
    cfg = compose_config("noise=multires", "loss=huber_snr", "train.max_steps=3", "network.rank=8")
    assert cfg.noise.multires_iterations == 6 and cfg.loss.type == "huber"
    assert cfg.train.max_steps == 3 and cfg.network.rank == 8


def test_unknown_option_fails_with_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("noise=nonexistent")
    assert "nonexistent" in str(err.value) and "multires" in str(err.value)


def test_misspelt_key_and_wrong_type_fail_at_compose_time():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_config("noise.ofset=0.1")
    assert "ofset" in str(err.value)
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_config("train.max_steps=many")
    assert "max_steps" in str(err.value)


@pytest.mark.parametrize("override,field", [
    ("train.max_steps=0", "train.max_steps"),
    ("train.batch_size=-1", "train.batch_size"),
    ("train.lr=-0.1", "train.lr"),
    ("network.rank=0", "network.rank"),
    ("train.on_nan=ignore", "train.on_nan"),
    ("optimizer.lr_scheduler_num_cycles=-1", "optimizer.lr_scheduler_num_cycles"),
    ("model.clip_skip=-3", "model.clip_skip"),
    ("data.max_data_loader_n_workers=-1", "data.max_data_loader_n_workers"),
])
def test_bad_values_name_their_field(override, field):
    problems = config_problems(compose_config(override))
    assert problems and all(p.startswith(field) for p in problems), problems


def test_workers_are_refused_with_captions_that_change_per_step():
    """v0.8.7's workers draw caption randomness from their own streams, which lora-sweep does not reproduce."""
    assert config_problems(compose_config("data.max_data_loader_n_workers=2")) == []
    (problem,) = config_problems(compose_config("data.max_data_loader_n_workers=2", "data.shuffle_caption=true"))
    assert problem.startswith("data.max_data_loader_n_workers: 2 workers") and "data.shuffle_caption=true" in problem
    assert config_problems(compose_config("data.max_data_loader_n_workers=0", "data.shuffle_caption=true")) == []


def test_missing_model_path_is_a_clear_error_before_loading(tmp_path):
    problems = config_problems(compose_config("model=sdxl", f"model.path={tmp_path / 'nope'}"))
    assert problems and all("model.path" in p for p in problems), problems


def test_config_hash_ignores_tracking_and_paths_but_not_training():
    base = config_hash(compose_config())
    assert config_hash(compose_config("tracking.experiment=other", "train.output_dir=/tmp/x")) == base
    assert config_hash(compose_config("noise=offset")) != base
    assert config_hash(compose_config("train.lr=0.5")) != base


def test_timestep_bounds_change_the_hash_only_away_from_kohyas_defaults():
    """noise.min_timestep / max_timestep change what is trained; null and kohya's 0 / 1000 are the same training,
    and the same hash a config had before the keys existed (so earlier runs are still resumed and skipped)."""
    from omegaconf import OmegaConf

    cfg = compose_config()
    assert (cfg.noise.min_timestep, cfg.noise.max_timestep) == (None, None)
    base = config_hash(cfg)
    before_the_keys = OmegaConf.to_container(cfg, resolve=True)
    del before_the_keys["noise"]["min_timestep"], before_the_keys["noise"]["max_timestep"]
    assert config_hash(OmegaConf.create(before_the_keys)) == base
    assert config_hash(compose_config("noise.min_timestep=0", "noise.max_timestep=1000")) == base
    assert config_hash(compose_config("noise.max_timestep=500")) != base
    assert config_hash(compose_config("noise.min_timestep=200")) != base
    assert config_hash(compose_config("noise.min_timestep=200")) != config_hash(
        compose_config("noise.min_timestep=201"))


@pytest.mark.parametrize("launcher", ["gpu_queue", "ray", "submitit_slurm"])
def test_every_launcher_composes_with_the_projects_config(launcher):
    from hydra import compose, initialize_config_dir

    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "experiment=v53"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(("GpuQueueLauncher", "RayLauncher", "SlurmLauncher"))
    if launcher == "gpu_queue":
        assert "torch" in cfg.hydra.launcher.preload  # lora-sweep's preload list on top of the plugin's schema


def test_a_key_added_with_plus_is_a_problem_naming_the_closest_real_key():
    """`+noise.ofset=0.1` composes (Hydra adds any key with '+') and nothing reads it: refused, with noise.offset;
    keys under optimizer.args (kohya's --optimizer_args) are free-form and checked against the optimizer instead."""
    from lora_sweep.checks.keys import unknown_keys

    cfg = compose_config("+noise.ofset=0.1", "+optimizer.args.amsgrad=true", "+train.unet_lr=0.5")
    assert unknown_keys(cfg) == ["noise.ofset", "train.unet_lr"]
    problems = config_problems(cfg)
    assert problems[0].startswith("noise.ofset is not a setting: '+noise.ofset=...' adds it, but nothing reads it")
    assert "Did you mean noise.offset?" in problems[0] and "Did you mean train.lr" in problems[1]
    assert unknown_keys(compose_config("experiment=v57", "data=folder")) == []


@pytest.mark.parametrize("argv, suggestion", [
    (["noise.ofset=0.1"], "Did you mean noise.offset?"),
    (["-m", "noise.ofset=0.1,0.2", "train.max_steps=2"], "Did you mean noise.offset?"),
    (["noise.huber_c=0.1"], "Did you mean loss.huber_c?"),
    (["sampling.promt_file=p.txt"], "Did you mean sampling.prompt_file"),
    (["nosie=offset"], "Did you mean noise?"),
])
def test_a_command_line_key_the_schema_lacks_is_refused_before_hydra(argv, suggestion):
    from lora_sweep.checks.command_line import command_line_problems

    (problem,) = command_line_problems(argv)
    assert suggestion in problem and "+" not in problem  # never Hydra's advice to append it


def test_what_hydra_checks_itself_is_left_to_it():
    from lora_sweep.checks.command_line import command_line_problems

    assert command_line_problems(["+noise.ofset=1", "~noise.offset", "optimizer.args.d_cof=2",
                                  "hydra.job.chdir=true", "hydra/launcher=ray", "experiment=glob(v*)",
                                  "train.lr=${optimizer.lr}", "--cfg", "job"]) == []
    assert command_line_problems(["hydra.searchpath=[file:///elsewhere]", "experiment=mine"]) == []


def test_every_misspelt_key_of_the_command_line_is_reported_at_once():
    """`train.max_steps=2 noise.ofset=0.1 trian.lr=1` names both misspelt keys, not only noise.ofset."""
    from lora_sweep.checks.command_line import command_line_problems

    first, second = command_line_problems(["train.max_steps=2", "noise.ofset=0.1", "trian.lr=1"])
    assert first.startswith("noise.ofset is not a setting. Did you mean noise.offset?")
    assert second.startswith("trian.lr is not a setting. Did you mean train.lr?")


@pytest.mark.parametrize("argv", [["noise=ofset", "loss=hubr"], ["-m", "noise=ofset,none", "loss=l2,hubr"]])
def test_every_wrong_group_option_is_reported_at_once_with_hydras_options(argv):
    """Every wrong option is named, where Hydra stops at the first one it meets."""
    from lora_sweep.checks.command_line import command_line_problems

    assert command_line_problems(argv) == [
        "Could not find 'noise/ofset'. Available options in 'noise': ip, multires, multires_ip, none, offset, "
        "offset_ip. Did you mean noise=offset or noise=offset_ip?",
        "Could not find 'loss/hubr'. Available options in 'loss': debiased, huber_snr, l2, min_snr, smooth_l1_snr. "
        "Did you mean loss=huber_snr?"]
    (problem,) = command_line_problems(["loss=[huber_snr,smoth]"])
    assert problem.startswith("Could not find 'loss/smoth'") and problem.endswith("Did you mean loss=smooth_l1_snr?")


def test_every_value_of_the_wrong_type_is_reported_at_once_in_hydras_words():
    """`train.max_steps=abc train.lr=abc` names both, not only the first."""
    from lora_sweep.checks.command_line import command_line_problems

    assert command_line_problems(["train.max_steps=abc", "train.lr=abc"]) == [
        "Error merging override train.max_steps=abc. Value 'abc' of type 'str' could not be converted to Integer.",
        "Error merging override train.lr=abc. Value 'abc' of type 'str' could not be converted to Float."]
    assert command_line_problems(["-m", "train.max_steps=1,abc"]) == [
        "Error merging override train.max_steps=abc. Value 'abc' of type 'str' could not be converted to Integer."]
    assert command_line_problems(["-cn", "other", "noise.x=1"]) == [] and command_line_problems(["--help"]) == []


def test_a_kohya_style_string_for_a_list_setting_gets_the_list_form():
    """The tester's item 6: `network.network_args="conv_dim=8 conv_alpha=4"`, not OmegaConf's raw text."""
    from lora_sweep.checks.command_line import command_line_problems

    assert command_line_problems(['network.network_args="conv_dim=8 conv_alpha=4"']) == [
        "network.network_args takes a list, got the string 'conv_dim=8 conv_alpha=4' (kohya's command line and GUI "
        "write its items separated by spaces). Write each item quoted, in brackets, and quote the whole override for "
        """the shell: 'network.network_args=["conv_dim=8","conv_alpha=4"]'."""]
    (problem,) = command_line_problems(['optimizer.optimizer_args="weight_decay=0.1"'])
    assert problem.endswith("""'optimizer.optimizer_args=["weight_decay=0.1"]'.""")


def test_hydra_composition_errors_read_as_one_paragraph_with_the_closest_option():
    from lora_sweep.checks.command_line import hydra_error_text

    with pytest.raises(ConfigCompositionException) as err:
        compose_config("noise=ofset")
    text = hydra_error_text(err.value)
    assert "Available options in 'noise': ip, multires, multires_ip, none, offset, offset_ip." in text
    assert "Did you mean noise=offset" in text and "search path" not in text and "\n" not in text
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("train.max_steps=abc")
    text = hydra_error_text(err.value)
    assert text == ("Error merging override train.max_steps=abc. Value 'abc' of type 'str' could not be converted "
                    "to Integer.")
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("noise.ofset=0.1")
    assert hydra_error_text(err.value).startswith("noise.ofset is not a setting. Did you mean noise.offset?")


def test_the_readme_variant_at_demo_scale_keeps_its_knobs_and_changes_only_the_scale():
    """README: `python sweep.py experiment=v57 preset=demo` is one run of v57 (offset + IP noise, min-SNR,
    DAdaptAdamPreprint, fp8) at the demo's scale, instead of 2048 px, 6,000 steps and 1024^2 samples; of the
    optimizer only the demo's start and growth of D-Adaptation's step (d0, growth_rate) change."""
    full, demo = compose_config("experiment=v57"), compose_config("experiment=v57", "preset=demo")
    assert (full.data.resolution, full.train.max_steps, full.sampling.prompt_file is not None) == (2048, 6000, True)
    assert (demo.data.resolution, demo.train.max_steps, demo.sampling.prompt_file) == (64, 16, None)
    assert len(demo.sampling.prompts) == 2 and demo.sampling.steps == 4
    for key in ("noise", "loss", "precision", "tracking"):
        assert demo[key] == full[key], key
    changed = {k: v for k, v in flatten_cfg(demo.optimizer).items() if flatten_cfg(full.optimizer)[k] != v}
    assert changed == {"args.d0": 1e-3, "args.growth_rate": 1.15}
    assert config_problems(demo) == []


def flatten_cfg(node) -> dict:
    from lora_sweep.config import flatten

    return flatten(OmegaConf.to_container(node, resolve=True))


def short_number(value: float) -> str:
    """1e-3 and 1.15 as the README writes them."""
    if value >= 0.01:
        return f"{value:g}"
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def test_the_demo_changes_the_optimizer_settings_the_readme_names_and_nothing_else():
    """README: the demo starts some optimizers with a larger step (conf/preset_optimizer/demo_<optimizer>.yaml);
    it names each changed value, and the demo changes no other optimizer key; the others keep their own."""
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())  # one line: phrases may wrap
    tuned = sorted(p.stem.removeprefix("demo_") for p in (ROOT / "conf" / "preset_optimizer").glob("demo_*.yaml"))
    assert tuned == ["adamw", "dadapt_adam_preprint", "lion8bit", "prodigy"]
    names = options("optimizer")
    composed = compose_configs(*([f"optimizer={o}", *demo] for o in names for demo in ([], ["preset=demo"])),
                               ["experiment=v54", "preset=demo"])
    for optimizer, own, demo in zip(names, composed[:-1:2], composed[1:-1:2], strict=True):
        own, demo = flatten_cfg(own.optimizer), flatten_cfg(demo.optimizer)
        changed = {k.removeprefix("args."): v for k, v in demo.items() if own[k] != v}
        assert set(demo) == set(own), optimizer
        if optimizer not in tuned:
            assert changed == {}, optimizer
            continue
        named = " and ".join(f"{key} {short_number(value)}" for key, value in sorted(changed.items()))
        assert changed and re.search(re.escape(f"`{optimizer}` {named}") + r"(?![\w.])", readme), (optimizer, named)
    assert composed[-1].optimizer.lr == 3e-3  # the article's Lion variant (v54) at demo scale


def test_a_misspelt_key_in_a_users_experiment_file_names_the_real_key(tmp_path):
    from lora_sweep.checks.command_line import hydra_error_text

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nnoise:\n  ofset: 0.1\n")
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine")
    text = hydra_error_text(err.value)
    assert text.startswith("In 'experiment/mine': ConfigKeyError raised while composing config: Key 'ofset' not in")
    assert "noise.ofset is not a setting. Did you mean noise.offset?" in text


@pytest.mark.parametrize("argv, suggestion", [
    (["network.dim=8"], "Did you mean network.rank?"),  # docs/options.md: network.rank is kohya's --network_dim
    (["network_dim=8"], "Did you mean network.rank?"),
    (["network.network_alpha=2"], "Did you mean network.alpha?"),
    (["train.learning_rate=1"], "Did you mean train.lr?"),
    (["noise.ip_noise_gamma=0.1"], "Did you mean noise.ip_gamma?"),
    (["optimizer.type=prodigy"], "Did you mean optimizer.name?"),
])
def test_kohyas_flag_names_find_our_settings(argv, suggestion):
    """kohya's names find ours: `network.dim=8` gets "Did you mean network.rank?"."""
    from lora_sweep.checks.command_line import command_line_problems
    from lora_sweep.checks.keys import KOHYA_NAMES, schema_keys

    assert set(KOHYA_NAMES.values()) <= set(schema_keys())
    (problem,) = command_line_problems(argv)
    assert suggestion in problem


def test_a_misspelt_node_keeps_the_rest_of_the_key():
    """`optimizer.arg.eps=1` suggests optimizer.args.eps, not optimizer.args, optimizer.name, optimizer.warmup_steps."""
    from lora_sweep.checks.command_line import command_line_problems

    (problem,) = command_line_problems(["optimizer.arg.eps=1"])
    assert problem.startswith("optimizer.arg.eps is not a setting. Did you mean optimizer.args.eps? The optimizer")


def test_a_misspelt_launcher_setting_names_the_active_launchers_settings():
    """`hydra.launcher.cpu_slot=2` gets a suggestion and the list, not a bare "is not a setting."."""
    from hydra import compose, initialize_config_dir

    from hydra_plugins.gpu_queue_launcher.config import GpuQueueLauncherConf
    from lora_sweep.checks.command_line import hydra_error_text
    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        with pytest.raises(ConfigCompositionException) as err:
            compose("config", overrides=["hydra.launcher.cpu_slot=2"], return_hydra_config=True)
        text = hydra_error_text(err.value)
        fields = [f for f in GpuQueueLauncherConf.__dataclass_fields__ if not f.startswith("_")]
        assert text.startswith("hydra.launcher.cpu_slot is not a setting. Did you mean hydra.launcher.cpu_slots")
        assert text.endswith(f"? The hydra.launcher settings are: {', '.join(fields)}.") and "\n" not in text
        with pytest.raises(ConfigCompositionException) as err:
            compose("config", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partiton=gpu"],
                    return_hydra_config=True)
        assert "Did you mean hydra.launcher.partition" in hydra_error_text(err.value)


def _literal(text: str):
    """A documented default as a value: `word`, true/false, null (also "null: ..."), a number; None if prose."""
    text = text.split(":")[0].strip()
    if re.fullmatch(r"`[^`]+`", text):
        return text.strip("`")
    if text in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[text]
    try:
        return float(text)
    except ValueError:
        return _PROSE


_PROSE = object()


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of each body row of the first table after `heading`."""
    table = text.split(heading, 1)[1].split("\n|", 1)[1].split("\n\n")[0]
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in ("|" + table).splitlines()[2:]]


def test_documented_defaults_are_the_composed_ones():
    cfg = compose_config()
    text = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    groups = re.findall(r"^### .+$", text.split("## Keys and their kohya flags", 1)[1], flags=re.MULTILINE)
    rows = [row for heading in groups for row in _table_rows(text, heading)]  # one table per group
    checked = 0
    for keys, default, *_ in rows:
        keys = re.findall(r"`([^`]+)`", keys)
        defaults = default.split(", ") if default else []
        for key, text in zip(keys, defaults, strict=False):
            documented = _literal(text)
            if documented is not _PROSE:
                assert OmegaConf.select(cfg, key) == documented, f"docs/options.md: {key} defaults to {text}"
                checked += 1
    assert checked >= 60


def test_readme_optimizer_defaults_are_the_options_files():
    checked = 0
    rows = _table_rows((ROOT / "README.md").read_text(encoding="utf-8"), "| optimizer option |")
    for option, _, defaults in rows:
        cfg = compose_config(f"optimizer={option.strip('`')}").optimizer
        for item in re.split(r", (?![^(]*\))", defaults):  # not inside "(0.9, 0.99)"
            name, _, value = item.partition(" ")
            if name == "lr":
                assert cfg.lr == float(value), f"README: {option} {item}"
            elif name == "betas":
                assert list(cfg.args.betas) == [float(v) for v in value.strip("()").split(", ")], option
            elif name in cfg.args:
                assert cfg.args[name] == (True if not value else float(value)), f"README: {option} {item}"
            else:
                continue
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("overrides, start", [
    (["optimizer.args.weight_decai=0.1"], "optimizer.args.weight_decai is not set by the optimizer=adamw config. "
                                          "Did you mean optimizer.args.weight_decay? It sets optimizer.args: betas, "
                                          "eps, weight_decay;"),
    (["optimizer=prodigy", "optimizer.args.amsgrad=true"], "optimizer.args.amsgrad is not set by the "
                                                           "optimizer=prodigy config. It sets optimizer.args: betas,"),
])
def test_a_misspelt_optimizer_argument_names_the_closest_one_not_hydras_advice(overrides, start):
    """A free-form map (kohya's --optimizer_args) takes new keys only with '+': a typo set without it gets the
    closest key the option sets, and '+' only as the way to pass another argument."""
    from hydra import compose, initialize_config_dir

    from lora_sweep.checks.command_line import hydra_error_text
    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        with pytest.raises(ConfigCompositionException) as err:
            compose("config", overrides=overrides)
    text = hydra_error_text(err.value)
    assert text.startswith(start) and "\n" not in text and "To append" not in text
    assert text.endswith("another argument is passed with '+optimizer.args.<name>=<value>' (the pre-flight checks "
                         "it against the class).")


def test_issue_25_keys_at_their_defaults_keep_the_hash_runs_had_before_them():
    """The dataset, reg and caption keys of issue 25 are hash-neutral at their defaults (earlier runs are still
    resumed and skipped), and any other value is a different training."""
    from omegaconf import OmegaConf

    cfg = compose_config()
    base = config_hash(cfg)
    before_the_keys = OmegaConf.to_container(cfg, resolve=True)
    added = ["datasets", "dataset_config", "reg_data_dir", "caption_prefix", "caption_suffix", "caption_dropout_rate",
             "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "keep_tokens_separator",
             "secondary_separator", "enable_wildcard", "token_warmup_min", "token_warmup_step", "random_crop",
             "color_aug"]
    for key in added:
        del before_the_keys["data"][key]
    del before_the_keys["loss"]["prior_loss_weight"]
    assert config_hash(OmegaConf.create(before_the_keys)) == base
    changed = ["data.caption_prefix=sks", "data.caption_dropout_rate=0.1", "data.caption_dropout_every_n_epochs=2",
               "data.keep_tokens_separator='|||'", "data.enable_wildcard=true", "data.token_warmup_step=0.5",
               "loss.prior_loss_weight=0.5", "data.secondary_separator=';;;'", "data.caption_tag_dropout_rate=0.2"]
    assert len({config_hash(compose_config(c)) for c in changed} - {base}) == len(changed)


def test_max_token_length_is_hash_neutral_at_null_and_75_and_kohyas_name_finds_it():
    from lora_sweep.checks.keys import kohya_name

    base = config_hash(compose_config())
    assert config_hash(compose_config("data.max_token_length=75")) == base
    longer = {config_hash(compose_config(f"data.max_token_length={n}")) for n in (150, 225)}
    assert len(longer - {base}) == 2
    assert kohya_name("max_token_length") == "data.max_token_length"


ISSUE_27_28_KEYS = {
    "network": ["conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "network_weights", "dim_from_weights",
                "scale_weight_norms", "network_train_unet_only", "network_train_text_encoder_only", "network_args"],
    "optimizer": ["lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_args", "optimizer_args"],
    "train": ["max_train_epochs", "save_last_n_epochs", "save_last_n_steps", "save_precision", "torch_compile",
              "dynamo_backend", "sdpa", "xformers", "mem_eff_attn"],
    "loss": ["zero_terminal_snr", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss"],
    "precision": ["full_fp16", "full_bf16"],
    "model": ["clip_skip"],
}


def test_issue_27_and_28_keys_at_their_defaults_keep_the_hash_and_kohyas_names_find_them():
    from omegaconf import OmegaConf

    from lora_sweep.checks.keys import kohya_name

    cfg = compose_config()
    before_the_keys = OmegaConf.to_container(cfg, resolve=True)
    for group, keys in ISSUE_27_28_KEYS.items():
        for key in keys:
            del before_the_keys[group][key]
            assert kohya_name(key) == f"{group}.{key}"
    assert config_hash(OmegaConf.create(before_the_keys)) == config_hash(cfg)


def test_network_dropout_changed_meaning_so_a_non_zero_value_gets_a_new_hash():
    """network.dropout was PEFT's lora_dropout (on the input) and is now v0.8.7's network_dropout (after down): a run
    recorded with 0.1 under the old meaning must not be taken for one under the new."""
    from lora_sweep.config import _HASH_NEUTRAL, hashed_settings

    old = OmegaConf.to_container(compose_config("network.dropout=0.1"), resolve=True)
    blob = json.dumps({k: v for k, v in hashed_settings(OmegaConf.create(old)).items()
                       if not (k in _HASH_NEUTRAL and v in _HASH_NEUTRAL[k])}, sort_keys=True, default=str)
    assert config_hash(compose_config("network.dropout=0.1")) != hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert config_hash(compose_config("network.dropout=0.0")) == config_hash(compose_config())


def _hash_before_issue_33(cfg) -> str:
    """config_hash as it was before issue 33 marked every result as changed (no "@results" entry)."""
    from lora_sweep.config import _HASH_NEUTRAL, _folded_kohya_strings, hashed_settings

    settings = _folded_kohya_strings(hashed_settings(cfg))
    blob = json.dumps({k: v for k, v in settings.items() if not (k in _HASH_NEUTRAL and v in _HASH_NEUTRAL[k])},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_an_int_warmup_keeps_the_hash_it_had_when_the_field_was_typed_int():
    """optimizer.warmup_steps is typed Any (so a fraction gets v0.8.7's refusal, not a type error); an int stays an
    int and hashes as before: the value recorded on main 7458314, before the type changed."""
    cfg = compose_config("model=tiny", "optimizer.warmup_steps=5", "optimizer.scheduler=cosine")
    assert type(cfg.optimizer.warmup_steps) is int
    assert _hash_before_issue_33(cfg) == "bbc3ed2619c7693e"
    assert config_hash(cfg) == "5a8c648c4af8fb4a"


def test_issue_33s_kohya_order_gives_every_config_a_new_hash():
    """Runs made before v0.8.7's init, latent draws and data order are not resumed or skipped as if made after."""
    for overrides in ((), ("experiment=v57",), ("data.max_data_loader_n_workers=0",)):
        cfg = compose_config(*overrides)
        assert config_hash(cfg) != _hash_before_issue_33(cfg)
    assert config_hash(compose_config("data.max_data_loader_n_workers=0")) == config_hash(compose_config())
    assert config_hash(compose_config("data.max_data_loader_n_workers=2")) != config_hash(compose_config())


@pytest.mark.parametrize(("setting", "item"), [
    ("network.conv_dim=4", "conv_dim=4"), ("network.conv_alpha=4", "conv_alpha=4"),
    ("network.rank_dropout=0.1", "rank_dropout=0.1"), ("network.module_dropout=0.1", "module_dropout=0.1"),
])
def test_a_network_args_item_hashes_as_its_network_key(setting, item):
    """The tester's item 10: both spellings train the same LoRA, so skip-finished finds the run either way."""
    assert config_hash(compose_config(setting)) == config_hash(compose_config(f'network.network_args=["{item}"]'))
    assert config_hash(compose_config(setting)) != config_hash(compose_config())
    assert config_hash(compose_config(setting, f'network.network_args=["{item}"]')) == config_hash(
        compose_config(setting))


def test_an_optimizer_args_item_hashes_as_its_optimizer_args_key():
    assert config_hash(compose_config('optimizer.optimizer_args=["weight_decay=0.1"]')) == config_hash(
        compose_config("optimizer.args.weight_decay=0.1"))
    assert config_hash(compose_config('optimizer.optimizer_args=["betas=(0.9,0.99)"]')) == config_hash(
        compose_config("optimizer.args.betas=[0.9,0.99]"))


def test_only_an_unambiguous_kohya_string_is_folded_into_the_hash():
    conv4 = config_hash(compose_config("network.conv_dim=4"))
    for args in ('["conv_dim=4","conv_dim=8"]', '["conv_dim=4.0"]', '["conv_dim=4=4"]'):
        assert config_hash(compose_config(f"network.network_args={args}")) != conv4
    assert config_hash(compose_config('optimizer.optimizer_args=["weight_decay=abc"]')) != config_hash(
        compose_config())


def test_issue_30_and_31_keys_at_their_defaults_keep_the_hash():
    from omegaconf import OmegaConf

    cfg = compose_config()
    before_the_keys = OmegaConf.to_container(cfg, resolve=True)
    del before_the_keys["sampling"]["seeds"]
    del before_the_keys["evaluation"]
    del before_the_keys["compare"]["select"]
    del before_the_keys["sweep"]["stop_early"]
    assert config_hash(OmegaConf.create(before_the_keys)) == config_hash(cfg)
    assert config_hash(compose_config("evaluation.clip_model=/clip", "compare.select=fit/loss")) == config_hash(cfg)
    assert config_hash(compose_config("sampling.seeds=[1,2]")) != config_hash(cfg)
