"""The pre-flight: bad input answered before any model loads, every problem at once, exit 2, nothing written.

The app runs in this process through its real Hydra entry (`sweep.main`, the real conf/ and callbacks), with the
job's entry point and the model loader replaced by ones that fail the test: a pre-flight that lets a bad input
through, or loads a model, fails here. One test runs the real command in a subprocess for its exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose_config, new_store, write_image
from PIL import Image

from lora_sweep.checks.preflight import check_job
from lora_sweep.paths import make_paths_absolute

CP1252 = bytes.fromhex("6172746973749273")  # cp1252 "artist's": not UTF-8 at byte 6


image = write_image  # conftest: a plain PNG with its caption


@pytest.fixture(autouse=True)
def restore_logging():
    """Hydra configures the root logger (console, and a job's log file) when the app runs in this process."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def app(tmp_path, monkeypatch, capfd):
    """`run(*argv)` -> (exit status, output) of `python sweep.py *argv` started in tmp_path/work; asserts that no
    job started, no model loaded and nothing was written (work folder, cache, MLflow store all untouched)."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LORA_SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")

    def never(what):
        def fail(*args, **kwargs):
            pytest.fail(f"{what} although the pre-flight should have stopped the command")
        return fail

    monkeypatch.setattr("lora_sweep.job.run.run_job", never("a job started"))
    monkeypatch.setattr("lora_sweep.model.loading.load_sdxl", never("the model loaded"))

    def run(*argv: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["sweep.py", *argv])
        code = 0
        try:
            runpy.run_path(str(ROOT / "sweep.py"), run_name="__main__")  # as `python sweep.py`, in this process
        except SystemExit as exit_:
            code = exit_.code
        finally:
            GlobalHydra.instance().clear()
        captured = capfd.readouterr()
        assert list(work.iterdir()) == [], "the pre-flight wrote into the working folder"
        assert not (tmp_path / "cache").exists() and not (tmp_path / "store").exists()
        return code, captured.out + captured.err

    return run


def test_every_problem_at_once_exit_2_nothing_written(tmp_path, app):
    """Several bad inputs in one command: each named with its setting, file and line."""
    ds = tmp_path / "ds"
    image(ds / "1_subj" / "img1.png", caption=CP1252)
    image(ds / "1_subj" / "img2.png", caption=CP1252)
    image(ds / "1_subj" / "empty.png", caption=b"")
    for name, size in (("tiny", (20, 20)), ("strip", (100, 20)), ("line", (40000, 30))):
        image(ds / "1_subj" / f"{name}.png", size=size, caption="ok")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\n\na cat\na tree --seed 7\n", encoding="utf-8")
    code, out = app("data=folder", f"data.dir={ds}", "data.bucket_no_upscale=true", "data.bucket_reso_steps=32",
                    "data.resolution=128", f"sampling.prompt_file={prompts}", "optimizer=prodigy",
                    "network.train_text_encoder=true", "train.text_encoder_lr=0.5")
    assert code == 2 and "Traceback" not in out
    assert "Pre-flight found 8 problems; nothing was started or written" in out
    assert f"data.dir: caption file '{ds / '1_subj' / 'img1.txt'}' is not valid UTF-8" in out
    assert f"'{ds / '1_subj' / 'img2.txt'}' is not valid UTF-8 (invalid start byte at byte 6)" in out
    assert f"data.dir: caption file '{ds / '1_subj' / 'empty.txt'}' is empty" in out
    for name, size in (("tiny", "20x20"), ("strip", "100x20"), ("line", "40000x30")):
        assert f"data.dir: image '{ds / '1_subj' / name}.png' ({size}): an image of {size} gets an empty bucket" in out
    assert f"sampling.prompt_file '{prompts}', line 4: unknown option '--seed'" in out
    assert "optimizer=prodigy: it shares one adapted step size" in out and "unet_lr" not in out


def test_a_dataset_of_only_zero_repeat_folders_is_refused_up_front(tmp_path, app):
    image(tmp_path / "ds" / "0_beta" / "a.png", caption="beta")
    code, out = app("data=folder", f"data.dir={tmp_path / 'ds'}")
    assert code == 2 and "ZeroDivisionError" not in out
    assert "data.dir: no readable images to train on" in out and "folders with 0 repeats are not used" in out


def test_a_sweep_checks_every_job_before_any_starts_and_groups_the_problems(tmp_path, app):
    image(tmp_path / "ds" / "1_subj" / "img1.png", caption=CP1252)
    code, out = app("-m", "optimizer=adamw,prodigy", "noise=none,offset", "data=folder",
                    f"data.dir={tmp_path / 'ds'}", "network.train_text_encoder=true", "train.text_encoder_lr=0.5")
    assert code == 2
    assert "Pre-flight found 2 problems in a sweep of 4 jobs" in out
    caption_line = next(line for line in out.splitlines() if "img1.txt" in line)
    assert "[job" not in caption_line  # all four jobs: said once, without a job list
    prodigy_line = next(line for line in out.splitlines() if "optimizer=prodigy: it shares" in line)
    assert prodigy_line.endswith("[jobs #2 optimizer=prodigy noise=none, #3 optimizer=prodigy noise=offset]")
    assert out.count("img1.txt") == 1


@pytest.mark.parametrize("launcher", ["ray", "submitit_slurm"])
def test_other_launchers_get_the_same_pre_flight_before_they_start(tmp_path, app, launcher):
    image(tmp_path / "ds" / "1_subj" / "img1.png", caption=b"")
    code, out = app("-m", f"hydra/launcher={launcher}", "noise=none,offset", "data=folder",
                    f"data.dir={tmp_path / 'ds'}")
    assert code == 2 and "img1.txt' is empty" in out and "sweep of 2 jobs" in out


def test_a_sweep_whose_jobs_log_to_different_experiments_is_refused(app):
    """One parent run nests its jobs, and MLflow nests runs only within one experiment of one store."""
    code, out = app("-m", "tracking.experiment=mine,yours")
    assert code == 2
    assert ("tracking.experiment / tracking.uri: the sweep's jobs log to different places "
            "(#0 -> experiment 'mine'") in out
    assert "#1 -> experiment 'yours'" in out and "set tracking.experiment=NAME" in out


def test_a_compose_error_shared_by_jobs_is_said_once_with_the_jobs_it_hits(tmp_path, app):
    """With hydra.searchpath, group options are left to Hydra's composition of each job (command_line cannot list
    them): the error is one line naming its jobs, not one line per job with its label twice."""
    code, out = app("-m", f"hydra.searchpath=[file://{tmp_path}]", "noise=none,offset", "loss=l2,hubr")
    assert code == 2
    (line,) = [line for line in out.splitlines() if "loss/hubr" in line]
    assert line.startswith("- the job cannot be composed: In 'config': Could not find 'loss/hubr'")
    assert line.endswith("[jobs #1 noise=none loss=hubr, #3 noise=offset loss=hubr]")


def test_a_bad_sweep_override_is_a_pre_flight_problem(tmp_path, app):
    code, out = app("-m", "noise=none,offset", "loss.type=l2,l3")
    assert code == 2 and "loss.type" in out and "'l3'" in out and "[jobs #1 noise=none loss.type=l3, #3" in out


def test_zero_means_off_and_relative_paths_mean_the_launch_folder(tmp_path, monkeypatch):
    """Cases 9 and 10: noise.adaptive_scale=0 (and loss.min_snr_gamma=0) are off, not errors; a relative data.dir
    and prompt file resolve against where the command started, whatever the job's working folder is."""
    image(tmp_path / "ds" / "2_cat" / "a.png", caption="a cat")
    (tmp_path / "prompts.txt").write_text("a cat\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cfg = compose_config("noise=none", "noise.adaptive_scale=0", "loss.min_snr_gamma=0", "data=folder",
                         "data.dir=./ds", "sampling.prompt_file=prompts.txt", "train.state_dir='~/states'")
    changed = make_paths_absolute(cfg)
    assert cfg.data.dir == str(tmp_path / "ds") and cfg.sampling.prompt_file == str(tmp_path / "prompts.txt")
    assert changed["train.state_dir"] == os.path.expanduser("~/states")
    monkeypatch.chdir(tmp_path / "ds")  # as hydra.job.chdir=true moves a job
    report = check_job(cfg)
    assert report.problems == [] and report.fallbacks == []


def test_a_resume_state_beyond_max_steps_is_found_before_the_model_loads(tmp_path):
    import torch

    state = tmp_path / "state-step00000050.pt"
    torch.save({"format": 1, "meta": {"config_hash": "x", "run_id": "r", "step": 50}}, state)
    report = check_job(compose_config(f"train.resume={state}", "train.max_steps=20"))
    assert report.problems == [f"train.resume: '{state}' is at step 50, beyond train.max_steps=20: nothing is left "
                               "to train; raise train.max_steps to continue it, or set train.resume=never to start "
                               "over."]


def test_resuming_a_state_under_settings_it_cannot_follow_exits_2_naming_them(tmp_path, app):
    """A state of rank 4 resumed with network.rank=8 and optimizer=prodigy: refused before anything is written."""
    import random

    import torch

    from lora_sweep.config import config_hash, hashed_settings
    from lora_sweep.training import checkpoint

    cfg = compose_config("model=tiny")  # sweep.py's default model, which the app runs
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    state = checkpoint.save_state(
        tmp_path / "states", lora=dict(layer.named_parameters()), optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), scaler=torch.amp.GradScaler(
            "cpu", enabled=False), position=checkpoint.Position(step=3), rng=checkpoint.capture_rng(random.Random(0)),
        config_hash=config_hash(cfg), run_id="r", keep=1, params=hashed_settings(cfg))
    code, out = app(f"train.resume={state}", "network.rank=8", "optimizer=prodigy")
    assert code == 2 and "Traceback" not in out
    assert (f"train.resume: the state '{state}' cannot continue under this config: it changes settings a state "
            "cannot follow: network.rank 4 -> 8 (the state's LoRA tensors have the old rank's shapes); optimizer.name "
            "adamw -> prodigy (the state's optimizer moments belong to another optimizer).") in out


def test_folders_that_cannot_be_written_are_named_without_creating_anything(tmp_path):
    (tmp_path / "file").write_text("")
    cfg = compose_config(f"train.output_dir={tmp_path / 'file' / 'out'}", f"train.state_dir={tmp_path / 'new' / 's'}")
    problems = check_job(cfg).problems
    assert problems == [f"train.output_dir: cannot create the folder '{tmp_path / 'file' / 'out'}': "
                        f"'{tmp_path / 'file'}' is a file, not a folder."]
    assert not (tmp_path / "new").exists()


def test_the_real_command_exits_2_without_a_traceback_and_writes_nothing(tmp_path):
    image(tmp_path / "ds" / "1_subj" / "img1.png", caption=CP1252)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", LORA_SWEEP_CACHE_DIR=str(work / "c"))
    out = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "-m", "noise=none,offset", "data=folder",
                          f"data.dir={tmp_path / 'ds'}", "hydra.job.chdir=true"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "img1.txt' is not valid UTF-8" in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert list(work.iterdir()) == []


def test_an_override_hydras_grammar_cannot_read_is_one_paragraph_exit_2(tmp_path):
    """The real command: an unquoted non-ASCII value (a lexer error) and a cut-off list (a parser error)."""
    out = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "-m", "data.dir=/data/訓練", "train.max_steps=[1,"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines() == [
        "Pre-flight found 2 problems; nothing was started or written. Fix them and run again:",
        "- Cannot read the override 'data.dir=/data/訓練': '訓' (character 16) cannot appear in an unquoted value, "
        "which holds only ASCII letters, digits, spaces and / \\ - + . _ : $ % * @ ? |. Quote the value, and the "
        "whole override for the shell: 'data.dir=\"/data/訓練\"'. Hydra's override grammar: "
        "https://hydra.cc/docs/advanced/override_grammar/basic/",
        "- Cannot read the override 'train.max_steps=[1,': no viable alternative at input '[1,'. Write key=value, a "
        "list as [a,b], a sweep as a,b, and quote a value with other characters: 'key=\"value\"'. Hydra's override "
        "grammar: https://hydra.cc/docs/advanced/override_grammar/basic/"]
    assert list(tmp_path.iterdir()) == []


def test_the_quoted_value_that_message_suggests_composes():
    assert compose_config('data.dir="/data/訓練"').data.dir == "/data/訓練"
    assert list(compose_config('sampling.prompts=["a cat","訓練"]').sampling.prompts) == ["a cat", "訓練"]


def test_sixteen_bit_scan_is_header_only_and_the_caption_policy_is_warned(tmp_path):
    """Warnings (fallbacks) never stop a run: missing captions with another extension beside them, a blank
    first line, a nested folder, an animated file, a single-dash prompt option."""
    ds = tmp_path / "ds"
    image(ds / "3_subj" / "a.png", caption="tags in a .txt file")
    image(ds / "3_subj" / "b.png", caption="\n\nmytoken, red hat")
    image(ds / "3_subj" / "nested" / "c.png", caption="c")
    gray = np.random.default_rng(0).integers(0, 65536, (96, 128)).astype(np.uint16)
    Image.fromarray(gray).save(ds / "3_subj" / "gray16.png")
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(ds / "3_subj" / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "p.txt").write_text("a dog -w 640 -h 1280\n", encoding="utf-8")
    cfg = compose_config("data=folder", f"data.dir={ds}", "data.caption_extension=.caption",
                         f"sampling.prompt_file={tmp_path / 'p.txt'}")
    report = check_job(cfg)
    assert report.problems == []
    lines = [f.line() for f in report.fallbacks]
    assert any(line.startswith("data.dir: 4 images without a .caption caption file") and "2 with a .txt file" in line
               for line in lines)
    assert any("inside subfolders" in line for line in lines) and any("first frame" in line for line in lines)
    assert any(line.startswith("sampling.prompt_file: 1 prompt line with") for line in lines)
    assert report.warnings_text().count("\n    ") >= 7  # every path, one per line


def test_prompt_file_sizes_and_steps_are_refused_or_warned_before_the_model_loads(tmp_path):
    """Negative values refused (kohya cannot use them), kohya's rounding and clamping said with
    the values used, a size above 4096 px warned; each names the file and line."""
    path = tmp_path / "p.txt"
    path.write_text("a car --h -64 --s 0\na car --w 65 --h 10\na car --w 100000 --h 100000\n", encoding="utf-8")
    report = check_job(compose_config(f"sampling.prompt_file={path}"))
    assert [p.split(";")[0] for p in report.problems] == [
        f"sampling.prompt_file '{path}', line 1: option '--h -64' in 'a car --h -64 --s 0' is negative"]
    lines = [f.line() for f in report.fallbacks]
    assert (f"sampling.prompt_file: 1 prompt line with --w/--h/--s values changed the way kohya does (sizes down to a "
            f"multiple of 8, at least 64; steps 1 to 1000): sampled with the values used: '{path}, line 2 (--w 65 "
            "used as 64, --h 10 used as 64)'. Write the values used to silence this.") in lines
    assert any(line.startswith("sampling.prompt_file: 1 prompt line with a sample side above 4096 px") and
               f"'{path}, line 3 (100000x100000)'" in line for line in lines)


@pytest.mark.slow
def test_a_chdir_job_with_relative_paths_trains_and_logs_its_warnings(tmp_path, monkeypatch):
    """End to end: hydra.job.chdir=true with data.dir=./ds and a relative prompt file trains; params and
    the config hash hold absolute paths; the default MLflow store is in the launch folder, not the job's; the
    warnings are printed once and logged on the run (data.warnings + data/warnings.txt)."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra
    from mlflow.tracking import MlflowClient

    image(tmp_path / "ds" / "2_cat" / "a.png", caption="a cat")
    image(tmp_path / "ds" / "2_cat" / "b.png")  # no caption: the class token, with a warning
    (tmp_path / "prompts.txt").write_text("a cat -w 64\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", ["sweep.py", "hydra.job.chdir=true", "data=folder", "data.dir=./ds",
                                      "sampling.prompt_file=prompts.txt", "sampling.steps=1", "train.max_steps=1",
                                      "noise=none", "noise.adaptive_scale=0", "hydra.run.dir=outputs/run"])
    try:
        runpy.run_path(str(ROOT / "sweep.py"), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
    assert Path.cwd() == tmp_path and (tmp_path / "mlflow.db").is_file()
    assert not (tmp_path / "outputs" / "run" / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("lora-sweep").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["data.dir"] == str(tmp_path / "ds")
    assert run.data.params["sampling.prompt_file"] == str(tmp_path / "prompts.txt")
    assert run.data.params["data.warnings"] == "2"
    text = Path(client.download_artifacts(run.info.run_id, "data/warnings.txt", str(tmp_path))).read_text()
    assert str(tmp_path / "ds" / "2_cat" / "b.png") in text and "line 1 (-w)" in text


def test_an_output_folder_hydra_cannot_create_is_refused_before_hydra_tries(tmp_path, app):
    (tmp_path / "taken").write_text("a file where a folder should go")
    code, out = app(f"hydra.run.dir={tmp_path / 'taken' / 'run'}")
    assert code == 2 and f"hydra.run.dir: cannot create the folder '{tmp_path / 'taken' / 'run'}'" in out


def test_bad_bucket_settings_are_said_once_not_once_per_image(tmp_path):
    for name in "abc":
        image(tmp_path / "ds" / "1_x" / f"{name}.png", caption=name)
    problems = check_job(compose_config("data=folder", f"data.dir={tmp_path / 'ds'}", "data.resolution=128",
                                        "data.max_bucket_reso=64")).problems
    assert len(problems) == 1 and problems[0].startswith("data.max_bucket_reso (64) is smaller")


def test_many_problems_of_one_kind_are_listed_up_to_ten_then_counted():
    from lora_sweep.checks.preflight import format_problems

    grouped = [(f"data.dir: caption file '/d/{i}.txt' is empty.", ["#0"]) for i in range(13)]
    grouped.append(("train.resume: other kind", ["#1"]))
    lines = format_problems(grouped, jobs=2).splitlines()
    assert lines[0].startswith("Pre-flight found 14 problems in a sweep of 2 jobs")
    assert sum("is empty." in line for line in lines[1:11]) == 10 and "[job #0]" in lines[1]
    assert lines[-1] == "- ... and 3 more like: data.dir: caption file '…' is empty."


@pytest.mark.parametrize("argv", [["noise.ofset=0.1"], ["+noise.ofset=0.1", "train.max_steps=1"],
                                  ["-m", "noise=none,offset", "+noise.ofset=0.1"]])
def test_a_misspelt_key_never_trains_silently(app, argv):
    """Without '+', refused before Hydra composes (Hydra's own advice, "use +noise.ofset", would train without
    it); with '+', refused by the pre-flight. Either way: the real key, exit 2, nothing written."""
    code, out = app(*argv)
    assert code == 2 and "Did you mean noise.offset?" in out
    assert "To append" not in out and "HYDRA_FULL_ERROR" not in out and "Traceback" not in out


@pytest.mark.parametrize("argv", [["masked_loss=true"], ["train.masked_loss=true"], ["+train.masked_loss=true"],
                                  ["-m", "noise=none,offset", "+masked_loss=true"]])
def test_a_kohya_flag_lora_sweep_refuses_is_named_with_its_reason(app, argv):
    """docs/kohya.md: kohya's --masked_loss typed as a setting, with or without '+': its reason, exit 2, nothing
    written."""
    code, out = app(*argv)
    assert code == 2 and "kohya's --masked_loss is not supported by lora-sweep: it weights the loss by a mask" in out
    assert "Did you mean" not in out and "Traceback" not in out


@pytest.mark.parametrize("argv, message", [
    (["optimizer=adamw", "optimizer.args.betas=[0.9]", "train.max_steps=1"],
     "optimizer.args.betas=[0.9]: AdamW (optimizer=adamw) takes 2 values, like its default [0.9, 0.999]."),
    (["optimizer=prodigy", "+optimizer.args.d_cof=2"],
     "optimizer.args.d_cof is not an argument of Prodigy (optimizer=prodigy). Did you mean optimizer.args.d_coef?"),
    (["optimizer.args.eps=-1"],
     "optimizer.args.eps=-1: AdamW (optimizer=adamw) refuses it (ValueError: Invalid epsilon value: -1). Its "
     "default is 1e-08."),
])
def test_optimizer_arguments_are_checked_before_the_model_loads(app, argv, message):
    code, out = app(*argv)
    assert code == 2 and message in out and "Traceback" not in out
    assert "Pre-flight found 1 problem; nothing was started or written. Fix it and run again:" in out


def test_a_sweep_names_the_jobs_a_bad_optimizer_argument_hits(app):
    code, out = app("-m", "optimizer.args.eps=1e-8,-1", "noise=none,offset")
    assert code == 2 and "Pre-flight found 1 problem in a sweep of 4 jobs" in out
    line = next(line for line in out.splitlines() if "optimizer.args.eps=-1: AdamW" in line)
    assert line.endswith("[jobs #2 optimizer.args.eps=-1 noise=none, #3 optimizer.args.eps=-1 noise=offset]")


@pytest.mark.parametrize("argv, details", [
    (["-m", "train.max_steps=abc,2"], ["train.max_steps=abc", "could not be converted to Integer"]),
    (["-m", "noise=ofset,none"], ["Available options in 'noise': ip, multires, multires_ip, none, offset, offset_ip",
                                  "Did you mean noise=offset"]),
    (["train.max_steps=abc"], ["Error merging override train.max_steps=abc. Value 'abc' of type 'str' could not"]),
    (["noise=ofset"], ["Could not find 'noise/ofset'. Available options in 'noise': ip,"]),
    # experiment and preset default to none; a misspelt one is refused like any group option, not dropped
    (["experiment=v99"], ["Could not find 'experiment/v99'. Available options in 'experiment': article,"]),
    (["preset=dmo"], ["Could not find 'preset/dmo'. Available options in 'preset': demo"]),
    (["-m", "experiment=v53,v99"], ["Could not find 'experiment/v99'"]),
])
def test_hydra_details_reach_the_user_in_a_sweep_as_in_a_single_run(app, argv, details):
    code, out = app(*argv)
    assert code == 2 and all(d in out for d in details), out
    assert "HYDRA_FULL_ERROR" not in out and "Config search path" not in out and "full_key" not in out


def test_data_folder_without_a_folder_names_the_setting_to_set(app):
    code, out = app("data=folder")
    assert code == 2 and "data.dir: data=folder trains on your own dataset, and data.dir is not set." in out
    assert "'None'" not in out


def test_a_failed_sweep_job_ends_with_its_reason_not_hydras_advice(tmp_path):
    """A user's error in a job that no pre-flight can see (here an image deleted as the job starts, after the
    pre-flight recorded the dataset in the sweep folder) ends the sweep with exit 1 and the reason alone, naming the
    file: no "Set the environment variable HYDRA_FULL_ERROR=1" line, no traceback."""
    sys.path.insert(0, str(ROOT / "tests" / "apps" / "faults"))
    from fault_hook import FOLDER, fault_overrides

    for name in ("a", "b"):
        write_image(tmp_path / "ds" / "2_thing" / f"{name}.png", caption=f"a photo of {name}")
    env = dict(os.environ, MLFLOW_TRACKING_URI=new_store(tmp_path / "mlflow.db"), PYTHONPATH=str(FOLDER))
    out = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "-m", "hydra/launcher=basic", "data=folder",
                          f"data.dir={tmp_path / 'ds'}", f"data.cache_dir={tmp_path / 'cache'}",
                          *fault_overrides({0: f"remove:{tmp_path / 'ds' / '2_thing' / 'b.png'}"}),
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "HYDRA_FULL_ERROR" not in text and "Traceback" not in text
    assert f"data.dir: in '{tmp_path / 'ds'}', since the pre-flight, removed '2_thing/b.png'." in out.stderr


@pytest.mark.parametrize("argv", [["data.bucket_reso_steps=0"],
                                  ["-m", "hydra.launcher.gpus=[]", "train.max_steps=1", "data.bucket_reso_steps=0,32"]])
def test_a_bad_bucket_step_is_named_not_crashed_on_and_a_sweep_never_starts(tmp_path, app, argv):
    """bucket_reso_steps=0 divided by zero in the bucket assignment; Hydra made that a warning and the sweep ran."""
    image(tmp_path / "ds" / "1_x" / "a.png", caption="a")
    code, out = app(*argv, "data=folder", f"data.dir={tmp_path / 'ds'}")
    assert code == 2 and "ZeroDivisionError" not in out and "raised" not in out
    assert "data.bucket_reso_steps: 0 is not allowed for SDXL" in out


def test_an_exception_in_the_checks_stops_the_command_with_exit_2(app, monkeypatch):
    """Hydra turns a callback's exception into a UserWarning and goes on: the pre-flight must not let it."""
    def broken(*args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr("lora_sweep.checks.preflight._check_prompts", broken)
    for argv in (["train.max_steps=1"], ["-m", "hydra.launcher.gpus=[]", "noise=none,offset"]):
        code, out = app(*argv)
        assert code == 2 and "Pre-flight: internal error while checking the configuration (ZeroDivisionError" in out


@pytest.mark.parametrize("value", ["abc", "[1,2]"])
def test_an_optimizer_value_used_only_in_step_is_refused_before_the_model_loads(app, value):
    """Prodigy reads d_coef only in step(): building it on a dummy parameter accepted 'abc'."""
    code, out = app("optimizer=prodigy", f"optimizer.args.d_coef={value}")
    assert code == 2 and "Traceback" not in out
    assert "optimizer.args.d_coef=" in out
    assert "Prodigy (optimizer=prodigy) refuses it (TypeError: can't multiply" in out


def test_a_sweep_whose_jobs_share_one_output_folder_is_refused(tmp_path, app):
    code, out = app("-m", "hydra.launcher.gpus=[]", f"train.output_dir={tmp_path / 'out'}", "noise=none,offset")
    assert code == 2
    assert (f"train.output_dir: jobs #0 noise=none, #1 noise=offset all write to '{tmp_path / 'out'}'" in out
            and "Leave train.output_dir unset" in out)
    code, out = app("-m", "hydra.launcher.gpus=[]", f"train.output_dir={tmp_path / 'a'},{tmp_path / 'b'}",
                    "train.max_steps=-1")  # one folder per job: only the real problem is named
    assert code == 2 and "train.output_dir" not in out


@pytest.mark.parametrize("argv, message", [
    (["hydra.launcher.gpus=[]", "hydra.launcher.cpu_slots=0"],
     "hydra.launcher.cpu_slots=0: must be a whole number >= 1."),
    (["hydra.launcher.jobs_per_gpu=-1"], "hydra.launcher.jobs_per_gpu=-1: must be a whole number >= 1."),
    (["hydra.launcher.gpus=[abc]"], "'abc' is neither a GPU index (0, 1, ...) nor a GPU UUID"),
    (["hydra.launcher.gpus=[]", "experiment=glob(x*)"], "the sweep has no jobs: its overrides (experiment=glob(x*))"),
])
def test_launcher_settings_and_an_empty_sweep_are_pre_flight_problems(app, argv, message):
    code, out = app("-m", "noise=none,offset", *argv) if "glob" not in argv[-1] else app("-m", *argv)
    assert code == 2 and message in out and "Traceback" not in out and "Pre-flight found" in out


def test_gpu_slots_torch_cannot_use_are_refused_unless_every_job_is_on_the_cpu(app, monkeypatch):
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    count = torch.cuda.device_count()
    slots = f"hydra.launcher.gpus=[{count},{count + 1}]"  # past the last device torch sees, none on a CPU machine
    code, out = app("-m", slots, "noise=none,offset")
    assert code == 2 and f"{slots.replace(',', ', ')}: the sweep's GPU slots gpu{count}, gpu{count + 1} cannot" in out
    assert "hydra.launcher.gpus=[]" in out and "Traceback" not in out
    code, out = app("-m", slots, "noise=none,offset", "train.device=cpu", "train.max_steps=-1")
    assert code == 2 and "hydra.launcher.gpus" not in out  # CPU jobs on GPU slots: the user's choice


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_train_device_cuda_without_a_gpu_is_refused_before_any_folder_exists(app):
    """`python sweep.py train.max_steps=1 train.device=cuda` on CPU torch: exit 2, no outputs/<date>/<time>/."""
    code, out = app("train.max_steps=1", "train.device=cuda")
    assert code == 2 and "- train.device=cuda, but torch " in out and "sees no CUDA device" in out
    assert "Traceback" not in out  # and the app fixture finds the working folder empty


def test_unusable_folders_and_stores_are_all_named_at_once(tmp_path, app, monkeypatch):
    """As root, os.access says /proc is writable: Hydra then made outputs/ before the job refused it."""
    code, out = app("train.output_dir=/proc/out", "train.state_dir=/proc/states", "hydra.run.dir=/proc/x")
    assert code == 2 and "Traceback" not in out
    for setting, path in (("train.output_dir", "/proc/out"), ("train.state_dir", "/proc/states"),
                          ("hydra.run.dir", "/proc/x")):
        assert f"{setting}: cannot write to '{path}'" in out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    code, out = app()
    assert code == 2 and "'bogus://x' has the scheme 'bogus', for which MLflow has no tracking store" in out


def test_an_unreachable_mlflow_server_is_refused_at_once(app, monkeypatch):
    import socket
    import time

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    code, out = app("train.max_steps=1")
    assert code == 2 and time.monotonic() - start < 30 and "Traceback" not in out
    assert f"the MLflow server at 'http://127.0.0.1:{port}' does not accept a connection on 127.0.0.1:{port}" in out

@pytest.mark.parametrize("argv", [["loss=[huber_snr,smooth_l1_snr]", "train.max_steps=1"],
                                  ["-m", "loss=[huber_snr,smooth_l1_snr],l2", "train.max_steps=1"]])
def test_a_list_of_options_that_disagree_on_a_setting_is_refused(app, argv):
    """`loss=[huber_snr,smooth_l1_snr]` is refused: it would train smooth_l1 (the last option's loss.type) silently."""
    code, out = app(*argv)
    assert code == 2 and ("loss: the options huber_snr and smooth_l1_snr both set loss.type (huber_snr: 'huber', "
                          "smooth_l1_snr: 'smooth_l1'); in a list the last one would win without a word. Choose one "
                          "of them (loss=huber_snr or loss=smooth_l1_snr).") in out


def test_options_that_add_up_are_no_conflict():
    """noise=offset_ip lists noise/offset and noise/ip (different settings); every shipped option composes alone."""
    from lora_sweep.checks.groups import option_conflicts

    assert option_conflicts(["noise=offset_ip", "experiment=v57"]) == []
    assert option_conflicts(["noise=[offset,ip]"]) == []


@pytest.mark.parametrize("name, said", [("pdir", "is not an existing file (it is a folder)."),
                                        ("missing.json", "is not an existing file.")])
def test_a_prompt_file_that_is_a_folder_or_missing_is_one_problem(tmp_path, name, said):
    """One problem, one line: a folder is not also "not a .txt prompt file"."""
    (tmp_path / "pdir").mkdir()
    report = check_job(compose_config(f"sampling.prompt_file={tmp_path / name}"))
    assert [p for p in report.problems if p.startswith("sampling.prompt_file")] == [
        f"sampling.prompt_file: '{tmp_path / name}' {said}"]


def test_each_problem_has_one_source(tmp_path):
    """Inputs several checks look at (a missing folder, prompt file or state, an unknown optimizer, bad bucket
    settings over real images) are each named once: no check repeats what another one says."""
    for name in "ab":
        image(tmp_path / "ds" / "1_x" / f"{name}.png", caption=name)
    problems = check_job(compose_config(
        "data=folder", f"data.dir={tmp_path / 'ds'}", f"data.validation_dir={tmp_path / 'no_val'}",
        "data.resolution=128", "data.max_bucket_reso=64", f"sampling.prompt_file={tmp_path / 'no.txt'}",
        f"train.resume={tmp_path / 'no_state.pt'}", "optimizer.name=adamw9", "train.text_encoder_lr=0.5")).problems
    assert len(problems) == len(set(problems))
    for setting in ("data.validation_dir", "data.max_bucket_reso", "sampling.prompt_file", "train.resume",
                    "optimizer.name"):
        assert sum(p.startswith(setting) for p in problems) == 1, (setting, problems)


@pytest.mark.parametrize("override, advice, values", [
    ("data.dir=/tmp/訓練,/tmp/x", 'data.dir="/tmp/訓練",/tmp/x', ["/tmp/訓練", "/tmp/x"]),
    ("data.dir=choice(/tmp/訓練,/tmp/x)", 'data.dir="/tmp/訓練",/tmp/x', ["/tmp/訓練", "/tmp/x"]),
    ("data.dir=/data/訓練", 'data.dir="/data/訓練"', ["/data/訓練"]),
    ("x=[訓,b],[c,d]", 'x=["訓",b],[c,d]', [["訓", "b"], ["c", "d"]]),
])
def test_the_advised_quoting_keeps_a_sweep_of_two_values_two(override, advice, values):
    """Quoting the whole `/tmp/訓練,/tmp/x` would sweep one folder: each element that needs it is quoted instead."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lora_sweep.checks.command_line import _syntax_problems, command_line_problems

    (problem,) = _syntax_problems([override])
    assert f"Quote the value, and the whole override for the shell: '{advice}'." in problem
    parser = OverridesParser.create()
    (advised,) = parser.parse_overrides([advice])
    key = advised.key_or_group
    sweep = advised.is_sweep_override()  # the texts Hydra's basic sweeper puts in each job's overrides
    texts = list(advised.sweep_string_iterator()) if sweep else [advised.get_value_element_as_str()]
    assert [parser.parse_overrides([f"{key}={t}"])[0].value() for t in texts] == values  # as each job gets it
    if key == "data.dir":
        assert command_line_problems(["-m", "data=folder", advice]) == []


def test_a_quoted_element_of_a_sweep_is_type_checked_as_its_text():
    from lora_sweep.checks.command_line import command_line_problems

    assert command_line_problems(["-m", 'train.max_steps="3",4']) == []


def test_reg_folders_and_subsets_are_checked_like_data_dir(tmp_path):
    """The reg folder's problems are named by data.reg_data_dir; kohya syntax a subset leaves literal is a warning;
    each subset's images meet its own dataset's bucket settings."""
    write_image(tmp_path / "train" / "2_cat" / "a.png", caption="a cat ||| sitting")
    write_image(tmp_path / "reg" / "1_cat" / "r.png", caption=b"")
    cfg = compose_config("data=folder", f"data.dir={tmp_path / 'train'}", f"data.reg_data_dir={tmp_path / 'reg'}")
    report = check_job(cfg)
    assert [p for p in report.problems if "r.txt" in p] == [
        f"data.reg_data_dir: caption file '{tmp_path / 'reg' / '1_cat' / 'r.txt'}' is empty. Write the caption on its "
        "first line, or delete the file to use the folder's class tokens (the <name> of <repeats>_<name>) instead."]
    assert [f.setting for f in report.fallbacks if "'|||'" in f.what] == ["data.keep_tokens_separator"]

    write_image(tmp_path / "wide" / "w.png", size=(256, 32), caption="a wide thing")
    subsets = f"{{image_dir:'{tmp_path / 'wide'}'}}"
    cfg = compose_config("data=folder", "data.dir=null",
                         f"data.datasets=[{{bucket_no_upscale:true,min_bucket_reso:64,subsets:[{subsets}]}}]")
    problems = check_job(cfg).problems
    assert len(problems) == 1 and problems[0].startswith("data.datasets[0].subsets[0]: image '") \
        and "(256x32): an image of 256x32 gets an empty bucket" in problems[0]


@pytest.mark.parametrize("name, text, why", [
    ("e3", "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'reg'\n  is_reg = true\n",
     "only reg images (1, is_reg = true)"),
    ("e2", "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'reg'\n  is_reg = true\n  [[datasets.subsets]]\n"
           "  image_dir = 'emptydir'\n  num_repeats = 0\n", "subsets with num_repeats < 1 are not used: 'emptydir'"),
    ("e6", "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'reg'\n  is_reg = true\n  [[datasets.subsets]]\n"
           "  image_dir = 'emptydir'\n", "train subsets without an image: '")])
def test_a_dataset_config_without_train_images_is_refused_up_front(tmp_path, app, name, text, why):
    """The tester's e3.toml (only an is_reg subset) and e2.toml (and a num_repeats = 0 subset on an empty folder),
    and an empty train folder beside reg: exit 2, one paragraph naming the file, before the model loads."""
    image(tmp_path / "reg" / "r.png", caption="a reg")
    (tmp_path / "emptydir").mkdir()
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace("'reg'", f"'{tmp_path / 'reg'}'").replace("'emptydir'", f"'{tmp_path / 'emptydir'}'"),
                    encoding="utf-8")
    code, out = app(f"data.dataset_config={path}")
    assert code == 2 and "Pre-flight found 1 problem;" in out, out[-2000:]
    assert f"data.dataset_config '{path}' line 1 datasets[0]: no train images to train on: " in out
    assert why.replace("'emptydir'", f"'{tmp_path / 'emptydir'}'") in out


def test_a_bad_sampler_name_exits_2_before_the_model_loads(tmp_path, app):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --ss dpm2\n", encoding="utf-8")
    code, out = app("sampling.sampler=eular_a", f"sampling.prompt_file={prompts}")
    assert code == 2 and "Traceback" not in out
    assert "sampling.sampler: 'eular_a' is not a kohya sampler. Did you mean 'euler_a'?" in out
    assert (f"sampling.prompt_file '{prompts}', line 1: option '--ss dpm2' in 'a cat --ss dpm2': 'dpm2' is not a "
            "kohya sampler. Did you mean 'dpm_2'? Accepted: ddim, ") in out
    assert "(kohya v0.8.7 would use DDIM for it.)" in out


def test_a_kohya_optimizer_name_as_the_group_option_names_the_option_or_why_not(app):
    """`optimizer=<--optimizer_type>`: the option it is, or the class v0.8.7 would build; one paragraph each, exit 2.
    `optimizer.name=Adafactor` alone keeps adamw's args: choose the option."""
    shipped = {"Adafactor": "adafactor", "SGDNesterov": "sgd_nesterov", "PagedAdamW8bit": "paged_adamw8bit",
               "AdamW8bit": "adamw8bit", "DAdaptation": "dadapt_adam_preprint",
               "DAdaptAdamPreprint": "dadapt_adam_preprint", "Prodigy": "prodigy", "Lion8bit": "lion8bit"}
    code, out = app(*(f"optimizer={name}" for name in shipped), "optimizer=Lion", "optimizer=PagedAdamW32bit",
                    "optimizer=torch.optim.RMSprop")
    assert code == 2 and "Traceback" not in out and "Did you mean" not in out and "Could not find" not in out
    for name, option in shipped.items():
        assert f"optimizer={name}: the option is optimizer={option} (kohya's --optimizer_type {name})." in out
    assert "optimizer='Lion': kohya v0.8.7 would build lion_pytorch.Lion, which lora-sweep does not ship" in out
    assert "optimizer='PagedAdamW32bit': kohya v0.8.7 would build bitsandbytes.optim.PagedAdamW32bit," in out
    assert "optimizer='torch.optim.RMSprop': kohya v0.8.7 would build torch.optim.RMSprop," in out

    code, out = app("optimizer.name=Adafactor", "train.max_steps=1")
    assert code == 2 and "Traceback" not in out and "betas is not an argument" not in out
    assert ("optimizer.name=Adafactor: optimizer.name changes the class only, and optimizer.args are still the adamw "
            "option's (betas, eps, weight_decay), which Adafactor does not take. Choose the option instead: "
            "optimizer=adafactor") in out


def test_the_command_lines_problems_come_with_the_configs_own(tmp_path):
    """The tester's item 4: `masked_loss=true network.dropout=3` names both under one header, not the first alone."""
    from lora_sweep.checks.command_line import config_problems_beside

    [dropout] = config_problems_beside(["masked_loss=true", "network.dropout=3"])
    assert dropout.startswith("network.dropout: must be a probability in [0, 1)")
    assert config_problems_beside(["-m", "masked_loss=true", "network.dropout=3"]) == []  # a sweep: the pre-flight's
    out = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "masked_loss=true", "network.dropout=3"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.splitlines()
    assert lines[0] == "Pre-flight found 2 problems; nothing was started or written. Fix them and run again:"
    assert lines[1].startswith("- kohya's --masked_loss is not supported") and lines[2] == f"- {dropout}"
    assert list(tmp_path.iterdir()) == []


def test_a_select_whose_steps_have_no_lora_file_is_warned_about_not_refused(caplog):
    from lora_sweep.checks.preflight import _finish, checkpoint_alignment

    report = check_job(compose_config("compare.select=fit/loss", "validation.every=4", "train.save_every=3"))
    assert report.problems == []
    assert report.warnings == [
        "compare.select = fit/loss picks each variant's best checkpoint among the steps fit/loss is logged at "
        "(validation.every = 4), and train.save_every = 3 saves a LoRA at multiples of 3 only, so a best step may "
        "have no LoRA file to keep. Set train.save_every to 4 (or a divisor of it); it is not part of the config "
        "hash, so the runs stay the same configs."]
    assert checkpoint_alignment(compose_config("compare.select=img/diversity", "sampling.every=5",
                                               "sampling.prompts=[a cat]", "train.save_every=0")) == (
        "compare.select = img/diversity picks each variant's best checkpoint among the steps img/diversity is logged "
        "at (sampling.every = 5), and train.save_every = 0 saves only the final LoRA, so a best step may have no "
        "LoRA file to keep. Set train.save_every to 5 (or a divisor of it); it is not part of the config hash, so "
        "the runs stay the same configs.")
    caplog.set_level("WARNING")
    _finish([("#0", report), ("#1", report)], jobs=2)  # once for the sweep, not once a job
    assert [r.getMessage() for r in caplog.records] == report.warnings


@pytest.mark.parametrize(("select", "why"), [
    ("img/drift", "img/drift has no default direction; write img/drift:max or img/drift:min."),
    ("fit/loss:up", "the direction after ':' must be max or min, not 'up'."),
])
def test_a_bad_select_is_its_paragraph_exit_2_not_an_internal_error(app, select, why):
    code, out = app(f"compare.select={select}")
    assert code == 2 and f"compare.select = '{select}': {why}" in out
    assert "internal error" not in out and "Traceback" not in out


@pytest.mark.parametrize("overrides", [
    (),  # compare.select unset
    ("compare.select=fit/loss", "validation.every=4", "train.save_every=2"),  # 2 divides 4
    ("compare.select=fit/loss", "validation.every=0", "train.save_every=0"),  # start and end: the final LoRA
    ("compare.select=train/loss", "train.save_every=0"),  # no logging setting spaces it: nothing to line up
    ("experiment=v53",), ("experiment=v61",), ("experiment=v57", "preset=demo"),  # they select, and line up
])
def test_aligned_steps_or_no_select_warn_nothing(overrides):
    from lora_sweep.checks.preflight import checkpoint_alignment

    assert checkpoint_alignment(compose_config(*overrides)) is None
