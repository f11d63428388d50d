"""A job reads its files once and does not rerun the pre-flight: its one scan of the dataset feeds the
skip-finished fingerprint, training and the run's warnings. A file gone or changed between the pre-flight and the
job (a job may start hours later under Slurm, Ray or a long queue) is one paragraph naming it, never a traceback.
Each test runs the pre-flight (`check_job`), alters a file, then runs the job in this process on the tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import ROOT, compose_config, write_image
from mlflow.tracking import MlflowClient

from lora_sweep.checks.preflight import Memo, check_job, datasets_seen
from lora_sweep.errors import UserError
from lora_sweep.job import run as run_module
from lora_sweep.job.names import write_datasets_seen
from lora_sweep.job.run import run_job


def checked(tmp_path: Path, *overrides: str, memo: Memo | None = None):
    """A tiny job's config over the dataset tmp_path/ds (three captioned images), passed by the pre-flight."""
    for name in ("a", "b", "c"):
        write_image(tmp_path / "ds" / "2_thing" / f"{name}.png", caption=f"a photo of {name}")
    cfg = compose_config("train.max_steps=1", "train.device=cpu", "data=folder", f"data.dir={tmp_path / 'ds'}",
                         f"train.state_dir={tmp_path / 'states'}", f"data.cache_dir={tmp_path / 'cache'}", *overrides)
    report = check_job(cfg, memo=memo)
    assert report.problems == [], report.problems
    return cfg


def refused(cfg, tmp_path: Path, store_uri: str, sweep_dir: Path | None = None) -> str:
    """The set-up's UserError: one paragraph, and nothing trained or logged."""
    with pytest.raises(UserError) as error:
        run_job(cfg, output_dir=tmp_path / "out", sweep_dir=sweep_dir)
    text = str(error.value)
    assert "Traceback" not in text and "\n" not in text
    assert text.startswith("A file this job reads changed after the pre-flight checked it")
    assert not list((tmp_path / "states").glob("*/*/state-*.pt"))
    client = MlflowClient(store_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    return text


def test_a_dataset_folder_deleted_after_the_pre_flight(tmp_path, mlflow_uri):
    cfg = checked(tmp_path)
    shutil.rmtree(tmp_path / "ds")
    assert f"data.dir: '{tmp_path / 'ds'}' is not a folder." in refused(cfg, tmp_path, mlflow_uri)


def test_a_prompt_file_gone_after_the_pre_flight(tmp_path, mlflow_uri):
    (tmp_path / "prompts.txt").write_text("a photo of a thing\n", encoding="utf-8")
    cfg = checked(tmp_path, f"sampling.prompt_file={tmp_path / 'prompts.txt'}")
    (tmp_path / "prompts.txt").unlink()
    said = refused(cfg, tmp_path, mlflow_uri)
    assert f"sampling.prompt_file: the prompt file '{tmp_path / 'prompts.txt'}' does not exist" in said


def test_a_caption_made_unreadable_after_the_pre_flight(tmp_path, mlflow_uri):
    cfg = checked(tmp_path)
    (tmp_path / "ds" / "2_thing" / "b.txt").write_bytes(bytes.fromhex("6172746973749273"))  # cp1252, not UTF-8
    said = refused(cfg, tmp_path, mlflow_uri)
    assert f"data.dir: caption file '{tmp_path / 'ds' / '2_thing' / 'b.txt'}' is not valid UTF-8" in said


def test_an_image_removed_while_the_job_sets_up(tmp_path, mlflow_uri, monkeypatch):
    """Removed after the job's scan listed it: before the fingerprint read it, the set-up refuses; once the run
    exists (the model loading), the run is FAILED with the reason, a user's error."""
    cfg = checked(tmp_path)
    image = tmp_path / "ds" / "2_thing" / "b.png"
    said = f"data.dir: '{image}' is gone: it was removed after the dataset was scanned, before training started."
    read_inputs, dataset_of = run_module.read_inputs, run_module.dataset_of
    monkeypatch.setattr(run_module, "read_inputs", lambda *a: (read_inputs(*a), image.unlink())[0])
    with pytest.raises(UserError, match="is gone") as error:
        run_job(cfg, output_dir=tmp_path / "out")
    assert str(error.value).startswith(said)

    write_image(image, caption="a photo of b")
    monkeypatch.setattr(run_module, "read_inputs", read_inputs)
    monkeypatch.setattr(run_module, "dataset_of", lambda cfg, scans: (dataset_of(cfg, scans), image.unlink())[0])
    outcome = run_job(cfg, output_dir=tmp_path / "out")
    assert outcome.status == "FAILED" and outcome.user_error and "Traceback" not in outcome.reason
    assert outcome.reason.startswith(said)  # a user's error in its own words, without "UserError: "
    run = MlflowClient(mlflow_uri).get_run(outcome.run_id)
    assert run.info.status == "FAILED" and run.data.tags["lora_sweep.failure"].startswith(said)


def test_a_sweeps_job_refuses_a_dataset_changed_since_the_pre_flight_recorded_it(tmp_path, mlflow_uri):
    """Every variant of a sweep trains on the files its pre-flight checked: an image removed, a caption edited and an
    image added since are named, and the job does not start."""
    memo = Memo()
    cfg = checked(tmp_path, memo=memo)
    write_datasets_seen(tmp_path / "sweep", datasets_seen(memo))
    folder = tmp_path / "ds" / "2_thing"
    (folder / "a.png").unlink()
    (folder / "b.txt").write_text("another caption", encoding="utf-8")
    write_image(folder / "d.png", caption="a photo of d")
    said = refused(cfg, tmp_path, mlflow_uri, sweep_dir=tmp_path / "sweep")
    assert said.endswith(
        f"data.dir: in '{tmp_path / 'ds'}', since the pre-flight, removed '2_thing/a.png'; changed '2_thing/b.txt'; "
        "added '2_thing/d.png', '2_thing/d.txt'. A sweep's variants train on the files its pre-flight checked: put "
        "them back as they were, or start the sweep again.")


def test_a_model_path_gone_after_the_pre_flight_fails_its_run_with_a_paragraph(tmp_path, mlflow_uri, cache_dir):
    from lora_sweep.model.loading import tiny_model_dir

    (tmp_path / "model").symlink_to(tiny_model_dir(cache_dir), target_is_directory=True)
    cfg = checked(tmp_path, f"model.path={tmp_path / 'model'}")
    (tmp_path / "model").unlink()
    outcome = run_job(cfg, output_dir=tmp_path / "out")
    assert outcome.status == "FAILED" and outcome.user_error and "Traceback" not in outcome.reason
    assert outcome.reason.startswith(f"model.path='{tmp_path / 'model'}' does not exist")


def test_one_scan_feeds_training_and_its_warnings_after_an_image_was_removed_or_truncated(
        tmp_path, mlflow_uri, monkeypatch):
    """Outside a sweep the job trains on the dataset as it finds it: an image removed since the pre-flight is not in
    its scan, one truncated to a broken header is skipped and named in the run's warnings. The folder is scanned
    once."""
    from lora_sweep.data import dataset

    cfg = checked(tmp_path)
    (tmp_path / "ds" / "2_thing" / "a.png").unlink()
    truncated = tmp_path / "ds" / "2_thing" / "b.png"
    truncated.write_bytes(truncated.read_bytes()[:20])
    scans = []
    inspect_folder = dataset.inspect_folder
    monkeypatch.setattr(dataset, "inspect_folder", lambda *a, **k: scans.append(a[0]) or inspect_folder(*a, **k))
    outcome = run_job(cfg, output_dir=tmp_path / "out")
    assert outcome.status == "FINISHED", outcome.reason
    assert scans == [tmp_path / "ds"]
    params = MlflowClient(mlflow_uri).get_run(outcome.run_id).data.params
    assert (params["data.images"], params["data.skipped_images"], params["data.warnings"]) == ("1", "1", "1")
    warnings = (tmp_path / "out" / "warnings.txt").read_text()
    assert warnings.startswith("data.dir: 1 image that cannot be read: skipped") and str(truncated) in warnings


@pytest.mark.parametrize("sweeper, checks", [("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", True),
                                             ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper", False)])
def test_only_a_job_the_launching_process_never_saw_runs_the_pre_flight(tmp_path, mlflow_uri, sweeper, checks):
    """A sweeper that picks its jobs as it runs (e.g. Optuna) left the pre-flight the sweep's base config only: its
    jobs check their own config, as the pre-flight would have; a BasicSweeper's jobs were all checked at launch."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lora_sweep.checks.preflight import needs_job_check
    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        job = compose("config", return_hydra_config=True)
    with open_dict(job):
        job.hydra.mode, job.hydra.sweeper._target_, job.hydra.runtime.cwd = "MULTIRUN", sweeper, str(tmp_path)
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job)
    try:
        assert needs_job_check() is checks
        if checks:
            with pytest.raises(UserError, match=r"(?s)Pre-flight found 1 problem.*train.max_steps: must be > 0, got 0"):
                run_job(compose_config("train.max_steps=0", f"train.state_dir={tmp_path / 'states'}"),
                        output_dir=tmp_path / "out")
    finally:
        HydraConfig.instance().cfg = saved


def test_the_job_reads_its_prompt_file_once_and_samples_what_it_read(tmp_path, mlflow_uri, monkeypatch):
    """The prompts parsed with the dataset scan are the ones sampled: the file changed later is not read again."""
    import json

    from lora_sweep.sampling import prompts as prompts_module

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a photo of a thing --s 1\n", encoding="utf-8")
    cfg = checked(tmp_path, f"sampling.prompt_file={prompt_file}", "sampling.width=64", "sampling.height=64")
    reads = []
    read_prompt_lines = prompts_module.read_prompt_lines
    monkeypatch.setattr(prompts_module, "read_prompt_lines", lambda *a, **k: reads.append(a[0]) or
                        read_prompt_lines(*a, **k))
    read_inputs = run_module.read_inputs
    changed = lambda *a: (read_inputs(*a), prompt_file.write_text("another prompt --s 1\n"))[0]  # noqa: E731
    monkeypatch.setattr(run_module, "read_inputs", changed)
    outcome = run_job(cfg, output_dir=tmp_path / "out")
    assert outcome.status == "FINISHED", outcome.reason
    assert [str(path) for path in reads] == [str(prompt_file)]
    local = MlflowClient(mlflow_uri).download_artifacts(outcome.run_id, "samples/prompts.json", str(tmp_path))
    assert [spec["prompt"] for spec in json.loads(Path(local).read_text())] == ["a photo of a thing"]


def test_images_behind_broken_links_are_counted_in_skipped_images_and_named(tmp_path, mlflow_uri, caplog):
    """4 images, 3 of them links whose targets were moved away: the run trains on 1 and says which 3 it skipped."""
    write_image(tmp_path / "ds" / "2_thing" / "kept.png", caption="a photo")
    for name in ("a", "b", "c"):
        (tmp_path / "ds" / "2_thing" / f"{name}.png").symlink_to(tmp_path / "moved" / f"{name}.png")
    cfg = compose_config("train.max_steps=1", "train.device=cpu", "data=folder", f"data.dir={tmp_path / 'ds'}",
                         f"train.state_dir={tmp_path / 'states'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert check_job(cfg).problems == []
    outcome = run_job(cfg, output_dir=tmp_path / "out")
    assert outcome.status == "FINISHED", outcome.reason
    params = MlflowClient(mlflow_uri).get_run(outcome.run_id).data.params
    assert (params["data.images"], params["data.skipped_images"]) == ("1", "3")
    warnings = (tmp_path / "out" / "warnings.txt").read_text()
    assert warnings.startswith("data.dir: 3 images that cannot be read: skipped (counted in data.skipped_images)")
    for name in ("a", "b", "c"):
        link = f"{tmp_path / 'ds' / '2_thing' / name}.png (a link to '{tmp_path / 'moved' / name}.png', which is gone)"
        assert link in warnings and link in caplog.text


# the tester's three files (issue 25): each leaves something out of a dataset config
DROPPED = {
    "e4": "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'style'\n  num_repeats = 0\n"
          "  [[datasets.subsets]]\n  image_dir = 'char'\n",
    "e5": "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'char'\n  [[datasets.subsets]]\n  image_dir = 'reg'\n"
          "  is_reg = true\n  num_repeats = 0\n",
    "m": "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'char'\n  num_repeats = 2\n  [[datasets.subsets]]\n"
         "  image_dir = 'char'\n  num_repeats = 5\n",
    "ci": "[general]\ncache_info = true\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'style'\n",
}


@pytest.mark.parametrize("name, warning", [
    ("e4", "line 2: 1 subset not used: num_repeats < 1 (as kohya): 'style'."),
    ("e5", "line 4: 1 subset not used: num_repeats < 1 (as kohya): 'reg'."),
    ("m", "line 5: 1 subset not used: an earlier subset of this dataset has the same image_dir"),
    ("ci", ": 1 cache_info setting without effect")])
def test_a_subset_left_out_or_a_key_without_effect_is_warned_by_the_pre_flight_and_the_job(
        tmp_path, monkeypatch, name, warning):
    """What reading a dataset config left out is a warning of the pre-flight and of the job (its `data.warnings`),
    once, and stays out of the datasets record (datasets.json)."""
    import json

    from lora_sweep.data.dataset import datasets_record
    from lora_sweep.job.inputs import read_inputs

    monkeypatch.chdir(tmp_path)
    for folder in ("char", "style", "reg"):
        write_image(tmp_path / folder / "a.png", caption=f"a {folder}")
    (tmp_path / f"{name}.toml").write_text(DROPPED[name], encoding="utf-8")
    cfg = compose_config(f"data.dataset_config={name}.toml")
    report = check_job(cfg)
    assert report.problems == []
    assert [f.line() for f in report.fallbacks if warning in f.line()] == [f.line() for f in report.fallbacks]
    assert len(report.fallbacks) == 1
    inputs = read_inputs(cfg)
    assert [f.line() for f in inputs.fallbacks] == [f.line() for f in report.fallbacks]
    items = [item for scan in inputs.train_scans for item in scan.items]
    record = json.loads(json.dumps(datasets_record(inputs.specs, items)))
    assert "fallbacks" not in record[0] and len(record[0]["subsets"]) == 1

