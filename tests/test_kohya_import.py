"""`python -m lora_sweep import`: kohya_ss GUI presets, an sd-scripts --config_file TOML and a command line become an
experiment file whose every line names its source, with v0.8.7's defaults for what the sources leave out."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, compose_config
from kohya_dataset import write_kohya_dataset

from lora_sweep.__main__ import main
from lora_sweep.checks.command_line import command_line_problems
from lora_sweep.kohya.experiment import import_sources, required_text, run_import
from lora_sweep.kohya.metadata import read_lora
from lora_sweep.kohya.sources import KohyaSource, read_gui, read_gui_fields

DATA = Path(__file__).parent / "data"
PRESETS = json.loads((DATA / "kohya_ss_v24.1.4_sdxl_presets.json").read_text(encoding="utf-8"))["presets"]
STANDARD = sorted(name for name, p in PRESETS.items() if p["LoRA_type"] in ("Standard", "Kohya LoCon"))


def preset_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(PRESETS[name]), encoding="utf-8")
    return path


def with_images(tmp_path: Path, name: str) -> Path:
    """A fixture of tests/data/kohya_import/ with its image folder /data/img made a real folder in tmp_path."""
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text((DATA / "kohya_import" / name).read_text(encoding="utf-8").replace("/data/img",
                                                                                      str(tmp_path / "img")),
                    encoding="utf-8")
    return path


def kinds(imported) -> dict[str, dict[str, object]]:
    table: dict[str, dict[str, object]] = {}
    for row in imported.rows:
        table.setdefault(row.kind, {})[row.kohya] = row.value
    return table


def test_the_16_standard_presets_import_without_a_problem(tmp_path):
    assert len(STANDARD) == 16
    for name in STANDARD:
        imported, _ = import_sources([preset_file(tmp_path, name)])
        assert imported.problems == [], name
        assert imported.groups["model"] == "sdxl"


def test_a_lycoris_preset_is_refused_naming_its_type():
    src = KohyaSource("p.json")
    read_gui_fields(PRESETS["SDXL - LoKR v1.0.json"], src)
    assert len(src.problems) == 1 and "LoRA_type 'LyCORIS/LoKr' is not supported" in src.problems[0]


def test_the_ai_now_prodigy_preset_gives_its_exact_values(tmp_path):
    imported, sources = import_sources([preset_file(tmp_path, "SDXL - LoRA AI_Now prodigy v1.0.json")])
    assert imported.groups == {"model": "sdxl", "precision": "bf16", "optimizer": "prodigy", "noise": "none",
                               "loss": ["l2", "min_snr"], "data": "folder"}
    assert imported.values == {
        "train.lr": 1.0, "train.text_encoder_lr": 1.0, "train.save_precision": "bf16", "train.save_every_epochs": 10,
        "train.batch_size": 8, "train.xformers": True, "train.max_steps": 1600, "train.gradient_checkpointing": True,
        "train.grad_accum": 1, "data.caption_extension": ".txt", "data.resolution": "1024,1024",
        "model.path": "???", "data.dir": "???",
        "data.enable_bucket": True, "data.min_bucket_reso": 256, "data.max_bucket_reso": 2048,
        "data.bucket_reso_steps": 32, "data.bucket_no_upscale": True, "data.max_token_length": 75,
        "model.clip_skip": 1, "noise.max_timestep": 1000, "sampling.sampler": "euler_a", "loss.prior_loss_weight": 1.0,
        "train.output_name": "last", "loss.type": "l2", "loss.huber_schedule": "snr", "loss.huber_c": 0.1,
        "train.max_grad_norm": 1.0,
        "loss.min_snr_gamma": 5.0,
        "optimizer.optimizer_args": ["weight_decay=0.01", "decouple=True", "d0=0.0001", "use_bias_correction=True"],
        "optimizer.scheduler": "constant", "optimizer.lr_scheduler_num_cycles": 1, "network.rank": 32,
        "network.alpha": 16.0, "network.scale_weight_norms": 5.0,
        "network.train_text_encoder": True,  # no network_train_unet_only: v0.8.7 trains the text encoders too
        "data.max_data_loader_n_workers": 0}  # the GUI passes its field's 0
    # the preset has no max_train_steps: the GUI passes its field's 1600
    assert imported.why["train.max_steps"] == "preset.json: kohya_ss GUI default: max_train_steps = 1600"
    assert imported.why["network.alpha"] == "preset.json: network_alpha = 16"
    table = kinds(imported)
    assert set(table["missing"]) == {"pretrained_model_name_or_path", "train_data_dir"}
    assert table["ignored"]["training_comment"] == "trigger: the queen of heart 1a"
    assert sources[0].ignored["conv_dim"] == (32, "LoRA_type Standard ignores it")
    assert "not supported" not in table and "unknown" not in table


def test_gui_conversions_warmup_percent_zeros_dropped_and_additional_parameters():
    src = KohyaSource("p.json")
    read_gui_fields({"LoRA_type": "Kohya LoCon", "conv_dim": 8, "conv_alpha": "4", "max_train_steps": "250",
                     "lr_warmup": 5, "max_grad_norm": 0, "network_alpha": 0, "learning_rate": "0.0001",
                     "unet_lr": 0.0002, "text_encoder_lr": 0, "xformers": "sdpa", "epoch": 3,
                     "lr_scheduler_num_cycles": "", "rank_dropout": 0.1,
                     "optimizer_args": '"betas=0.9,0.99" "weight_decay=0.1"',
                     "additional_parameters": '--max_grad_norm=0 --log_prefix=x --newer_flag'}, src)
    assert src.problems == []
    assert src.args["resolution"] == "512,512"  # an absent field: the GUI passes its default
    assert src.origin["resolution"] == "kohya_ss GUI default: max_resolution = '512,512'"
    assert {k: v for k, v in src.args.items() if not src.origin[k].startswith("kohya_ss GUI default")} == {
                        "max_grad_norm": 0.0, "learning_rate": 0.0001, "optimizer_args": ["betas=0.9,0.99",
                        "weight_decay=0.1"], "network_module": "networks.lora",
                        "network_args": ["conv_dim=8", "conv_alpha=4", "rank_dropout=0.1"], "max_train_steps": 250,
                        "lr_warmup_steps": 12, "lr_scheduler_num_cycles": 3, "unet_lr": 0.0002,
                        "network_train_unet_only": True, "sdpa": True, "log_prefix": "x"}
    assert src.unknown == {"newer_flag": True}  # 5% of 250 = 12.5: half to even


def test_gui_only_keys_get_rows_saying_what_they_became_and_network_args_their_values(tmp_path):
    gui = tmp_path / "gui.json"
    gui.write_text(json.dumps({"LoRA_type": "Kohya LoCon", "conv_dim": "4", "conv_alpha": "2", "lr_warmup": 50,
                               "max_train_steps": "5", "epoch": 3, "lr_scheduler_num_cycles": ""}), encoding="utf-8")
    imported, _ = import_sources([gui])
    assert imported.why["network.network_args"] == ("gui.json: LoRA_type = 'Kohya LoCon', conv_dim = '4', "
                                                    "conv_alpha = '2'")
    assert {r.kohya: (r.kind, r.value, r.detail) for r in imported.rows if r.kohya.endswith("(GUI)")} == {
        "LoRA_type (GUI)": ("mapped", "Kohya LoCon",
                            "--network_module 'networks.lora', --network_args ['conv_dim=4', 'conv_alpha=2']"),
        "lr_warmup (GUI)": ("mapped", 50, "--lr_warmup_steps 2"),
        "epoch (GUI)": ("mapped", 3, "--lr_scheduler_num_cycles 3")}
    gui.write_text(json.dumps({"epoch": 3, "lr_scheduler_num_cycles": "2", "max_train_steps": "5"}), encoding="utf-8")
    assert read_gui(gui).ignored["epoch"] == (3, "GUI only: it sets max_train_steps and lr_scheduler_num_cycles, "
                                                 "which the config gives or leaves at kohya's default")


def test_a_config_file_toml_reads_flat_untyped_with_v087_defaults_for_the_rest(tmp_path):
    imported, _ = import_sources([with_images(tmp_path, "config_file.toml")])
    assert imported.problems == []
    assert imported.groups == {"model": "sdxl", "precision": "fp8_bf16", "optimizer": "adamw8bit",
                               "noise": "offset", "loss": "huber_snr"}
    assert imported.values == {
        "train.lr": 0.0001, "train.batch_size": 2, "train.max_steps": 3000,
        "model.path": "/models/sd_xl_base_1.0.safetensors", "data.dir": str(tmp_path / "img"),
        "data.caption_extension": ".caption", "data.resolution": "1024,1024", "data.enable_bucket": False,
        "data.min_bucket_reso": 256, "data.max_bucket_reso": 1024, "data.bucket_reso_steps": 64,
        "noise.offset": 0.0357, "loss.type": "huber", "loss.huber_c": 0.05, "sampling.sampler": "ddim",
        "optimizer.optimizer_args": ["weight_decay=0.1", "betas=(0.9,0.99)"], "optimizer.warmup_steps": 100,
        "network.rank": 16, "network.alpha": 8, "network.train_text_encoder": True,
        "data.max_data_loader_n_workers": 8}  # unset: kohya's default
    table = kinds(imported)
    assert table["not supported"] == {"masked_loss": True}  # unset no_half_vae: kohya's default
    assert table["unknown"] == {"future_flag": 3}
    assert "missing" not in table


def test_a_command_line_reads_as_argparse_does(tmp_path):
    imported, _ = import_sources([with_images(tmp_path, "command_line.sh")])
    assert imported.problems == []
    assert imported.groups == {"model": "sdxl", "precision": "fp16", "optimizer": "prodigy", "noise": "ip",
                               "loss": ["l2", "debiased"]}
    assert {k: v for k, v in imported.values.items() if not k.startswith("data.")} == {
        "train.lr": 1.0, "train.text_encoder_lr": 0.5, "train.max_steps": 800, "train.seed": 7,
        "model.path": "/models/sdxl.safetensors", "noise.ip_gamma": 0.1, "sampling.sampler": "ddim",
        "optimizer.optimizer_args": ["decouple=True", "weight_decay=0.01"],
        "optimizer.scheduler": "cosine_with_restarts", "optimizer.lr_scheduler_num_cycles": 3,
        "loss.debiased": True, "network.rank": 8, "network.alpha": 4.0, "network.train_text_encoder": True}
    assert imported.why["network.alpha"] == "command_line.sh: command line --network_alpha 4"
    assert kinds(imported)["not supported"] == {"save_model_as": "ckpt"}


def test_the_written_experiment_composes_with_its_values(tmp_path):
    name = f"test-import-{os.getpid()}"
    status, out, err = run_import([with_images(tmp_path, "command_line.sh")], name, None, False)
    assert (status, err) == (0, "")
    written = [Path(p) for p in out.rsplit("wrote ", 1)[1].split(";")[0].split(", ")]
    try:
        assert status == 0 and [p.relative_to(ROOT / "conf").as_posix() for p in written] == [
            f"{group}/user/{name}.yaml" for group in ("experiment", "model", "optimizer", "noise", "loss")]
        cfg = compose_config(f"model=user/{name}", f"experiment=user/{name}")  # a model= keeps tiny_random off
        assert command_line_problems([f"experiment=user/{name}"]) == []  # sweep.py's pre-flight accepts it
        assert command_line_problems(["experiment=user/nothing"]) == [
            "Could not find 'experiment/user/nothing'. Available options in 'experiment': article, article_v61, "
            "v53, v54, v55, v56, v57, v58, v59, v60, v61, v62, v63, v64."]
    finally:
        for path in written:
            path.unlink()
    assert (cfg.model.name, cfg.precision.name, cfg.optimizer.name) == ("sdxl", "fp16", "prodigy")
    assert (cfg.train.lr, cfg.train.text_encoder_lr, cfg.train.max_steps, cfg.network.alpha) == (1.0, 0.5, 800, 4.0)
    assert (cfg.noise.ip_gamma, cfg.loss.debiased, cfg.data.resolution) == (0.1, True, "1024,1024")
    assert list(cfg.optimizer.optimizer_args) == ["decouple=True", "weight_decay=0.01"]


def test_a_group_chosen_on_the_command_line_keeps_the_groups_other_imported_keys(tmp_path):
    """The tester's case: --min_timestep 100 --max_timestep 900 survive `noise=multires`; so do the loss and
    optimizer keys no loss or optimizer option sets, while the options' own keys are replaced."""
    toml = tmp_path / "cfg.toml"
    toml.write_text("noise_offset = 0.05\nadaptive_noise_scale = 0.005\nmin_timestep = 100\nmax_timestep = 900\n"
                    "min_snr_gamma = 5.0\nprior_loss_weight = 0.5\noptimizer_args = ['weight_decay=0.05']\n"
                    "lr_scheduler = 'cosine'\nlr_warmup_steps = 10\n", encoding="utf-8")
    assert run_import([toml], "t", tmp_path / "conf", False)[0] == 0
    noise = (tmp_path / "conf" / "noise" / "user" / "t.yaml").read_text(encoding="utf-8")
    assert "min_timestep" not in noise and "adaptive_scale: 0.005" in noise
    cfg = compose_config(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=user/t", "noise=multires",
                         "loss=huber_snr", "optimizer=prodigy")
    n, lo, o = cfg.noise, cfg.loss, cfg.optimizer
    assert (n.min_timestep, n.max_timestep, n.offset, n.adaptive_scale, n.multires_iterations) == (
        100, 900, 0.0, None, 6)
    assert (lo.type, lo.min_snr_gamma, lo.prior_loss_weight) == ("huber", None, 0.5)
    assert (o.name, list(o.optimizer_args), o.scheduler, o.warmup_steps) == ("prodigy", [], "cosine", 10)


def test_a_gui_configs_output_dir_is_ignored_so_a_sweeps_runs_get_their_own_folders(tmp_path):
    gui = tmp_path / "gui.json"
    gui.write_text(json.dumps({"output_dir": "/data/out", "output_name": "mylora"}), encoding="utf-8")
    imported, _ = import_sources([gui])
    assert "train.output_dir" not in imported.values and imported.values["train.output_name"] == "mylora"
    assert [(r.kind, r.detail) for r in imported.rows if r.kohya == "output_dir"] == [
        ("ignored", "every lora-sweep run writes its LoRA in its own run folder; set train.output_dir for a single "
                    "run")]


def test_bad_input_is_every_problem_at_once_exit_2_and_nothing_written(tmp_path, capsys):
    files = {
        "image.png": None,  # a real PNG: binary
        "notes.toml": "[training_arguments]\nlearning_rate = 1e-4\nnetwork_dim = = 4\n",
        "gui.json": '{\n  "LoRA_type": "Standard",\n  "seed": "abc",\n  "learning_rate": "fast",\n'
                    '  "optimizer": "AdamWW",\n  "train_data_dir": "/nowhere/img",\n  "max_train_steps": 10\n}\n',
        "cmd.sh": "accelerate launch sdxl_train_network.py --lr_scheduler cosine_annealing --max_train_steps lots "
                  "--reg_data_dir /nowhere/reg",
        "config.toml": "[training_arguments]\nlearning_rate = \"1e-4\"\nnetwork_train_unet_only = 1\n",
    }
    for name, text in files.items():
        if text is None:
            from PIL import Image

            Image.new("RGB", (8, 8)).save(tmp_path / name)
        else:
            (tmp_path / name).write_text(text, encoding="utf-8")
    plain = safetensors_with(tmp_path / "plain.safetensors", {"format": "pt"})
    sources = [tmp_path / name for name in files] + [plain, tmp_path / "none.json"]
    mine = tmp_path / "out" / "experiment" / "user" / "mine.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("kept\n", encoding="utf-8")
    before = sorted(tmp_path.rglob("*"))
    status = main(["import", *map(str, sources), "--name", "mine", "--into", str(tmp_path / "out")])
    paragraphs = capsys.readouterr().err.strip().split("\n\n")
    assert status == 2 and sorted(tmp_path.rglob("*")) == before
    assert mine.read_text(encoding="utf-8") == "kept\n"
    kinds_text = ("the import reads a kohya_ss GUI config (JSON), an sd-scripts --config_file or --dataset_config "
                  "TOML, a text file with an sdxl_train_network.py command line, or a LoRA .safetensors")
    gui, cmd, config = tmp_path / "gui.json", tmp_path / "cmd.sh", tmp_path / "config.toml"
    assert paragraphs == [
        f"{tmp_path / 'none.json'}: not found.",
        f"{mine} exists: give --force to overwrite it, or another --name.",
        f"{tmp_path / 'image.png'}: the file: binary, not a source: {kinds_text}.",
        f"{tmp_path / 'notes.toml'} line 3, column 15: not valid TOML (Invalid value); {kinds_text}.",
        f"{gui} line 3: seed = 'abc': kohya_ss v24.1.4 trains it as 0 (int() of the text fails); write a whole "
        f"number.",
        f"{gui} line 4: learning_rate = 'fast': 'fast' is not a number (v0.8.7's --learning_rate takes float).",
        f"{gui} line 5: optimizer = 'AdamWW': not an optimizer_type of sd-scripts v0.8.7 (AdamW, AdamW8bit, "
        f"Prodigy, DAdaptAdam, Adafactor, SGDNesterov, Lion, a torch.optim class or a module.Class path).",
        f"{gui} line 6: train_data_dir = '/nowhere/img': the folder does not exist here: correct the path in the "
        f"source.",
        f"{cmd}: command line --max_train_steps lots: 'lots' is not an integer (v0.8.7's --max_train_steps takes "
        f"int).",
        f"{cmd}: command line --lr_scheduler cosine_annealing: not an lr_scheduler of sd-scripts v0.8.7; choose one "
        f"of constant, constant_with_warmup, cosine, cosine_with_restarts, linear, piecewise_constant, polynomial, "
        f"adafactor.",
        f"{cmd}: command line --reg_data_dir /nowhere/reg: the folder does not exist here: correct the path in the "
        f"source.",
        f"{config} line 2: learning_rate: '1e-4': v0.8.7 converts no TOML value and --learning_rate takes a number.",
        f"{config} line 3: network_train_unet_only: 1: v0.8.7 converts no TOML value and --network_train_unet_only "
        f"takes true or false.",
        f"{plain}: the file: its metadata has no ss_* keys (nor OneTrainer's ot_config): not written by "
        f"sd-scripts, lora-sweep or OneTrainer with its config."]


def test_an_existing_file_needs_force_and_a_shipped_name_is_refused(tmp_path, capsys):
    source = with_images(tmp_path, "command_line.sh")
    assert run_import([source], "mine", tmp_path, False)[0] == 0
    status, _, err = run_import([source], "mine", tmp_path, False)
    assert status == 2 and err == (f"{tmp_path / 'experiment' / 'user' / 'mine.yaml'} exists: give --force to "
                                   f"overwrite it, or another --name.\n")
    assert run_import([source], "mine", tmp_path, True)[0] == 0
    status, _, err = run_import([source], "v61", None, False)
    assert status == 2 and "shipped experiment's name" in err
    status, _, err = run_import([source], "v53", tmp_path / "into", False)  # --into refuses it too
    assert status == 2 and err == ("--name 'v53' is a shipped experiment's name (conf/experiment/v53.yaml): choose "
                                   "another.\n")
    assert not (tmp_path / "into").exists()


@pytest.mark.parametrize("name", ["SDXL - LoRA kudou-reira dadaptadam v1.0.json"])
def test_gui_warmup_without_max_train_steps_uses_the_field_default(tmp_path, name):
    imported, _ = import_sources([preset_file(tmp_path, name)])
    assert imported.values["optimizer.warmup_steps"] == 80  # 5% of the field's 1600
    assert imported.values["network.network_train_unet_only"] is True  # additional_parameters


def safetensors_with(path: Path, meta: dict[str, str]) -> Path:
    header = json.dumps({"__metadata__": meta}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")  # no images: no buckets
def test_a_lora_written_by_lora_sweep_gives_back_its_settings(tmp_path):
    import torch

    from lora_sweep.data.subsets import DatasetSpec
    from lora_sweep.training.metadata import kohya_metadata
    from lora_sweep.training.optim import build_optimizer

    cfg = compose_config("precision=bf16", "optimizer=prodigy", "noise=offset", "loss=[huber_snr,min_snr]",
                         "network.rank=16", "network.alpha=8", "train.max_steps=300", "train.batch_size=2",
                         "data.resolution=64", "optimizer.args.weight_decay=0.01")
    spec = DatasetSpec("data.dir", (64, 64), 2, True, bucket_reso_steps=32, bucket_no_upscale=False,
                       min_bucket_reso=None, max_bucket_reso=None, subsets=())
    optimizer = build_optimizer(cfg.optimizer.name, [{"params": [torch.nn.Parameter(torch.zeros(2))]}],
                                lr=cfg.train.lr, args=dict(cfg.optimizer.args))
    meta = kohya_metadata(cfg, SimpleNamespace(specs=[spec], trained=[]), optimizer, steps=300, epoch=1)
    imported, _ = import_sources([safetensors_with(tmp_path / "lora.safetensors", meta)])
    assert imported.problems == []
    assert imported.groups == {"model": "sdxl", "precision": "bf16", "optimizer": "prodigy", "noise": "offset",
                               "loss": ["huber_snr", "min_snr"], "data": "folder"}
    values = imported.values
    assert (values["network.rank"], values["network.alpha"], values["train.max_steps"]) == (16, 8.0, 300)
    assert (values["train.lr"], values["train.batch_size"], values["noise.offset"]) == (1.0, 2, 0.0357)
    assert (values["loss.type"], values["loss.min_snr_gamma"], values["data.resolution"]) == ("huber", 5.0, "64,64")
    assert values["optimizer.optimizer_args"] == ["weight_decay=0.01"]
    assert values["data.caption_extension"] == ".txt"  # lora-sweep's own lora_sweep_caption_extension key
    table = kinds(imported)
    assert set(table["missing"]) == {"pretrained_model_name_or_path", "train_data_dir"}
    assert {"lr_scheduler_num_cycles", "xformers", "save_every_n_steps"} <= set(table["not recorded"])
    assert "full_bf16" not in table["not recorded"]  # lora_sweep_full_bf16 records it


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")  # no images: no buckets
def test_a_lora_written_by_lora_sweep_loses_exactly_what_its_metadata_cannot_hold(tmp_path):
    import torch

    from lora_sweep.data.buckets import bucket_settings
    from lora_sweep.data.subsets import DatasetSpec
    from lora_sweep.kohya.export import kohya_args
    from lora_sweep.kohya.metadata import NOT_IN_LORA_METADATA
    from lora_sweep.training.metadata import kohya_metadata
    from lora_sweep.training.optim import build_optimizer

    (tmp_path / "sdxl.safetensors").write_bytes(b"a stand-in: the metadata hashes it")
    (tmp_path / "prompts.txt").write_text("a dog\n")
    given = [f"model.path={tmp_path}/sdxl.safetensors", "data=folder", f"data.dir={tmp_path}/train"]
    cfg = compose_config(  # every flag of NOT_IN_LORA_METADATA away from its default, and the lora_sweep_* ones
        "model=sdxl", *given, "optimizer.scheduler=cosine_with_restarts", "optimizer.lr_scheduler_num_cycles=3",
        "optimizer.lr_scheduler_power=2.0", "+optimizer.lr_scheduler_args.lr_end=0.5",
        "network.train_text_encoder=true", "network.network_train_text_encoder_only=true",
        "network.dim_from_weights=true", f"network.network_weights={tmp_path}/start.safetensors",
        "data.max_data_loader_n_workers=2",
        "train.save_precision=fp16", "train.xformers=true", "train.sdpa=true", "train.mem_eff_attn=true",
        "train.torch_compile=true", "train.dynamo_backend=eager", "data.caption_separator=';'",
        "data.token_warmup_min=2", "data.token_warmup_step=5", "data.enable_wildcard=true",
        "data.keep_tokens_separator='|||'", "data.secondary_separator=';;;'", "data.caption_prefix=pre",
        "data.caption_suffix=suf", "data.bucket_reso_steps=32", "train.save_every=100", "train.save_every_epochs=2",
        "train.save_last_n_epochs=3", "train.save_last_n_steps=200", f"sampling.prompt_file={tmp_path}/prompts.txt",
        "sampling.every=50", "sampling.sampler=euler_a", "precision=bf16", "precision.full_bf16=true",
        "model.v_prediction=true", "loss.v_pred_like_loss=0.2", "data.caption_extension=.cap")
    buckets = bucket_settings(cfg.data)
    spec = DatasetSpec("data.dir", buckets["resolution"], 1, True, bucket_reso_steps=32, bucket_no_upscale=False,
                       min_bucket_reso=buckets["min_reso"], max_bucket_reso=buckets["max_reso"], subsets=())
    optimizer = build_optimizer(cfg.optimizer.name, [{"params": [torch.nn.Parameter(torch.zeros(2))]}],
                                lr=cfg.train.lr, args=dict(cfg.optimizer.args))
    meta = kohya_metadata(cfg, SimpleNamespace(specs=[spec], trained=[]), optimizer, steps=300, epoch=1)
    lora = safetensors_with(tmp_path / "lora.safetensors", {k: str(v) for k, v in meta.items()})
    assert run_import([lora], "back", tmp_path / "conf", False)[0] == 0
    back = compose_config(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=user/back", *given)
    before, after = kohya_args(cfg), kohya_args(back)
    assert {flag for flag in before.keys() | after.keys()
            if before.get(flag) != after.get(flag)} == set(NOT_IN_LORA_METADATA)


def test_a_v087_loras_metadata_maps_its_optimizer_network_args_and_timesteps(tmp_path):
    meta = {"ss_network_dim": "16", "ss_network_alpha": "8.0", "ss_learning_rate": "0.0001",
            "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1,betas=(0.9, 0.99))",
            "ss_mixed_precision": "fp16", "ss_network_args": '{"conv_dim": "8", "conv_alpha": "4"}',
            "ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
            "ss_dataset_dirs": '{"10_sks dog": {"n_repeats": 10, "img_count": 12}}', "ss_seed": "1234",
            "modelspec.timestep_range": "100,900", "ss_resolution": "(1024, 1024)"}
    imported, _ = import_sources([safetensors_with(tmp_path / "v087.safetensors", meta)])
    assert imported.groups["optimizer"] == "adamw8bit" and imported.groups["precision"] == "fp16"
    assert imported.values["optimizer.optimizer_args"] == ["weight_decay=0.1", "betas=(0.9,0.99)"]
    assert imported.values["network.network_args"] == ["conv_dim=8", "conv_alpha=4"]
    assert (imported.values["noise.min_timestep"], imported.values["noise.max_timestep"]) == (100, 900)
    missing = {r.kohya: r.detail for r in imported.rows if r.kind == "missing"}
    assert missing == {"pretrained_model_name_or_path": "model.path: the LoRA records only the name "
                                                        "'sd_xl_base_1.0.safetensors'",
                       "train_data_dir": "data.dir: the LoRA records only the folder names '10_sks dog' (12 images "
                                         "x 10)",
                       "fp8_base": "precision.name: the LoRA does not record --fp8_base: precision=fp8 if it loaded "
                                   "the model in fp8, else precision=fp16"}
    sd15 = safetensors_with(tmp_path / "sd15.safetensors", {**meta, "ss_base_model_version": "sd_v1"})
    assert import_sources([sd15])[0].problems == [f"{sd15}: ss_base_model_version: 'sd_v1': lora-sweep trains SDXL "
                                                  f"LoRAs."]


def test_a_lora_imported_without_data_makes_its_model_and_folder_required_values(tmp_path):
    """The tester's case: without --data, data.dir is `???` under data=folder (not the bundled photos), model.path
    `???` under model=sdxl, the import says so, and the run's checks refuse both until they are set."""
    from lora_sweep.checks.validate import config_problems

    meta = {"ss_network_dim": "8", "ss_sd_model_name": "sd_xl_base_1.0.safetensors", "ss_resolution": "(64, 64)",
            "ss_dataset_dirs": '{"3_subject": {"n_repeats": 3, "img_count": 3}}'}
    status, out, err = run_import([safetensors_with(tmp_path / "mylora.safetensors", meta)], "t", tmp_path / "conf",
                                  False)
    assert (status, err) == (0, "")
    assert out.splitlines()[-1] == (
        "2 required value(s) the sources cannot give: model.path, data.dir. model.path, data.dir: ??? in the files, "
        "so the run refuses to start until each is set on sweep.py's command line (a LoRA's image folders: import it "
        "again with --data DIR, the folder holding them).")
    assert required_text(["datasets[0].subsets[0].image_dir", "train.max_steps"]).endswith(
        "train.max_steps: lora-sweep's default applies unless set on sweep.py's command line.")
    assert "dir: ???  # required value (train_data_dir): the LoRA records only the folder names '3_subject' (3 " \
           "images x 3)" in (tmp_path / "conf" / "data" / "user" / "t.yaml").read_text(encoding="utf-8")
    cfg = compose_config("model=user/t", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=user/t")
    assert (cfg.data.name, cfg.data.dir, cfg.model.name, cfg.model.path) == ("folder", None, "sdxl", None)
    problems = config_problems(cfg)
    assert problems[0].startswith("model.path is not set;")
    assert problems[1].startswith("data.dir: data=folder trains on your own dataset, and data.dir is not set.")
    assert problems[1].endswith("An experiment imported from a LoRA gets it from `python -m lora_sweep import LORA "
                                "--data DIR`, DIR holding the LoRA's image folders.")


def test_a_dataset_config_source_passes_through_as_data_dataset_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its image_dirs are relative to the working folder
    toml = write_kohya_dataset(tmp_path)
    command = tmp_path / "cmd.sh"
    command.write_text("accelerate launch sdxl_train_network.py --pretrained_model_name_or_path /m/sdxl.safetensors "
                       "--train_data_dir /ignored --network_dim 4", encoding="utf-8")
    imported, sources = import_sources([command, toml])
    assert imported.problems == [] and sources[1].args == {"dataset_config": str(toml.resolve())}
    assert imported.values["data.dataset_config"] == str(toml.resolve())
    assert imported.why["data.dataset_config"] == "kohya_dataset.toml: its path, as --dataset_config"
    assert "missing" not in kinds(imported)
    assert "data.dir" not in imported.values  # a dataset config with data.dir is refused at run time
    assert kinds(imported)["ignored"]["train_data_dir"] == "/ignored"
    gui = tmp_path / "g.json"  # a saved GUI config always holds train_data_dir
    gui.write_text(json.dumps({"train_data_dir": "/nowhere", "reg_data_dir": "/reg"}), encoding="utf-8")
    imported, _ = import_sources([gui, toml])
    assert imported.problems == [] and "data.dir" not in imported.values and "data.reg_dir" not in imported.values
    assert {k: kinds(imported)["ignored"][k] for k in ("train_data_dir", "reg_data_dir")} == {
        "train_data_dir": "/nowhere", "reg_data_dir": "/reg"}
    monkeypatch.chdir(ROOT)  # where its relative image_dirs are not
    assert import_sources([toml])[0].problems[2] == (
        f"{toml}: datasets[0].subsets[2].image_dir = 'reg/girl': the folder does not exist here (read from the "
        f"working folder, {ROOT}).")


def test_gui_sample_prompts_text_is_written_beside_the_experiment_as_its_prompt_file(tmp_path):
    gui = tmp_path / "gui.json"
    gui.write_text(json.dumps({"LoRA_type": "Standard", "sample_prompts": "a dog --w 1024 --h 1024\na cat",
                               "max_train_steps": 10}), encoding="utf-8")
    status, out, err = run_import([gui], "mine", tmp_path, False)
    assert (status, err) == (0, "")
    prompts = tmp_path / "experiment" / "user" / "mine.prompts.txt"
    assert prompts.read_text(encoding="utf-8") == "a dog --w 1024 --h 1024\na cat\n"
    line = next(line for line in prompts.with_name("mine.yaml").read_text(encoding="utf-8").splitlines()
                if "prompt_file" in line)
    assert line == (f'  prompt_file: "{prompts.resolve()}"  # gui.json: sample_prompts = \'a dog --w 1024 --h '
                    f'1024\\na cat\' (its text, written to mine.prompts.txt)')
    assert "sample_prompts" not in {r.kohya for r in import_sources([gui], tmp_path / "x.yaml")[0].rows
                                    if r.kind == "missing"}


def test_a_loras_tensor_names_tell_whether_it_trained_the_text_encoders(tmp_path):
    def lora(name: str, tensors: list[str], **meta: str) -> Path:
        header = {"__metadata__": {"ss_network_dim": "4", **meta}}
        header.update({t: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for t in tensors})
        data = json.dumps(header).encode()
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(data)) + data + bytes(4))
        return path

    unet = lora("unet.safetensors", ["lora_unet_a.lora_down.weight"])
    both = lora("both.safetensors", ["lora_unet_a.lora_down.weight", "lora_te1_b.lora_down.weight"])
    text = lora("text.safetensors", ["lora_te2_b.lora_down.weight"])
    said = lora("said.safetensors", ["lora_unet_a.lora_down.weight"], lora_sweep_train_unet_only="False")
    assert read_lora(unet).args["network_train_unet_only"] is True
    assert read_lora(unet).origin["network_train_unet_only"] == "its tensors: lora_unet_* only"
    assert read_lora(text).args["network_train_text_encoder_only"] is True
    for path in (both, said):
        args = read_lora(path).args
        assert args.get("network_train_unet_only", False) is False and "network_train_text_encoder_only" not in args


def test_a_problem_names_the_line_of_its_key(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[training_arguments]\nmax_train_steps = 10\noptimizer_args = "weight_decay=0.1"\n',
                    encoding="utf-8")
    gui = tmp_path / "bad.json"
    gui.write_text('{\n  "LoRA_type": "Standard",\n  "network_dim": "eight"\n}\n', encoding="utf-8")
    status, out, err = run_import([toml, gui], "bad", tmp_path, False)
    assert (status, out) == (2, "") and not (tmp_path / "experiment").exists()
    assert err.split("\n\n") == [
        f"{toml} line 3: optimizer_args: 'weight_decay=0.1': v0.8.7 reads a TOML string here as one item per "
        f"character; write a list of 'key=value' strings.",
        f"{gui} line 3: network_dim = 'eight': 'eight' is not an integer (v0.8.7's --network_dim takes int).\n"]


@pytest.mark.slow  # ~24 s of CPU: sweep.py's imports (torch, diffusers, MLflow) and the two jobs
def test_a_sweep_over_an_imported_experiment_gives_each_run_its_own_noise_group(tmp_path):
    """`python sweep.py -m experiment=user/NAME noise=none,multires` over an imported GUI config: both runs finish
    with the imported values, and each run's noise params are its group's alone (the imported noise.offset=0.05
    lives in noise/user/NAME.yaml, which the command line's noise choice replaces). Hydra's basic launcher runs the
    two 2-step tiny jobs in sweep.py's own process, one after the other, on a one-image folder."""
    import subprocess
    import sys

    from conftest import new_store, write_image
    from mlflow.tracking import MlflowClient

    assert run_import([DATA / "kohya_import" / "gui_sweep.json"], "gui", tmp_path / "conf", False)[0] == 0
    write_image(tmp_path / "train" / "1_dog" / "a.png", caption="a dog")
    uri = new_store(tmp_path / "mlflow.db")
    command = [sys.executable, str(ROOT / "sweep.py"), "-m", "hydra/launcher=basic",
               f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=user/gui", "noise=none,multires",
               "model=tiny", "data=folder", f"data.dir={tmp_path / 'train'}", "sampling.prompts=[]",
               "validation.fit_images=0", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    out = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lora-sweep").experiment_id],
                              "tags.`lora_sweep.role` = 'job'")
    params = {run.data.tags["variant"]: run.data.params for run in runs if run.info.status == "FINISHED"}
    assert sorted(params) == ["noise=multires", "noise=none"]
    noise = {variant: (p["noise.offset"], p["noise.multires_iterations"]) for variant, p in params.items()}
    assert noise == {"noise=none": ("0.0", "0"), "noise=multires": ("0.0", "6")}
    imported = ("train.lr", "train.seed", "network.rank", "network.alpha", "loss.min_snr_gamma", "data.resolution",
                "network.train_text_encoder", "optimizer.name")
    for p in params.values():
        assert [p[key] for key in imported] == ["0.0002", "7", "8", "4.0", "5.0", "64,64", "True", "adamw"]


def test_data_loader_workers_set_by_the_source_are_carried(tmp_path):
    """v0.8.7's image order depends on its workers: the import keeps the value (data/order.py)."""
    command = tmp_path / "cmd.sh"
    command.write_text("accelerate launch sdxl_train_network.py --max_data_loader_n_workers 4 --no_half_vae",
                       encoding="utf-8")
    imported, _ = import_sources([command])
    rows = {r.kohya: (r.kind, r.detail) for r in imported.rows if r.kohya in ("max_data_loader_n_workers",
                                                                             "no_half_vae")}
    assert rows["no_half_vae"] == ("ignored", "lora-sweep always encodes latents with the VAE in fp32")
    assert rows["max_data_loader_n_workers"][0] == "mapped"
    assert imported.values["data.max_data_loader_n_workers"] == 4


def test_gui_max_train_steps_0_is_the_guis_estimate_from_the_image_folders(tmp_path):
    from PIL import Image

    train = tmp_path / "img"
    for folder, names in {"10_dog": ["a.png", "b.PNG", "c.webp"], "5_cat": ["a.jpg", "b.jpeg"],
                          "misc": ["a.png"]}.items():  # "misc" has no repeats: the GUI skips it
        (train / folder).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (8, 8)).save(train / folder / name, format="WEBP" if name.endswith("webp") else None)
    (train / "5_cat" / "a.txt").write_text("a cat", encoding="utf-8")
    gui = {"LoRA_type": "Standard", "train_data_dir": str(train), "max_train_steps": "0", "epoch": 2,
           "train_batch_size": "3", "gradient_accumulation_steps": 1, "lr_warmup": 10}
    src = KohyaSource("gui.json")
    read_gui_fields(gui, src)
    assert (src.args["max_train_steps"], src.args["lr_warmup_steps"]) == (27, 3)  # ceil(40 / 3 x 2), round(2.7)
    assert src.origin["max_train_steps"] == (f"max_train_steps = '0': the GUI's estimate ceil(40 images x repeats in "
                                             f"{train} / 3 / 1 x 2 x 1)")
    src = KohyaSource("gui.json")
    read_gui_fields({**gui, "reg_data_dir": str(tmp_path)}, src)
    assert (src.args["max_train_steps"], src.args["lr_warmup_steps"]) == (54, 5)  # doubled; 5.4 rounds to 5
    src = KohyaSource("gui.json")
    read_gui_fields({**gui, "train_data_dir": ""}, src)
    assert "max_train_steps" not in src.args and src.missing == {
        "max_train_steps": "0: the GUI estimates it from the image folders of train_data_dir, which is empty "
                           "(ceil(images x repeats / batch / accumulation x epoch))",
        "lr_warmup_steps": "lr_warmup = 10% of the GUI's estimated max_train_steps"}


def test_a_loras_ss_datasets_is_rebuilt_as_data_datasets_asking_where_each_folder_is(tmp_path, monkeypatch):
    from kohya_dataset import write_kohya_dataset

    from lora_sweep.checks import preflight
    from lora_sweep.data.buckets import assign_with_settings, bucket_settings
    from lora_sweep.training.metadata import dataset_metadata

    monkeypatch.chdir(tmp_path)
    toml = write_kohya_dataset(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    cfg = compose_config("data=folder", "data.dir=null", f"data.dataset_config={toml}")
    specs, scans = preflight.training_scans(cfg, None)
    entries = [(item, assign_with_settings(item.size, bucket_settings(specs[item.dataset]))[0])
               for scan in scans for item in scan.items]
    meta = dataset_metadata(specs, entries, toml_mode=True, cfg=cfg)
    lora = safetensors_with(tmp_path / "ours.safetensors", {**meta, "ss_network_dim": "4"})
    train = tmp_path / "work" / "train"
    imported, _ = import_sources([lora], data=train)
    assert imported.problems == []
    separators = {"keep_tokens_separator": "|||", "secondary_separator": ";;;"}  # [general] in the TOML
    assert imported.values["data.datasets"] == [{
        "resolution": 64, "batch_size": 2, "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
        "subsets": [{"image_dir": str(train / "char"), "num_repeats": 10, "class_tokens": "sks girl",
                     "keep_tokens": 1, "shuffle_caption": True, **separators},
                    {"image_dir": str(train / "style"), "num_repeats": 5, "flip_aug": True,
                     "shuffle_caption": True, **separators},
                    {"image_dir": "???", "num_repeats": 1, "class_tokens": "girl", "is_reg": True, **separators}]}]
    assert imported.why["data.datasets"] == "ours.safetensors: ss_datasets, rebuilt"
    missing = {r.kohya: r.detail for r in imported.rows if r.kind == "missing"}
    assert missing == {"pretrained_model_name_or_path": "model.path: the SDXL model to train",
                       "datasets[0].subsets[2].image_dir": "datasets[0].subsets[2].image_dir: where is 'girl' (3 "
                                                           "images)? Give --data DIR, a folder holding a folder of "
                                                           "that name, or write its path in the experiment"}


def test_a_hand_built_v087_ss_datasets_header_is_rebuilt(tmp_path):
    subset = {"img_count": 12, "num_repeats": 10, "color_aug": False, "flip_aug": False, "random_crop": False,
              "shuffle_caption": True, "keep_tokens": 2, "keep_tokens_separator": "", "secondary_separator": None,
              "enable_wildcard": False, "caption_prefix": None, "caption_suffix": "best quality",
              "image_dir": "sks dog", "class_tokens": "sks dog", "is_reg": False}
    dataset = {"is_dreambooth": True, "batch_size_per_device": 4, "num_train_images": 120, "num_reg_images": 0,
               "resolution": [1024, 768], "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048,
               "tag_frequency": {"sks dog": {"sks dog": 12}}, "bucket_info": None, "subsets": [subset]}
    keys = json.loads((DATA / "kohya_v087_ss_keys.json").read_text(encoding="utf-8"))
    meta = {"ss_network_dim": "16", "ss_base_model_version": "sdxl_base_v1-0", "ss_datasets": json.dumps([dataset]),
            "ss_dataset_dirs": json.dumps({"sks dog": {"n_repeats": 10, "img_count": 12}}),
            "ss_tag_frequency": json.dumps(dataset["tag_frequency"])}
    assert set(meta) <= set(keys["always"]["keys"]) | set(keys["toml_mode"]["keys"])
    imported, sources = import_sources([safetensors_with(tmp_path / "v087.safetensors", meta)])
    assert imported.problems == [] and imported.values["train.batch_size"] == 4
    assert imported.values["data.datasets"] == [{
        "resolution": [1024, 768], "batch_size": 4, "enable_bucket": True, "min_bucket_reso": 256,
        "max_bucket_reso": 2048, "subsets": [{"image_dir": "???", "num_repeats": 10, "class_tokens": "sks dog",
                                              "keep_tokens": 2, "shuffle_caption": True,
                                              "caption_suffix": "best quality"}]}]
    assert "train_data_dir" not in sources[0].missing  # ss_dataset_dirs names the same folder
    assert "where is 'sks dog' (12 images)?" in sources[0].missing["datasets[0].subsets[0].image_dir"]


def test_data_finds_a_folder_mode_loras_image_folders(tmp_path):
    meta = {"ss_network_dim": "16", "ss_dataset_dirs": '{"10_sks dog": {"n_repeats": 10, "img_count": 12}}'}
    lora = safetensors_with(tmp_path / "v087.safetensors", meta)
    (tmp_path / "img" / "10_sks dog").mkdir(parents=True)
    src = import_sources([lora], data=tmp_path / "img")[1][0]
    assert src.args["train_data_dir"] == str(tmp_path / "img") and "train_data_dir" not in src.missing
    assert "train_data_dir" in import_sources([lora], data=tmp_path)[1][0].missing  # not there: still asked for


def test_onetrainers_ot_config_maps_what_has_a_setting_and_lists_the_rest(tmp_path):
    config = {"__version": 10, "model_type": "STABLE_DIFFUSION_XL_10_BASE", "base_model_name": "sdxl.safetensors",
              "learning_rate": 0.0003, "lora_rank": 16, "lora_alpha": 8.0, "batch_size": 2, "epochs": 10,
              "gradient_accumulation_steps": 1, "resolution": "1024", "train_dtype": "BFLOAT_16",
              "offset_noise_weight": 0.05, "perturbation_noise_weight": 0.0, "dropout_probability": 0.0,
              "loss_weight_fn": "MIN_SNR_GAMMA", "loss_weight_strength": 5.0, "clip_grad_norm": 1.0,
              "learning_rate_scheduler": "CONSTANT", "learning_rate_warmup_steps": 100.0,
              "learning_rate_cycles": 1.0, "generalized_offset_noise": False, "min_noising_strength": 0.0,
              "max_noising_strength": 1.0, "ema": "OFF", "layer_filter": "attn",
              "optimizer": {"optimizer": "ADAMW_8BIT", "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.99,
                            "eps": None},
              "unet": {"train": True, "learning_rate": None}, "text_encoder": {"train": False},
              "text_encoder_2": {"train": False}, "concepts": [{"path": "/data/dog", "name": "dog"}]}
    meta = {"ot_branch": "master", "ot_revision": "23df3832", "ot_config": json.dumps(config),
            "ss_base_model_version": "sdxl_", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    imported, sources = import_sources([safetensors_with(tmp_path / "ot.safetensors", meta)])
    assert imported.problems == []
    assert sources[0].args == {
        "learning_rate": 0.0003, "network_dim": 16, "network_alpha": 8.0, "train_batch_size": 2,
        "max_train_epochs": 10, "gradient_accumulation_steps": 1, "noise_offset": 0.05,
        "optimizer_type": "AdamW8bit", "optimizer_args": ["weight_decay=0.01", "betas=(0.9,0.99)"],
        "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 100, "mixed_precision": "bf16",
        "resolution": "1024,1024", "min_snr_gamma": 5.0, "max_grad_norm": 1.0, "network_train_unet_only": True}
    assert sources[0].origin["network_dim"] == "ot_config lora_rank = 16"
    assert imported.groups == {"model": "sdxl", "precision": "bf16", "optimizer": "adamw8bit", "noise": "offset",
                               "loss": ["l2", "min_snr"], "data": "folder"}
    assert sources[0].unsupported == {"ema": ("OFF", "OneTrainer's ema: no lora-sweep setting"),
                                      "layer_filter": ("attn", "OneTrainer's layer_filter: no lora-sweep setting")}
    missing = {r.kohya: r.detail for r in imported.rows if r.kind == "missing"}
    assert missing == {"pretrained_model_name_or_path": "model.path: OneTrainer records the name 'sdxl.safetensors'",
                       "train_data_dir": "data.dir: OneTrainer's concepts: '/data/dog'; lay them out as "
                                         "<repeats>_<name> folders"}
    sd15 = safetensors_with(tmp_path / "sd15.safetensors", {"ot_config": json.dumps(
        {**config, "model_type": "STABLE_DIFFUSION_15", "optimizer": {"optimizer": "ADAN"}})})
    assert import_sources([sd15])[0].problems == [f"{sd15}: ot_config: model_type 'STABLE_DIFFUSION_15': lora-sweep "
                                                  f"trains SDXL (STABLE_DIFFUSION_XL_10_BASE) LoRAs."]
    adan = safetensors_with(tmp_path / "adan.safetensors", {"ot_config": json.dumps(
        {**config, "optimizer": {"optimizer": "ADAN"}})})
    assert import_sources([adan])[0].problems == [
        f"{adan}: ot_config: optimizer 'ADAN': lora-sweep has no such optimizer; it has ADAMW, ADAMW_8BIT, PRODIGY, "
        f"ADAFACTOR, DADAPT_ADAM, LION_8BIT, PAGED_ADAMW_8BIT."]


def test_gui_kohya_locon_always_passes_its_conv_pair_conv_alpha_0_included():
    src = KohyaSource("g.json")  # v24.1.4 writes conv_dim="{conv_dim}" conv_alpha="{conv_alpha}" for Kohya LoCon
    read_gui_fields({"LoRA_type": "Kohya LoCon", "conv_dim": 8, "conv_alpha": 0}, src)
    assert src.args["network_args"] == ["conv_dim=8", "conv_alpha=0"]  # alpha 0: kohya's conv alpha = conv_dim


def test_learning_rate_beside_both_group_lrs_gets_a_row(tmp_path):
    toml = tmp_path / "lr.toml"
    toml.write_text('learning_rate = 1e-3\nunet_lr = 1e-4\ntext_encoder_lr = 5e-5\nlr_scheduler = "polynomial"\n',
                    encoding="utf-8")
    imported, _ = import_sources([toml])
    assert (imported.values["train.lr"], imported.values["train.text_encoder_lr"]) == (1e-4, 5e-5)
    assert kinds(imported)["not supported"]["learning_rate"] == 1e-3  # polynomial's start lr: lora-sweep's is 1e-4
    toml.write_text("unet_lr = 1e-4\ntext_encoder_lr = 5e-5\n", encoding="utf-8")
    assert kinds(import_sources([toml])[0])["ignored"]["learning_rate"] == 2e-6  # v0.8.7's, unused by constant


def test_color_aug_and_random_crop_are_not_supported_at_import(tmp_path):
    toml = tmp_path / "aug.toml"
    toml.write_text("color_aug = true\nrandom_crop = true\n", encoding="utf-8")
    imported, _ = import_sources([toml])
    assert kinds(imported)["not supported"] == {"color_aug": True, "random_crop": True}
    assert not {"data.color_aug", "data.random_crop"} & set(imported.values)


def test_keys_a_gui_config_lacks_get_the_guis_field_defaults(tmp_path):
    imported, _ = import_sources([preset_file(tmp_path, "locon-dadaptation-sdxl.json")])
    # enable_bucket true and no max_bucket_reso: v24.1.4 passes its field's 2048, not v0.8.7's 1024
    assert imported.values["data.max_bucket_reso"] == 2048
    assert imported.why["data.max_bucket_reso"] == "preset.json: kohya_ss GUI default: max_bucket_reso = 2048"


def test_flags_v087_leaves_none_get_a_row(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("network_dim = 4\n", encoding="utf-8")
    rows = {(r.kind, r.kohya): r.detail for r in import_sources([toml])[0].rows}
    assert rows[("missing", "resolution")] == "data.resolution: v0.8.7 requires --resolution"
    assert rows[("ignored", "save_every_n_steps")] == ("kohya default None: lora-sweep saves every 500 steps "
                                                       "(train.save_every); saving changes no trained number")
    assert rows[("ignored", "output_name")] == ("kohya default None names the file 'last': lora-sweep names it "
                                                "'lora' (train.output_name); a name changes no trained number")
    assert rows[("ignored", "seed")] == "v0.8.7 draws a random seed; lora-sweep's train.seed 42 applies"


def test_a_kohya_loras_fp8_base_is_a_required_value(tmp_path):
    meta = {"ss_mixed_precision": "bf16", "ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": "4"}
    imported, _ = import_sources([safetensors_with(tmp_path / "k.safetensors", meta)])
    missing = {r.kohya: r.detail for r in imported.rows if r.kind == "missing"}
    assert missing["fp8_base"] == ("precision.name: the LoRA does not record --fp8_base: precision=fp8_bf16 if it "
                                   "loaded the model in fp8, else precision=bf16")


def test_a_loras_ss_keys_that_are_no_v087_flag_get_rows(tmp_path):
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_mixed_precision": "fp16", "ss_fp8_base": "False",
            "ss_vae_name": "sdxl_vae.safetensors", "ss_huber_scale": "1.0"}
    table = kinds(import_sources([safetensors_with(tmp_path / "k.safetensors", meta)])[0])
    assert table["not supported"]["vae"] == "sdxl_vae.safetensors"  # --vae is refused
    assert table["not supported"]["huber_scale"] == "1.0"  # newer than v0.8.7


def test_data_loader_workers_left_unset_are_kohyas_8(tmp_path):
    command = tmp_path / "cmd.sh"
    command.write_text("accelerate launch sdxl_train_network.py --no_half_vae", encoding="utf-8")
    imported = import_sources([command])[0]
    assert imported.values["data.max_data_loader_n_workers"] == 8
    gui = tmp_path / "g.json"  # the GUI passes its field's 0
    gui.write_text("{}", encoding="utf-8")
    assert import_sources([gui])[0].values["data.max_data_loader_n_workers"] == 0


def test_a_toml_resolution_int_and_a_gui_lr_warmup_fraction_are_problems(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("resolution = 1024\n", encoding="utf-8")
    assert import_sources([toml])[0].problems == [  # v0.8.7 calls args.resolution.split
        f"{toml} line 1: resolution: 1024: v0.8.7 converts no TOML value and --resolution takes a string."]
    src = KohyaSource("g.json")
    read_gui_fields({"lr_warmup": "10.5", "max_train_steps": 100}, src)
    assert src.problems == ["g.json: lr_warmup = '10.5': kohya_ss v24.1.4 trains it as 0 (int() of the text fails); "
                            "write a whole number."]
    assert "lr_warmup_steps" not in src.args


def test_a_refused_lora_type_is_one_problem_among_the_others(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"LoRA_type": "LyCORIS/LoHa", "optimizer": "AdamWW", "train_data_dir": "/nowhere",
                               "network_dim": "abc", "lr_scheduler": "cosinee"}), encoding="utf-8")
    problems = import_sources([bad])[0].problems
    assert [p.split(": ")[1].split(" = ")[0] for p in problems] == [
        "LoRA_type", "network_dim", "optimizer", "lr_scheduler", "train_data_dir"]


def test_a_dataset_config_sources_values_are_type_checked(tmp_path):
    (tmp_path / "img").mkdir()
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\nresolution = "sixty"\n\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n'
                    f'num_repeats = "ten"\n', encoding="utf-8")
    problems = import_sources([toml])[0].problems
    assert len(problems) == 2
    assert "resolution: must be" in problems[0] and "'sixty'" in problems[0]
    assert "num_repeats: must be an int, got 'ten'" in problems[1]


def test_flags_newer_than_v087_are_not_supported_and_unknown_ones_stay_unknown(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("huber_scale = 1.0\nvalidation_split = 0.1\nno_such_flag = 1\n", encoding="utf-8")
    rows = {(r.kind, r.kohya): r.detail for r in import_sources([toml])[0].rows}
    drift = "newer than v0.8.7 (version drift: it would change the numbers)"
    assert rows[("not supported", "huber_scale")] == rows[("not supported", "validation_split")] == drift
    assert ("unknown", "no_such_flag") in rows
