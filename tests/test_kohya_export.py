"""The kohya export: a composed config -> sd-scripts v0.8.7's config.toml, dataset.toml and command.sh."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, compose_configs

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from lora_sweep.kohya.export import kohya_args, not_expressible, write_export
from lora_sweep.kohya.flags import V087_DEFAULTS

DATA = ROOT / "tests" / "data"


def sdxl_folder_config(tmp_path: Path, *overrides: str):
    (tmp_path / "train" / "10_sks dog").mkdir(parents=True)
    (tmp_path / "train" / "notes").mkdir()  # no `<repeats>_` prefix: v0.8.7 skips it
    return compose_config("model=sdxl", f"model.path={tmp_path}/sdxl.safetensors", "data=folder",
                          f"data.dir={tmp_path}/train", *overrides)


def test_v53_exports_the_flags_the_reference_gives_for_its_settings(tmp_path):
    cfg = sdxl_folder_config(tmp_path, "experiment=v53", f"train.output_dir={tmp_path}/out")
    assert kohya_args(cfg) == {
        # the article's fixed settings: fp8 base with fp16 compute, DAdaptAdamPreprint at lr 1.0, 2048 buckets
        "mixed_precision": "fp16", "fp8_base": True, "optimizer_type": "DAdaptAdamPreprint", "learning_rate": 1.0,
        "resolution": "2048", "enable_bucket": True, "bucket_reso_steps": 32, "bucket_no_upscale": True,
        "min_bucket_reso": 512, "max_bucket_reso": 4096, "train_batch_size": 4, "max_train_steps": 6000,
        "save_every_n_steps": 200,  # lora-sweep's article file: a LoRA at every fit/loss step (compare.select)
        # v53's row: noise offset 0.0357, min-SNR gamma 5
        "noise_offset": 0.0357, "min_snr_gamma": 5.0,
        # lora-sweep's defaults where v0.8.7's differ
        "network_dim": 4, "network_train_unet_only": True, "caption_extension": ".txt",
        "network_alpha": 1.0,  # at v0.8.7's default too: its int 1 would store int64 alphas (ALWAYS_FLOAT)
        "sample_every_n_steps": 200, "sample_prompts": str(ROOT / "experiments/prompts/article_v53-v60.txt"),
        # what lora-sweep always does (checks/kohya_flags.py Fixed)
        "network_module": "networks.lora", "cache_latents": True, "no_half_vae": True,
        # v0.8.7's data order (data/order.py): the workers, and the simple log that lets S be the first draw
        "max_data_loader_n_workers": 0, "console_log_simple": True,
        # the essentials
        "pretrained_model_name_or_path": f"{tmp_path}/sdxl.safetensors", "output_dir": f"{tmp_path}/out",
        "output_name": "lora", "seed": 42,
    }


def test_the_workers_and_the_simple_log_are_exported_for_v087s_data_order(tmp_path):
    args = kohya_args(sdxl_folder_config(tmp_path, "data.max_data_loader_n_workers=2"))
    assert args["max_data_loader_n_workers"] == 2 and args["console_log_simple"] is True


def test_the_default_alpha_is_exported_as_a_float_so_kohya_stores_float32_alphas(tmp_path):
    """v0.8.7 run on such a config.toml (read_config_from_file, networks.lora.LoRAModule): network_alpha 1.0 gives a
    float32 alpha buffer and ss_network_alpha "1.0"; left out, its int default 1 gives int64 and "1"."""
    export = tmp_path / "export"
    write_export(sdxl_folder_config(tmp_path, "network.alpha=1"), export)
    assert "\nnetwork_alpha = 1.0\n" in (export / "config.toml").read_text(encoding="utf-8")


def test_every_exported_flag_is_a_v087_flag_away_from_its_default_or_essential(tmp_path):
    args = kohya_args(sdxl_folder_config(tmp_path, "experiment=v64"))
    assert set(args) <= set(V087_DEFAULTS)
    essential = {"pretrained_model_name_or_path", "output_name", "seed", "network_module", "network_alpha"}
    assert [flag for flag, value in args.items() if value == V087_DEFAULTS[flag] and flag not in essential] == []
    assert (args["mixed_precision"], "fp8_base" in args, args["multires_noise_iterations"]) == ("fp16", False, 6)


def test_config_toml_reads_back_as_v087_argparse_types(tmp_path):
    cfg = sdxl_folder_config(tmp_path, "optimizer=adamw8bit", "optimizer.args.betas=[0.9,0.99]", "network.rank=16",
                             "network.alpha=8", "network.conv_dim=8", "precision=bf16", "data.resolution='1024,768'",
                             "optimizer.scheduler=polynomial", "+optimizer.lr_scheduler_args.lr_end=0.5",
                             f"network.network_weights={tmp_path}/w/../start.safetensors")
    write_export(cfg, tmp_path / "export")
    config = tomllib.loads((tmp_path / "export" / "config.toml").read_text())
    picked = {k: config[k] for k in ("network_dim", "network_alpha", "network_args", "optimizer_type",
                                     "optimizer_args", "lr_scheduler", "lr_scheduler_args", "mixed_precision",
                                     "resolution", "min_bucket_reso", "max_bucket_reso", "dataset_config",
                                     "network_weights")}
    assert picked == {"network_dim": 16, "network_alpha": 8.0, "network_args": ["conv_dim=8"],
                      "optimizer_type": "AdamW8bit", "optimizer_args": ["betas=(0.9,0.99)"],
                      "lr_scheduler": "polynomial", "lr_scheduler_args": ["lr_end=0.5"], "mixed_precision": "bf16",
                      "resolution": "1024,768", "min_bucket_reso": 192, "max_bucket_reso": 2048,
                      "dataset_config": str(tmp_path / "export" / "dataset.toml"),
                      "network_weights": str(tmp_path / "start.safetensors")}  # paths absolute and resolved
    assert type(config["network_alpha"]) is float and type(config["network_dim"]) is int
    assert ast.literal_eval(config["optimizer_args"][0].split("=")[1]) == (0.9, 0.99)  # as v0.8.7 reads it
    assert "fp8_base" not in config and "output_dir" in config


def test_dataset_toml_lists_the_folder_subsets_and_the_reg_folders(tmp_path):
    (tmp_path / "reg" / "1_dog").mkdir(parents=True)
    cfg = sdxl_folder_config(tmp_path, f"data.reg_data_dir={tmp_path}/reg")
    write_export(cfg, tmp_path / "export")
    dataset = tomllib.loads((tmp_path / "export" / "dataset.toml").read_text())
    assert dataset == {"datasets": [{"subsets": [
        {"image_dir": f"{tmp_path}/train/10_sks dog", "num_repeats": 10, "class_tokens": "sks dog"},
        {"image_dir": f"{tmp_path}/reg/1_dog", "num_repeats": 1, "class_tokens": "dog", "is_reg": True}]}]}


def test_dataset_config_passes_through_with_absolute_image_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = ROOT / "tests" / "data" / "kohya_dataset.toml"
    cfg = compose_config("data=folder", f"data.dataset_config={source}", "data.dir=null")
    write_export(cfg, tmp_path / "export")
    exported = tomllib.loads((tmp_path / "export" / "dataset.toml").read_text())
    original = tomllib.loads(source.read_text())
    for dataset in original["datasets"]:
        for subset in dataset["subsets"]:
            subset["image_dir"] = str(tmp_path / subset["image_dir"])
    assert exported == original


def test_command_sh_launches_sd_scripts_and_lists_what_kohya_cannot_hold(tmp_path):
    cfg = compose_config("model=tiny", "loss.per_sample_timesteps=true", "validation.fit_images=2")
    assert not_expressible(cfg) == [
        "model=tiny: kohya cannot load lora-sweep's tiny stand-in model; set model=sdxl model.path=...",
        "validation.every=0, validation.fit_images=2: kohya v0.8.7 logs no val/loss or fit/loss",
        "loss.per_sample_timesteps is true: v0.8.7 draws one timestep per batch for huber/smooth_l1",
    ]
    command = write_export(cfg, tmp_path / "export", threads=1)[2].read_text().splitlines()
    assert command[3:5] == ["# Not expressible in kohya v0.8.7 (this export trains without them):",
                            "#   - model=tiny: kohya cannot load lora-sweep's tiny stand-in model; set model=sdxl "
                            "model.path=..."]
    assert command[-1] == ('accelerate launch --num_cpu_threads_per_process 1 sdxl_train_network.py '
                           '--config_file "$EXPORT/config.toml" --dataset_config "$EXPORT/dataset.toml"')


def test_command_sh_gives_kohya_the_cpu_threads_lora_sweep_computes_with(tmp_path):
    """accelerate 0.25.0's launch sets the script's OMP_NUM_THREADS to --num_cpu_threads_per_process, 1 when it is
    not given (whatever the shell's), and on the CPU the U-Net's sums depend on the thread count: the export names
    the count of the process that writes it (a run's own kohya/ export: the run's), or the one it is given."""
    cfg = compose_config("model=tiny")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        written = write_export(cfg, tmp_path / "here")[2].read_text().splitlines()
    finally:
        torch.set_num_threads(before)
    assert written[-1].startswith("accelerate launch --num_cpu_threads_per_process 3 sdxl_train_network.py ")
    assert "# 3 CPU threads, as lora-sweep computed with here" in written[-3]
    given = write_export(cfg, tmp_path / "given", threads=1)[2].read_text().splitlines()
    assert given[-1].startswith("accelerate launch --num_cpu_threads_per_process 1 sdxl_train_network.py ")
    assert given[-3].startswith("# 1 CPU thread, ")


def test_sample_prompts_spell_out_every_option_lora_sweep_draws_with(tmp_path):
    cfg = sdxl_folder_config(tmp_path, "sampling.prompts=['a cat --n ugly','a dog --w 640 --ss euler_a']",
                             "sampling.every=50", "sampling.steps=20", "sampling.seed=7", "data.resolution=512")
    written = write_export(cfg, tmp_path / "export")
    assert [p.name for p in written] == ["config.toml", "dataset.toml", "command.sh", "sample_prompts.txt"]
    assert written[3].read_text().splitlines() == [
        "a cat --w 512 --h 512 --d 7 --s 20 --l 7.0 --n ugly",
        "a dog --w 640 --h 512 --d 8 --s 20 --l 7.0 --ss euler_a"]  # seed + index, as lora-sweep draws them
    config = tomllib.loads(written[0].read_text())
    assert (config["sample_prompts"], config["sample_every_n_steps"], config["sample_at_first"]) == (
        str(tmp_path / "export" / "sample_prompts.txt"), 50, True)
    assert not_expressible(cfg)[-2:] == [  # 50 does not divide train.max_steps=20: kohya has no sample at the end
        "sampling.sampler=null (SDXL base's Euler, timestep_spacing leading, steps_offset 1): kohya's "
        "--sample_sampler default is ddim, and its euler spaces timesteps linspace",
        "sampling.every=50: lora-sweep also samples at the last step, kohya v0.8.7 only at step 0 (sample_at_first) "
        "and every sample_every_n_steps"]
    assert not_expressible(sdxl_folder_config(tmp_path / "b", "sampling.prompts=['a cat']", "sampling.every=10",
                                              "sampling.sampler=euler", "validation.fit_images=0")) == []


def test_kohyas_euler_is_not_sdxl_bases_euler():
    from lora_sweep.sampling.schedulers import build_scheduler

    sdxl, kohya = build_scheduler(None), build_scheduler("euler")  # v0.8.7's get_my_scheduler("euler")
    differ = {k: (sdxl.config[k], kohya.config[k]) for k in sdxl.config if not k.startswith("_")
              and sdxl.config[k] != kohya.config[k]}
    assert differ == {"timestep_spacing": ("leading", "linspace"), "steps_offset": (1, 0)}
    sdxl.set_timesteps(30)
    kohya.set_timesteps(30)
    assert (sdxl.timesteps[0].item(), kohya.timesteps[0].item()) == (958.0, 999.0)


def test_the_cli_exports_a_composed_config_and_a_runs_recorded_config_alike(tmp_path, mlflow_uri, capsys):
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from lora_sweep.__main__ import main
    from lora_sweep.config import to_container

    overrides = ["experiment=v53", "model=sdxl", f"model.path={tmp_path}/sdxl.safetensors",
                 f"train.output_dir={tmp_path}/out"]
    assert main(["export", "kohya", "--config", *overrides, "--out", str(tmp_path / "composed")]) == 0
    assert capsys.readouterr().err.splitlines() == [f"warning: not in the kohya export: {line}"
                                                    for line in not_expressible(compose_config(*overrides))]
    assert main(["export", "kohya", "--config", "model=tiny", "--out", str(tmp_path / "tiny")]) == 0
    assert capsys.readouterr().err.splitlines()[0] == ("warning: not in the kohya export: model=tiny: kohya cannot "
                                                       "load lora-sweep's tiny stand-in model; set model=sdxl "
                                                       "model.path=...")
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("export")).info.run_id
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(to_container(compose_config(*overrides))))  # as job.run
    client.log_artifact(run_id, str(tmp_path / "config.yaml"))
    assert main(["export", "kohya", run_id, "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.splitlines()[-4:] == [
        f"{tmp_path}/run/{name}" for name in ("config.toml", "dataset.toml", "command.sh", "sample_prompts.txt")]
    for name in ("config.toml", "dataset.toml", "sample_prompts.txt"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "composed" / name).read_text().replace(
            f"{tmp_path}/composed", f"{tmp_path}/run")
    assert main(["export", "kohya", run_id, "--config", "experiment=v53"]) == 2
    assert main(["export", "kohya", "0" * 32, "--tracking-uri", mlflow_uri]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: run {'0' * 32}: Run with id={'0' * 32} not found"


def test_the_import_of_v53s_export_gives_back_its_settings(tmp_path):
    from omegaconf import OmegaConf

    from lora_sweep.kohya.experiment import import_sources

    cfg = sdxl_folder_config(tmp_path, "experiment=v53", f"train.output_dir={tmp_path}/out")
    write_export(cfg, tmp_path / "export")
    imported, _ = import_sources([tmp_path / "export" / "config.toml"])
    assert imported.problems == []
    assert imported.groups == {"model": "sdxl", "precision": "fp8", "optimizer": "dadapt_adam_preprint",
                               "noise": "offset", "loss": ["l2", "min_snr"]}
    # what the export writes for lora-sweep's own choices: resolution as v0.8.7's string, derived bucket sizes, the
    # dataset and prompt files, U-Net only, and kohya's default sampler where lora-sweep samples with SDXL's Euler
    assert {k: imported.values.pop(k) for k in ("data.resolution", "data.min_bucket_reso", "data.max_bucket_reso",
                                                "data.dataset_config", "network.network_train_unet_only",
                                                "sampling.sampler", "sampling.prompt_file")} == {
        "data.resolution": "2048", "data.min_bucket_reso": 512, "data.max_bucket_reso": 4096,
        "sampling.prompt_file": str(tmp_path / "export" / "sample_prompts.txt"),
        "data.dataset_config": str(tmp_path / "export" / "dataset.toml"), "network.network_train_unet_only": True,
        "sampling.sampler": "ddim"}
    assert {key: OmegaConf.select(cfg, key) for key in imported.values} == imported.values


VARIANTS = [f"v{n}" for n in range(53, 65)]
MODEL = "/models/sd_xl_base_1.0.safetensors"  # a placeholder: the export only writes the path


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """v53-v64, each composed once on SDXL with a photos folder that exists (data.dir's 5_photo, as data=photos lays
    out the photos) and exported: variant -> (its config, its export folder)."""
    tmp = tmp_path_factory.mktemp("variants")
    (tmp / "photos" / "5_photo").mkdir(parents=True)
    configs = compose_configs(*[[f"experiment={variant}", "model=sdxl", f"model.path={MODEL}",
                                 f"data.dir={tmp}/photos"] for variant in VARIANTS])
    for variant, cfg in zip(VARIANTS, configs, strict=True):
        write_export(cfg, tmp / variant)
    return {variant: (cfg, tmp / variant) for variant, cfg in zip(VARIANTS, configs, strict=True)}


def imported_back(export: Path, tmp_path: Path, *overrides: str):
    """The config that `python -m lora_sweep import` of an export's config.toml and dataset.toml composes to (with
    its model group named, since compose_config otherwise puts tiny_random over the experiment's)."""
    from lora_sweep.kohya.experiment import run_import

    status, _, err = run_import([export / "config.toml", export / "dataset.toml"], "back", tmp_path / "conf", True)
    assert (status, err) == (0, "")
    return compose_config("model=user/back", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=user/back",
                          *overrides)


def test_v53_to_v64_export_as_their_fixtures(variants):
    """tests/data/kohya_export/<variant>.toml: the export's config.toml with its folder written as $EXPORT."""
    for variant, (_, export) in variants.items():
        text = (export / "config.toml").read_text(encoding="utf-8").replace(str(export.resolve()), "$EXPORT")
        assert text == (DATA / "kohya_export" / f"{variant}.toml").read_text(encoding="utf-8"), variant


def test_v53_to_v64_import_back_to_the_same_kohya_subset(variants, tmp_path):
    """Each export imported as experiment user/back_<variant>, then all composed (the export's own output folder
    stands for train.output_dir=null)."""
    from lora_sweep.kohya.experiment import run_import
    from lora_sweep.kohya.export import kohya_subset

    for variant, (_, export) in variants.items():
        status, _, err = run_import([export / "config.toml", export / "dataset.toml"], f"back_{variant}",
                                    tmp_path / "conf", False)
        assert (status, err) == (0, ""), variant
    backs = compose_configs(*[[f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"experiment=user/back_{variant}",
                               "train.output_dir=null"] for variant in variants])
    for (variant, (cfg, _)), back in zip(variants.items(), backs, strict=True):
        assert kohya_subset(back) == kohya_subset(cfg), variant


def test_a_richer_config_imports_back_to_the_same_kohya_subset(tmp_path):
    from lora_sweep.kohya.export import kohya_subset

    (tmp_path / "reg" / "1_dog").mkdir(parents=True)
    cfg = sdxl_folder_config(
        tmp_path, "optimizer=adamw8bit", "optimizer.args.betas=[0.9,0.99]", "optimizer.args.weight_decay=0.05",
        "network.rank=16", "network.alpha=8", "network.conv_dim=8", "network.conv_alpha=4",  # LoCon
        "network.dropout=0.1", "network.rank_dropout=0.1", "network.module_dropout=0.05",
        "optimizer.scheduler=cosine_with_restarts", "optimizer.warmup_steps=50", "optimizer.lr_scheduler_num_cycles=3",
        f"data.reg_data_dir={tmp_path}/reg", "data.shuffle_caption=true", "data.keep_tokens=1",
        "data.caption_dropout_rate=0.05", "data.caption_tag_dropout_rate=0.1", "data.caption_prefix='photo of'",
        "train.max_train_epochs=10", "network.train_text_encoder=true", "train.lr=2e-4", "train.text_encoder_lr=5e-5",
        "noise=multires", "loss=[huber_snr,min_snr]", "precision=bf16", f"train.output_dir={tmp_path}/out",
        "sampling.prompts=['a dog --ss euler_a','a cat']", "sampling.sampler=dpmsolver++", "sampling.every=5")
    write_export(cfg, tmp_path / "export")
    subset = kohya_subset(cfg)
    # the import leaves --output_dir out (each run writes in its own folder): the command line gives it back
    assert kohya_subset(imported_back(tmp_path / "export", tmp_path, f"train.output_dir={tmp_path}/out")) == subset
    assert subset["sample_prompts.txt"] == ["a dog --w 1024 --h 1024 --d 1234 --s 10 --l 7.0 --ss euler_a",
                                            "a cat --w 1024 --h 1024 --d 1235 --s 10 --l 7.0 --ss dpmsolver++"]
