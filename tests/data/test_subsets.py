"""kohya's datasets and subsets from the config: folder mode, data.datasets and a dataset config file read as
sd-scripts v0.8.7 reads it (types, levels, precedence, refusals with file and line), and v0.8.7's reg balancing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from kohya_dataset import write_kohya_dataset

from lora_sweep.checks.validate import config_problems
from lora_sweep.data.subsets import Subset, balance_reg, dataset_problems, dataset_specs
from lora_sweep.errors import ConfigError


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The fixture dataset (tests/data/kohya_dataset.toml and its images) in the working folder."""
    monkeypatch.chdir(tmp_path)
    write_kohya_dataset(tmp_path)
    return tmp_path


def toml(folder: Path, text: str, name: str = "ds.toml") -> str:
    """A dataset config file `name` in `folder`: its path, for data.dataset_config."""
    (folder / name).write_text(text, encoding="utf-8")
    return str(folder / name)


def problems_of(*overrides: str) -> list[str]:
    return dataset_problems(compose_config(*overrides), None)


# --- balance_reg: v0.8.7's loop (TU:DreamBoothDataset.__init__ L1572-1638), the reference's verified examples


def test_balance_reg_examples_of_the_reference():
    assert balance_reg(15, [10, 10, 10]) == [10, 10, 0]  # total 20: the first pass overshoots, the third unused
    assert balance_reg(40, [1, 1, 1]) == [14, 13, 13]  # later passes add one each, round-robin, to exactly 40
    assert balance_reg(40, []) == []


def test_balance_reg_runs_when_reg_outnumbers_train_and_not_without_train():
    assert balance_reg(2, [1, 1, 1, 1, 1]) == [1, 1, 0, 0, 0]  # v0.8.7 warns "some of reg images are not used"
    assert balance_reg(7, [3, 2]) == [4, 3]
    assert balance_reg(0, [3, 3]) == [0, 0]  # `while n < 0` never runs


# --- folder mode: today's behaviour


def test_folder_mode_is_one_dataset_from_the_data_keys(tmp_path):
    cfg = compose_config("data.keep_tokens=2", "data.shuffle_caption=true", "data.caption_dropout_rate=0.25",
                         "train.batch_size=3", f"data.reg_data_dir={tmp_path}")
    [spec] = dataset_specs(cfg, tmp_path / "train")
    assert (spec.setting, spec.resolution, spec.batch_size, spec.subsets) == ("data.dir", (64, 64), 3, ())
    assert (spec.enable_bucket, spec.bucket_reso_steps, spec.min_bucket_reso, spec.max_bucket_reso) == (True, 32,
                                                                                                         None, None)
    assert spec.folders == ((tmp_path / "train", False), (tmp_path, True))
    assert spec.template == Subset(image_dir=tmp_path / "train", setting="data.dir", keep_tokens=2,
                                   shuffle_caption=True, caption_dropout_rate=0.25)


def test_folder_mode_without_a_folder_has_no_dataset():
    assert dataset_specs(compose_config(), None) == []


def test_a_bad_data_resolution_is_named_once(tmp_path):
    expected = ["data.resolution: 'big' is not a resolution. Give an int (1024 means 1024x1024), a string 'W,H' such "
                "as '832,1216', or a list [W, H] of positive ints."]
    assert dataset_problems(compose_config("data.resolution=big"), tmp_path) == expected
    subsets = f"subsets: [{{image_dir: {tmp_path}}}]"
    assert problems_of("data.resolution=big", f"data.datasets=[{{{subsets}}}, {{{subsets}}}]") == expected
    assert config_problems(compose_config("data.resolution=big")) == expected


# --- a dataset config file (tests/data/kohya_dataset.toml)


def test_the_fixture_file_resolves_subset_dataset_general_then_data_keys(work):
    cfg = compose_config(f"data.dataset_config={work / 'kohya_dataset.toml'}", "data.caption_prefix=masterpiece")
    [spec] = dataset_specs(cfg, None)
    assert (spec.resolution, spec.batch_size, spec.min_bucket_reso, spec.max_bucket_reso) == ((64, 64), 2, 32, 128)
    char, style, reg = spec.subsets
    where = f"data.dataset_config '{work / 'kohya_dataset.toml'}' line"
    assert [s.setting for s in spec.subsets] == [f"{where} 20", f"{where} 26", f"{where} 34"]
    assert [s.image_dir for s in spec.subsets] == [work / "train/char", work / "train/style", work / "reg/girl"]
    assert [(s.num_repeats, s.is_reg, s.class_tokens) for s in spec.subsets] == [
        (10, False, "sks girl"), (5, False, None), (1, True, "girl")]
    assert [s.shuffle_caption for s in spec.subsets] == [True, True, False]  # [general], then the subset's false
    assert [s.caption_dropout_rate for s in spec.subsets] == [0.1, 0.0, 0.1]  # an explicit 0.0 overrides [general]
    assert (char.keep_tokens, char.keep_tokens_separator, char.secondary_separator) == (1, "|||", ";;;")
    assert (style.caption_dropout_every_n_epochs, style.caption_tag_dropout_rate, style.flip_aug) == (2, 0.2, True)
    assert {s.caption_prefix for s in spec.subsets} == {"masterpiece"}  # from data.*, set nowhere in the file
    assert {s.caption_separator for s in spec.subsets} == {","}  # data.caption_separator, never a file key
    assert spec.fallbacks == ()


def test_file_types_are_exact_and_each_problem_names_its_line(tmp_path):
    path = toml(tmp_path, "[general]\ncaption_dropout_rate = 1\ntoken_warmup_step = 2\n\n[[datasets]]\n"
                          "resolution = 64.0\nnetwork_multiplier = 1\nbatch_size = 2.5\n\n  [[datasets.subsets]]\n"
                          "  image_dir = '.'\n  num_repeats = 1.0\n  shuffle_caption = 1\n")
    assert problems_of(f"data.dataset_config={path}") == [
        f"data.dataset_config '{path}' line 6: datasets[0].resolution: must be an int or [width, height] ints, got "
        "64.0 (write 64: v0.8.7 checks the type exactly, and 64.0 is a float).",
        f"data.dataset_config '{path}' line 7: datasets[0].network_multiplier: must be a float, got 1 (write 1.0: "
        "v0.8.7 checks the type exactly, and 1 is an int).",
        f"data.dataset_config '{path}' line 8: datasets[0].batch_size: must be an int, got 2.5.",
        f"data.dataset_config '{path}' line 12: datasets[0].subsets[0].num_repeats: must be an int, got 1.0 (write "
        "1: v0.8.7 checks the type exactly, and 1.0 is a float).",
        f"data.dataset_config '{path}' line 13: datasets[0].subsets[0].shuffle_caption: must be true or false, got "
        "1."]


def test_keys_v087_refuses_in_the_file_say_where_they_go(tmp_path):
    path = toml(tmp_path, "datasets_ = 1\n[general]\ncaption_separator = ';'\nprior_loss_weight = 0.5\n"
                          "[[datasets]]\nis_reg = true\nkeep_token = 1\n[[datasets.subsets]]\nmetadata_file = 'm.json'"
                          "\nbatch_size = 1\nconditioning_data_dir = 'c'\n")
    found = "\n".join(problems_of(f"data.dataset_config={path}"))
    assert "line 1: datasets_: unknown top-level key" in found
    assert "line 3: general.caption_separator: not a dataset-config key (v0.8.7 refuses it there); set " \
           "data.caption_separator" in found
    assert "line 4: general.prior_loss_weight: not a dataset-config key (v0.8.7 refuses it there); set " \
           "loss.prior_loss_weight" in found
    assert "line 6: datasets[0].is_reg: only a subset ([[datasets.subsets]]) takes is_reg" in found
    assert "line 7: datasets[0].keep_token: unknown key in a dataset ([[datasets]]); did you mean 'keep_tokens'?" \
        in found
    assert "line 9: datasets[0].subsets[0].metadata_file: fine-tuning datasets (metadata_file) are not supported " \
           "by lora-sweep" in found
    assert "line 10: datasets[0].subsets[0].batch_size: a dataset key" in found
    assert "line 11: datasets[0].subsets[0].conditioning_data_dir: ControlNet" in found
    assert "line 8: datasets[0].subsets[0]: image_dir is required" in found


@pytest.mark.parametrize("line, fix", [("random_crop = true", "remove it or set it to false"),
                                       ("color_aug = true", "remove it or set it to false"),
                                       ("face_crop_aug_range = [2.0, 3.0]", "remove it")])  # a range is never false
def test_per_step_pixel_augmentations_are_refused_by_name(tmp_path, line, fix):
    path = toml(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '.'\n{line}\n")
    [problem] = problems_of(f"data.dataset_config={path}")
    assert problem == (f"data.dataset_config '{path}' line 4: datasets[0].subsets[0].{line.split()[0]}: needs the "
                       f"pixels encoded at every step, which lora-sweep (like kohya with cached latents) does not do; "
                       f"{fix}.")


def test_an_unknown_top_level_table_names_its_line(tmp_path):
    """The tester's bad2.toml ends with `[foo]` / `x = 1`: the problem names the header's line."""
    path = toml(tmp_path, "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '.'\n[foo]\nx = 1\n")
    assert problems_of(f"data.dataset_config={path}") == [
        f"data.dataset_config '{path}' line 4: foo: unknown top-level key; a dataset config holds only [general] and "
        "[[datasets]] (with [[datasets.subsets]])."]


def test_a_json_file_and_unreadable_files(tmp_path):
    content = {"general": {"caption_extension": "caption"},
               "datasets": [{"resolution": [64, 96], "subsets": [{"image_dir": str(tmp_path)}]}]}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    [spec] = dataset_specs(compose_config(f"data.dataset_config={path}"), None)
    assert spec.resolution == (64, 96) and spec.subsets[0].caption_extension == ".caption"  # kohya adds the dot
    assert spec.subsets[0].setting == f"data.dataset_config '{path}' datasets[0].subsets[0]"
    path.write_text('{"datasets": [}')
    assert problems_of(f"data.dataset_config={path}") == [
        f"data.dataset_config '{path}' line 1: not valid JSON: Expecting value."]
    bad = toml(tmp_path, "[[datasets]\n")
    assert problems_of(f"data.dataset_config={bad}")[0].startswith(f"data.dataset_config '{bad}': cannot be read as "
                                                                    "TOML: ")
    for other in (tmp_path / "ds.yaml", tmp_path / "missing.toml"):
        [problem] = problems_of(f"data.dataset_config={other}")
        assert problem.startswith(f"data.dataset_config '{other}': ")


def test_dropped_subsets_and_cache_info_are_fallbacks_not_silence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    path = toml(tmp_path, "[general]\ncache_info = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n"
                          "[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 3\n[[datasets.subsets]]\n"
                          "image_dir = './a'\nnum_repeats = 0\n[[datasets.subsets]]\nimage_dir = './a'\n")
    [spec] = dataset_specs(compose_config(f"data.dataset_config={path}"), None)
    # 'a' and './a' are two subsets: kohya compares image_dir as written
    assert [s.setting.split(" line ")[1] for s in spec.subsets] == ["4", "12"]
    lines = [f.line() for f in spec.fallbacks]
    name = f"data.dataset_config '{path}'"
    assert lines == [
        f"{name}: 1 cache_info setting without effect (lora-sweep reads every image and caption itself and caches by "
        "content): 'line 2: general.cache_info'.",
        f"{name} line 6: 1 subset not used: an earlier subset of this dataset has the same image_dir (as kohya, the "
        "first one wins): 'a'.",
        f"{name} line 9: 1 subset not used: num_repeats < 1 (as kohya): './a'."]


# --- data.datasets: the same tables from the config


def test_data_datasets_take_yaml_ints_for_floats_and_fall_back_to_data_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reg").mkdir()
    cfg = compose_config(f"data.datasets=[{{network_multiplier: 1, subsets: [{{image_dir: {tmp_path}, num_repeats: 2,"
                         " caption_dropout_rate: 1}, {image_dir: reg, is_reg: true}]}, {resolution: [32, 64], "
                         "batch_size: 4, keep_tokens: 1, subsets: [{image_dir: '~'}]}]",
                         "train.batch_size=3", "data.flip_aug=true")
    first, second = dataset_specs(cfg, None)
    assert (first.setting, first.network_multiplier, first.batch_size, first.resolution) == (
        "data.datasets[0]", 1.0, 3, (64, 64))
    assert [(s.setting, s.image_dir, s.num_repeats, s.is_reg, s.caption_dropout_rate, s.flip_aug)
            for s in first.subsets] == [("data.datasets[0].subsets[0]", tmp_path, 2, False, 1.0, True),
                                        ("data.datasets[0].subsets[1]", tmp_path / "reg", 1, True, 0.0, True)]
    assert (second.batch_size, second.resolution, second.subsets[0].keep_tokens) == (4, (32, 64), 1)
    assert second.subsets[0].image_dir == Path.home()


def test_mode_conflicts_are_refused_not_ignored(tmp_path):
    datasets = f"data.datasets=[{{subsets: [{{image_dir: {tmp_path}}}]}}]"
    path = toml(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path}'\n")
    found = problems_of(datasets, f"data.dataset_config={path}", f"data.dir={tmp_path}",
                        f"data.reg_data_dir={tmp_path}", "data.random_crop=true")
    assert [p.split(" ")[0] for p in found] == ["data.datasets", "data.dir:", "data.reg_data_dir:", "data.random_crop:"]
    assert "give the reg images as a subset with is_reg = true" in found[2]


def test_dataset_specs_raises_every_problem_at_once():
    with pytest.raises(ConfigError) as raised:
        dataset_specs(compose_config("data.datasets=[{batch_size: 0, subsets: [{image_dir: /nonexistent/a, "
                                     "caption_tag_dropout_rate: 2, token_warmup_min: 0}]}]"), None)
    assert str(raised.value).splitlines() == [
        "data.datasets[0].batch_size: must be >= 1, got 0.",
        "data.datasets[0].subsets[0].caption_tag_dropout_rate: must be in [0, 1], got 2.0.",
        "data.datasets[0].subsets[0].token_warmup_min: must be >= 1, got 0.",
        "data.datasets[0].subsets[0].image_dir: '/nonexistent/a' is not an existing folder (a relative path is read "
        "from the folder the command was started in)."]


def test_a_datasets_bucket_sizes_are_checked_as_v087_asserts_them(tmp_path):
    subsets = f"subsets: [{{image_dir: {tmp_path}}}]"
    assert problems_of(f"data.datasets=[{{resolution: [64, 96], min_bucket_reso: 80, max_bucket_reso: 64, {subsets}}}, "
                       f"{{enable_bucket: false, min_bucket_reso: 128, {subsets}}}]") == [
        "data.datasets[0]: min_bucket_reso (80) is larger than max_bucket_reso (64).",
        "data.datasets[0]: max_bucket_reso (64) is smaller than the resolution 64x96; it must be >= both sides.",
        "data.datasets[0]: min_bucket_reso (80) is larger than the shorter side of the resolution 64x96."]


# --- validate: the data.* values, and the command's exit status


@pytest.mark.parametrize("override,field", [
    ("data.caption_dropout_rate=1.5", "data.caption_dropout_rate"),
    ("data.caption_tag_dropout_rate=-0.1", "data.caption_tag_dropout_rate"),
    ("data.caption_dropout_every_n_epochs=-1", "data.caption_dropout_every_n_epochs"),
    ("data.token_warmup_min=0", "data.token_warmup_min"),
    ("data.token_warmup_step=-1", "data.token_warmup_step"),
    ("data.reg_data_dir=/nonexistent/reg", "data.reg_data_dir"),
    ("loss.prior_loss_weight=-1", "loss.prior_loss_weight"),
    ("loss.prior_loss_weight=inf", "loss.prior_loss_weight"),
    ("data.color_aug=true", "data.color_aug"),
])
def test_validate_names_each_bad_data_value(override, field):
    assert [p for p in config_problems(compose_config(override)) if p.startswith(field)], override


def test_validate_passes_the_fixture_file(work):
    assert config_problems(compose_config(f"data.dataset_config={work / 'kohya_dataset.toml'}")) == []


@pytest.fixture
def sweep(tmp_path, monkeypatch, capfd):
    """`run(*argv)` -> (exit status, output) of `python sweep.py *argv`, run in this process (as tests/test_preflight.py
    does: a subprocess costs seconds of imports) from tmp_path/work, with its own cache and MLflow store."""
    import logging
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LORA_SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*argv: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["sweep.py", *argv])
        code = 0
        try:
            runpy.run_path(str(ROOT / "sweep.py"), run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code
        finally:
            GlobalHydra.instance().clear()
        captured = capfd.readouterr()
        return code, captured.out + captured.err

    yield run
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_command_exits_2_naming_the_setting(tmp_path, sweep):
    path = toml(tmp_path, "[[datasets]]\nnetwork_multiplier = 1\n[[datasets.subsets]]\nimage_dir = '.'\n")
    code, output = sweep(f"data.dataset_config={path}")
    expected = (f"data.dataset_config '{path}' line 2: datasets[0].network_multiplier: must be a float, got 1 (write "
                "1.0: v0.8.7 checks the type exactly, and 1 is an int).")
    assert code == 2 and expected in output, output[-2000:]
    code, output = sweep("data.datasets=[{subsets: [{image_dir: ., random_crop: true}]}]")
    assert code == 2 and "data.datasets[0].subsets[0].random_crop: needs the pixels encoded at every step" in output, \
        output[-2000:]


def test_an_empty_image_dir_is_a_warning_and_a_missing_one_a_problem(tmp_path, monkeypatch):
    """v0.8.7 skips a subset without images, with a warning: so does lora-sweep, training on the others."""
    from conftest import write_image

    from lora_sweep.checks.preflight import check_job

    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "char" / "a.png", caption="a char")
    (tmp_path / "emptydir").mkdir()
    path = toml(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'char'\n[[datasets.subsets]]\n"
                          "image_dir = 'emptydir'\n")
    report = check_job(compose_config(f"data.dataset_config={path}"))
    assert report.problems == []
    assert [f.line() for f in report.fallbacks] == [
        f"data.dataset_config '{path}' line 4: 1 subset without an image directly in image_dir (subfolders are not "
        f"scanned): not used: '{tmp_path / 'emptydir'}'. Put images in image_dir, or "
        "remove the subset."]
    Path(path).write_text(Path(path).read_text().replace("emptydir", "gone"))
    [problem] = check_job(compose_config(f"data.dataset_config={path}")).problems
    assert problem.startswith(f"data.dataset_config '{path}' line 5: datasets[0].subsets[1].image_dir: 'gone' is not "
                              "an existing folder")
