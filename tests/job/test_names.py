"""Job names that do not grow with override values, and the files a job leaves in its sweep folder."""

from __future__ import annotations

from conftest import compose_config

from lora_sweep.job import names, status

LONG = "sampling.negative=" + "blurry, low quality/ " * 100  # 2,000+ characters with '/' in it


def test_run_label_names_the_variant_and_the_swept_values_only():
    assert names.run_label(None, ["noise=multires", "loss=huber_snr"]) == "noise=multires loss=huber_snr"
    assert names.run_label("v57", ["experiment=v57", "train.max_steps=2"]) == "v57"
    swept = ["experiment", "noise"]
    assert names.run_label("v57", ["experiment=v57", "noise=ip", "train.max_steps=2"], swept) == "v57 noise=ip"
    assert names.run_label(None, ["hydra.launcher.cpu_slots=2", "tracking.experiment=x"]) == "default"
    long_label = names.run_label(None, [LONG, "loss.huber_c=0"], ["sampling.negative", "loss.huber_c"])
    assert len(long_label) <= names.LABEL_CHARS and "loss.huber_c=0" in long_label
    assert long_label.endswith(f"#{names.short_hash(' '.join([LONG, 'loss.huber_c=0']))}")
    many = [f"train.seed={i}" for i in range(40)]
    assert len(names.run_label(None, many)) <= names.LABEL_CHARS


def test_swept_keys_come_from_hydras_own_override_grammar():
    task = ["loss.huber_c=0,0.1", "experiment=glob(v*)", "+x=range(3)", "noise=[a,b]", "train.max_steps=2"]
    assert names.swept_keys(task) == ["loss.huber_c", "experiment", "x"]


def test_job_folder_is_number_and_run_name_whatever_the_values(tmp_path):
    names.write_swept_keys(tmp_path, ["sampling.negative", "loss.huber_c"])
    name = names.job_dir_name(7, None, [LONG, "loss.huber_c=0", "train.max_steps=2"], str(tmp_path))
    assert name.startswith("7_sampling.negative=") and len(name) <= 2 + names.FOLDER_SLUG and "/" not in name
    assert names.job_dir_name(3, "v57", ["experiment=v57"], None) == "3_v57"
    assert names.job_dir_name(0, None, [], None) == "0_default"


def test_a_cut_run_name_and_its_folder_carry_the_same_hash(tmp_path):
    """The run `... #89d2cf51` lives in the folder `<num>_...-89d2cf51` (they once carried different hashes)."""
    names.write_swept_keys(tmp_path, ["sampling.negative", "loss.huber_c"])
    overrides = [LONG, "loss.huber_c=0", "train.max_steps=2", "hydra.launcher.cpu_slots=2"]
    label = names.run_label(None, overrides, ["sampling.negative", "loss.huber_c"])
    tag = label.rsplit(" #", 1)[1]
    folder = names.job_dir_name(7, None, overrides, str(tmp_path))
    assert folder.endswith(f"-{tag}") and len(folder) <= 2 + names.FOLDER_SLUG and "/" not in folder
    # an uncut name only loses its unsafe characters: no hash the run name does not have
    names.write_swept_keys(tmp_path / "b", ["experiment", "noise"])
    assert names.run_label("v57", ["experiment=v57", "noise=ip"], ["experiment", "noise"]) == "v57 noise=ip"
    assert names.job_dir_name(1, "v57", ["experiment=v57", "noise=ip"], str(tmp_path / "b")) == "1_v57_noise=ip"


def test_the_sweep_config_names_job_folders_through_the_resolver(tmp_path):
    from conftest import ROOT
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["loss.huber_c=0.1"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = 4
        cfg.hydra.sweep.dir = str(tmp_path)
        cfg.hydra.overrides.task = [LONG, "loss.huber_c=0.1"]
    names.write_swept_keys(tmp_path, ["loss.huber_c"])
    assert OmegaConf.select(cfg, "hydra.sweep.subdir") == "4_loss.huber_c=0.1"


def test_a_jobs_label_is_its_experiments_variant_or_its_overrides():
    cfg = compose_config("experiment=v57")
    assert names.run_label(cfg.tracking.variant, ["experiment=v57"]) == "v57"
    assert names.run_label(compose_config().tracking.variant, ["noise=ip", "tracking.uri=x"]) == "noise=ip"


def test_a_jobs_status_file_is_where_its_launcher_says_else_in_its_sweep_folder(tmp_path, monkeypatch):
    from hydra_plugins._job_outcome import STATUS_ENV, read_statuses

    monkeypatch.delenv(STATUS_ENV, raising=False)
    assert status.status_file_path(None, None) is None  # a single run nobody watches
    assert status.status_file_path(tmp_path, 2) == tmp_path / ".job_status" / "2.json"  # e.g. under Ray
    job = status.StatusFile("x", status.status_file_path(tmp_path, 2))
    job.update(force=True, state="skipped", run_id="r0", reason="already FINISHED")
    assert read_statuses(tmp_path) == {2: {"state": "skipped", "label": "x", "run_id": "r0",
                                           "reason": "already FINISHED"}}
    monkeypatch.setenv(STATUS_ENV, str(tmp_path / "given.json"))
    assert status.status_file_path(tmp_path, 2) == tmp_path / "given.json"


def test_a_single_runs_name_and_bar_leave_out_where_it_runs_and_saves(tmp_path, monkeypatch):
    overrides = ["data=folder", f"data.dir={tmp_path / 'ds'}", "train.device=cpu", f"train.state_dir={tmp_path}/s",
                 f"data.cache_dir={tmp_path}/c", f"train.output_dir={tmp_path}/o", "train.save_every=50",
                 "network.rank=8", "tracking.uri=sqlite:///x.db", "hydra.run.dir=/tmp/x"]
    label = names.run_label(None, overrides)
    assert label.startswith("data=folder data.dir=") and " network.rank=8 #" in label  # a long path is cut
    assert not any(key in label for key in ("device", "state_dir", "cache_dir", "output_dir", "save_every", "uri"))
    monkeypatch.setattr("lora_sweep.progress.on_terminal", lambda: True)  # a bar, as in a terminal
    sink = status.JobSink(None, status.StatusFile(label), label)  # run_job gives the bar the run's name
    assert sink.bar.desc == label
    sink.bar.close()
