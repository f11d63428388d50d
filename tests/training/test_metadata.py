"""The dataset keys of a LoRA's metadata, as sd-scripts v0.8.7's train_network.py writes them (docs/datasets.md):
one dataset built from folders (data.dir + data.reg_data_dir) and two built from a dataset config, with the
expected strings worked out by hand from v0.8.7's code."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from conftest import compose_config

from lora_sweep.data.buckets import assign_with_settings, bucket_settings
from lora_sweep.data.dataset import ImageItem
from lora_sweep.data.subsets import DatasetSpec, Subset
from lora_sweep.training.metadata import dataset_metadata, sai_model_spec


@pytest.fixture(scope="module")
def cfg():
    return compose_config("data.resolution=64", "data.flip_aug=true", "data.keep_tokens=1",
                          "data.caption_dropout_rate=0.1", "data.caption_dropout_every_n_epochs=3",
                          "loss.prior_loss_weight=0.5", "train.batch_size=2", "train.grad_accum=3")


def spec(setting="data.dir", resolution=(64, 64), *, enable_bucket=True, batch_size=2, subsets=()):
    return DatasetSpec(setting, resolution, batch_size, enable_bucket, bucket_reso_steps=32, bucket_no_upscale=False,
                       min_bucket_reso=None, max_bucket_reso=None, subsets=subsets)


def entry(subset: Subset, dataset: DatasetSpec, index: int, name: str, size, caption: str, repeats: int | None = None):
    """An image of `subset` with its bucket under the dataset's settings (lora-sweep's own bucket choice)."""
    item = ImageItem(subset.image_dir / name, caption, subset.num_repeats if repeats is None else repeats, size,
                     subset, index)
    return item, assign_with_settings(size, bucket_settings(dataset))[0]


def test_folder_mode_writes_v087s_folder_keys(cfg):
    """15 train entries, reg folder 10_dog x 3 images balanced to 10, 10 and never (the reference's example)."""
    train = Subset(Path("train/5_sks dog"), "data.dir '5_sks dog'", num_repeats=5, class_tokens="sks dog")
    reg = Subset(Path("reg/10_dog"), "data.reg_data_dir '10_dog'", num_repeats=10, is_reg=True, class_tokens="dog")
    dataset = spec()
    entries = [entry(train, dataset, 0, "a.png", (64, 64), "sks dog, Red ball,  grass,"),
               entry(train, dataset, 0, "b.png", (100, 60), "sks dog, red ball"),
               entry(train, dataset, 0, "c.png", (60, 100), "sks dog"),
               entry(reg, dataset, 0, "r1.png", (64, 64), "dog", repeats=10),
               entry(reg, dataset, 0, "r2.png", (80, 64), "dog", repeats=10),
               entry(reg, dataset, 0, "r3.png", (60, 100), "dog", repeats=0)]
    meta = dataset_metadata([dataset], entries, toml_mode=False, cfg=cfg)
    assert meta == {
        "ss_num_train_images": "15",
        "ss_num_reg_images": "30",  # raw: 10 x 3, not the balanced 20
        "ss_caption_dropout_rate": "0.1",
        "ss_caption_dropout_every_n_epochs": "3",
        "ss_caption_tag_dropout_rate": "0.0",
        "ss_face_crop_aug_range": "None",
        "ss_prior_loss_weight": "0.5",
        "lora_sweep_reg_entries": "20",
        "lora_sweep_unused_reg_images": "1",
        "ss_batch_size_per_device": "2",
        "ss_total_batch_size": "6",
        "ss_resolution": "(64, 64)",
        "ss_color_aug": "False",
        "ss_flip_aug": "True",
        "ss_random_crop": "False",
        "ss_shuffle_caption": "False",
        "ss_enable_bucket": "True",
        "ss_bucket_no_upscale": "False",
        "ss_min_bucket_reso": "32",
        "ss_max_bucket_reso": "128",
        "ss_keep_tokens": "1",
        "ss_dataset_dirs": '{"5_sks dog": {"n_repeats": 5, "img_count": 3}}',
        "ss_reg_dataset_dirs": '{"10_dog": {"n_repeats": 10, "img_count": 3}}',
        # split on ",", stripped, lower-cased; the unused reg image counts too
        "ss_tag_frequency": '{"5_sks dog": {"sks dog": 3, "red ball": 2, "grass": 1}, "10_dog": {"dog": 3}}',
        # buckets in (w, h) order with images x repeats (c: 5; a, b: 5 + 5, r1, r2: 10 + 10); the error is the mean
        # |bucket aspect - image aspect| over a, b, c, r1, r2 = (0 + 2/3 + 4/15 + 0 + 1/4) / 5
        "ss_bucket_info": '{"buckets": {"0": {"resolution": [32, 96], "count": 5}, '
                          '"1": {"resolution": [64, 64], "count": 30}}, "mean_img_ar_error": 0.23666666666666666}',
    }


def test_toml_mode_writes_ss_datasets_and_merges_dirs(cfg):
    """Two datasets; the second's "cat" folder is named "cat (2)" and its tags give way to the first's."""
    cat = Subset(Path("data/cat"), "data.datasets[0].subsets[0]", num_repeats=2, keep_tokens_separator="|||",
                 secondary_separator=";;;", enable_wildcard=True, caption_prefix="photo of", flip_aug=True)
    cat_reg = Subset(Path("reg/cat_reg"), "data.datasets[0].subsets[1]", is_reg=True, class_tokens="a cat")
    more_cat = Subset(Path("more/cat"), "data.datasets[1].subsets[0]", num_repeats=3, shuffle_caption=True,
                      keep_tokens=1)
    first = spec("data.datasets[0]", subsets=(cat, cat_reg))
    second = spec("data.datasets[1]", (96, 64), enable_bucket=False, batch_size=1, subsets=(more_cat,))
    entries = [entry(cat, first, 0, "x1.png", (64, 64), "cat ||| red;;;blue, Sitting"),
               entry(cat, first, 0, "x2.png", (90, 60), "cat, {red|blue} hat"),
               entry(cat_reg, first, 0, "z.png", (64, 64), "a cat", repeats=4),  # 1 x 1 balanced up to the 4
               entry(more_cat, second, 1, "y.png", (64, 64), "Cat")]
    meta = dataset_metadata([first, second], entries, toml_mode=True, cfg=cfg)
    subset_keys = ('"color_aug": false, "flip_aug": {flip}, "random_crop": false, "shuffle_caption": {shuffle}, '
                   '"keep_tokens": {keep}, "keep_tokens_separator": {sep}, "secondary_separator": {sec}, '
                   '"enable_wildcard": {wild}, "caption_prefix": {prefix}, "caption_suffix": null')
    datasets = (
        '[{"is_dreambooth": true, "batch_size_per_device": 2, "num_train_images": 4, "num_reg_images": 1, '
        '"resolution": [64, 64], "enable_bucket": true, "min_bucket_reso": 32, "max_bucket_reso": 128, '
        '"tag_frequency": {"cat": {"cat ||| red;;;blue": 1, "sitting": 1, "cat": 1, "{red|blue} hat": 1}, '
        '"cat_reg": {"a cat": 1}}, '
        '"bucket_info": {"buckets": {"0": {"resolution": [64, 64], "count": 8}}, "mean_img_ar_error": '
        '0.16666666666666666}, "subsets": ['
        '{"img_count": 2, "num_repeats": 2, '
        + subset_keys.format(flip="true", shuffle="false", keep=0, sep='"|||"', sec='";;;"', wild="true",
                             prefix='"photo of"')
        + ', "image_dir": "cat", "class_tokens": null, "is_reg": false}, '
        '{"img_count": 1, "num_repeats": 1, '
        + subset_keys.format(flip="false", shuffle="false", keep=0, sep='""', sec="null", wild="false", prefix="null")
        + ', "image_dir": "cat_reg", "class_tokens": "a cat", "is_reg": true}]}, '
        '{"is_dreambooth": true, "batch_size_per_device": 1, "num_train_images": 3, "num_reg_images": 0, '
        '"resolution": [96, 64], "enable_bucket": false, "min_bucket_reso": null, "max_bucket_reso": null, '
        '"tag_frequency": {"cat": {"cat": 1}}, "bucket_info": null, "subsets": ['
        '{"img_count": 1, "num_repeats": 3, '
        + subset_keys.format(flip="false", shuffle="true", keep=1, sep='""', sec="null", wild="false", prefix="null")
        + ', "image_dir": "cat", "class_tokens": null, "is_reg": false}]}]'
    )
    assert meta == {
        "ss_num_train_images": "7",
        "ss_num_reg_images": "1",
        "ss_caption_dropout_rate": "0.1",  # data.*, not the subsets' values
        "ss_caption_dropout_every_n_epochs": "3",
        "ss_caption_tag_dropout_rate": "0.0",
        "ss_face_crop_aug_range": "None",
        "ss_prior_loss_weight": "0.5",
        "lora_sweep_reg_entries": "4",
        "lora_sweep_unused_reg_images": "0",
        "ss_datasets": datasets,
        "ss_tag_frequency": '{"cat": {"cat ||| red;;;blue": 1, "sitting": 1, "cat": 1, "{red|blue} hat": 1}, '
                            '"cat_reg": {"a cat": 1}}',
        "ss_dataset_dirs": '{"cat": {"n_repeats": 2, "img_count": 2}, "cat (2)": {"n_repeats": 3, "img_count": 1}}',
    }
    assert json.loads(meta["ss_datasets"])[1]["subsets"][0]["image_dir"] == "cat"  # the basename, as v0.8.7


def test_the_model_spec_names_the_resolution_date_and_prediction_type(cfg):
    """v0.8.7's build_metadata writes these three on every save: "WxH", the local date to the second, epsilon or v."""
    spec = sai_model_spec(cfg, now=86400.7)
    assert (spec["modelspec.resolution"], spec["modelspec.prediction_type"]) == ("64x64", "epsilon")
    assert "." not in spec["modelspec.date"]  # whole seconds, local time without an offset
    assert datetime.datetime.fromisoformat(spec["modelspec.date"]).timestamp() == 86400


def test_the_kohya_dataset_config_fixture_as_scanned_and_balanced(tmp_path, monkeypatch):
    """The dataset config fixture read, scanned and balanced as a job does (no training): 30 train entries, 3 reg
    images of 1 repeat (raw 3, balanced to 10 each), tags counted from the raw captions (the unprocessed |||, ;;; and
    {red|blue} kept; the reg image without a caption counted as its class token)."""
    from kohya_dataset import write_kohya_dataset

    from lora_sweep.checks import preflight

    toml = write_kohya_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    job_cfg = compose_config("data=folder", "data.dir=null", f"data.dataset_config={toml}")
    specs, scans = preflight.training_scans(job_cfg, None)
    entries = [(item, assign_with_settings(item.size, bucket_settings(specs[item.dataset]))[0])
               for scan in scans for item in scan.items]
    meta = dataset_metadata(specs, entries, toml_mode=True, cfg=job_cfg)
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["lora_sweep_reg_entries"]) == ("30", "3", "30")
    assert meta["ss_dataset_dirs"] == ('{"char": {"n_repeats": 10, "img_count": 2}, '
                                       '"style": {"n_repeats": 5, "img_count": 2}}')
    assert meta["ss_tag_frequency"] == (
        '{"char": {"sks girl": 1, "red hair ||| smiling": 1, "outdoors;;;sunny": 1, "park": 1, '
        '"sks girl ||| sitting": 1, "{red|blue} dress": 1}, '
        '"style": {"watercolor": 2, "landscape": 1, "river": 1, "portrait;;;soft light": 1}, '
        '"girl": {"girl": 3, "standing": 1, "sitting": 1}}')
    (dataset,) = json.loads(meta["ss_datasets"])
    assert dataset["bucket_info"] == {"buckets": {"0": {"resolution": [64, 64], "count": 60}}, "mean_img_ar_error": 0.0}
    assert [(s["image_dir"], s["num_repeats"], s["img_count"], s["is_reg"], s["class_tokens"], s["keep_tokens"],
             s["flip_aug"], s["keep_tokens_separator"], s["secondary_separator"]) for s in dataset["subsets"]] == [
        ("char", 10, 2, False, "sks girl", 1, False, "|||", ";;;"),
        ("style", 5, 2, False, None, 0, True, "|||", ";;;"),
        ("girl", 1, 3, True, "girl", 0, False, "|||", ";;;")]


def test_a_reg_subset_before_a_train_subset_keeps_file_order_in_the_metadata(tmp_path, monkeypatch):
    """v0.8.7 lists subsets in file order in ss_datasets and ss_tag_frequency; only its image registration puts the
    train images first (the order the scans give the items)."""
    from conftest import write_image

    from lora_sweep.checks import preflight

    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "reg" / "r.png", caption="a reg")
    write_image(tmp_path / "char" / "c.png", caption="a char")
    (tmp_path / "ds.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'reg'\nis_reg = true\n"
                                      "[[datasets.subsets]]\nimage_dir = 'char'\n", encoding="utf-8")
    job_cfg = compose_config("data.dataset_config=ds.toml")
    specs, scans = preflight.training_scans(job_cfg, None)
    assert [s.image_dir.name for s in specs[0].subsets] == ["reg", "char"]
    assert [item.path.name for scan in scans for item in scan.items] == ["c.png", "r.png"]
    entries = [(item, assign_with_settings(item.size, bucket_settings(specs[0]))[0])
               for scan in scans for item in scan.items]
    meta = dataset_metadata(specs, entries, toml_mode=True, cfg=job_cfg)
    assert list(json.loads(meta["ss_tag_frequency"])) == ["reg", "char"]
    assert [s["image_dir"] for s in json.loads(meta["ss_datasets"])[0]["subsets"]] == ["reg", "char"]
