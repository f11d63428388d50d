"""Datasets through buckets and the shared cache: encode once, reuse across variants, miss exactly what changed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from lora_sweep.data.dataset import scan_folder
from lora_sweep.data.prepare import prepare_examples, truncated_captions
from lora_sweep.job.run import run_job


@pytest.fixture(scope="module")
def parts():
    from lora_sweep.model.loading import load_sdxl, tiny_model_dir

    return load_sdxl(tiny_model_dir())


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Three of the bundled photos with mixed aspect ratios (square, 3:2, ~3:2 portrait crop) in kohya's layout."""
    from lora_sweep.data.photos import photos_dir

    src = photos_dir(Path(os.environ["LORA_SWEEP_CACHE_DIR"])) / "5_photo"
    dst = tmp_path / "data" / "2_photo"
    dst.mkdir(parents=True)
    for name in ["astronaut", "coffee", "chelsea"]:
        shutil.copy(src / f"{name}.png", dst / f"{name}.png")
        shutil.copy(src / f"{name}.txt", dst / f"{name}.txt")
    from PIL import Image

    Image.open(src / "rocket.png").transpose(Image.Transpose.ROTATE_90).save(dst / "rocket_portrait.png")
    return tmp_path / "data"


def prepare(parts, folder: Path, cache: Path, **overrides):
    data_cfg = compose_config("data=folder", f"data.dir={folder}", f"data.cache_dir={cache}", "data.resolution=128",
                              *[f"data.{k}={v}" for k, v in overrides.items()]).data
    return prepare_examples(parts, scan_folder(folder), data_cfg, device=torch.device("cpu"), encode_text=True)


def test_mixed_aspect_ratios_get_their_own_buckets(parts, dataset, tmp_path):
    prepared = prepare(parts, dataset, tmp_path / "cache")
    buckets = {e.item.path.stem: e.bucket for e in prepared.examples}
    assert buckets["astronaut"] == (128, 128)
    assert buckets["coffee"][0] > buckets["coffee"][1]  # landscape
    assert buckets["rocket_portrait"][0] < buckets["rocket_portrait"][1]  # portrait
    for e in prepared.examples:
        assert e.latents.shape == (4, e.bucket[1] // 8, e.bucket[0] // 8)
        oh, ow, top, left, th, tw = e.time_ids.tolist()
        assert (ow, oh) == e.item.size and (tw, th) == e.bucket
    assert sum(prepared.histogram.values()) == 4 * 2  # images x repeats


def test_second_pass_hits_everything_and_an_edited_caption_misses_once(parts, dataset, tmp_path):
    cache = tmp_path / "cache"
    first = prepare(parts, dataset, cache)
    assert first.cache_stats["cache/misses"] == 8 and first.cache_stats["cache/hits"] == 0  # 4 latents + 4 texts
    again = prepare(parts, dataset, cache)
    assert again.cache_stats["cache/misses"] == 0 and again.cache_stats["cache/hits"] == 8
    for a, b in zip(first.examples, again.examples, strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.context, b.context)
    (dataset / "2_photo" / "coffee.txt").write_text("a photo of a cup of tea\n")
    edited = prepare(parts, dataset, cache)
    assert edited.cache_stats["cache/text/misses"] == 1 and edited.cache_stats["cache/latents/misses"] == 0


def test_entries_encoded_at_another_cpu_thread_count_are_not_reused(parts, dataset, tmp_path):
    """On the CPU the encoders' sums split by thread, and kohya encodes at its own run's count: an entry made at
    another count misses, once; the validation seed of an image stays its content key's."""
    cache = tmp_path / "cache"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prepare(parts, dataset, cache)
        torch.set_num_threads(2)
        two = prepare(parts, dataset, cache)
        again = prepare(parts, dataset, cache)
    finally:
        torch.set_num_threads(before)
    assert one.cache_stats["cache/misses"] == 8 and two.cache_stats["cache/misses"] == 8
    assert again.cache_stats["cache/hits"] == 8 and again.cache_stats["cache/misses"] == 0
    for a, b in zip(one.examples, two.examples, strict=True):
        assert a.posteriors[False].key == b.posteriors[False].key


def test_edited_image_and_flip_aug_miss_only_their_latents(parts, dataset, tmp_path):
    cache = tmp_path / "cache"
    prepare(parts, dataset, cache)
    from PIL import Image, ImageOps

    path = dataset / "2_photo" / "chelsea.png"
    ImageOps.invert(Image.open(path).convert("RGB")).save(path)
    edited = prepare(parts, dataset, cache)
    assert edited.cache_stats["cache/latents/misses"] == 1 and edited.cache_stats["cache/text/misses"] == 0
    flipped = prepare(parts, dataset, cache, flip_aug="true")
    assert flipped.cache_stats["cache/latents/misses"] == 4  # one flipped latent per image, originals reused
    assert all(e.latents_flipped is not None for e in flipped.examples)


@pytest.mark.slow
def test_a_second_variant_of_a_sweep_reads_only_the_cache(tmp_path, mlflow_uri, dataset):
    from mlflow.tracking import MlflowClient

    common = ["data=folder", f"data.dir={dataset}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1",
              "train.batch_size=2"]
    first = run_job(compose_config(*common), output_dir=tmp_path / "a")
    second = run_job(compose_config(*common, "noise=multires", "loss=huber_snr", "optimizer=prodigy"),
                     output_dir=tmp_path / "b")
    client = MlflowClient(mlflow_uri)
    misses = lambda run: client.get_metric_history(run.run_id, "cache/misses")[0].value  # noqa: E731
    assert misses(first) == 8 and misses(second) == 0


def test_an_image_whose_pixels_fail_to_decode_is_skipped_counted_and_never_cached(parts, dataset, tmp_path, caplog):
    good = (dataset / "2_photo" / "coffee.png").read_bytes()
    (dataset / "2_photo" / "truncated.png").write_bytes(good[: len(good) // 2])  # header intact, pixels cut
    scan = scan_folder(dataset)
    assert "truncated.png" in [i.path.name for i in scan.items]  # the header-only scan cannot tell
    cache = tmp_path / "cache"
    prepared = prepare_examples(parts, scan, compose_config("data=folder", f"data.dir={dataset}",
                                                            f"data.cache_dir={cache}", "data.resolution=128").data,
                                device=torch.device("cpu"), encode_text=False)
    assert "truncated.png" not in [e.item.path.name for e in prepared.examples]
    assert [p.name for p in scan.skipped] == ["truncated.png"] and len(scan.items) == len(prepared.examples) == 4
    assert "skipping unreadable image" in caplog.text and "truncated.png" in caplog.text
    entries = list((cache / "latents").rglob("*.safetensors"))
    assert len(entries) == 4  # the four readable images only


def test_encoding_names_itself_and_its_cache_and_logs_progress_without_a_terminal(parts, dataset, tmp_path, caplog,
                                                                                   monkeypatch):
    import logging

    monkeypatch.setattr("lora_sweep.progress.EVERY_S", 0.0)  # a line per image (30 s apart in a real run)
    with caplog.at_level(logging.INFO, logger="lora_sweep.progress"):
        prepare(parts, dataset, tmp_path / "cache")  # pytest's stderr is no terminal: log lines, not a bar
    lines = [r.getMessage() for r in caplog.records if r.name == "lora_sweep.progress"]
    name = f"encoding images into {tmp_path / 'cache'}"
    assert lines[0] == f"{name} (4 images)"
    assert lines[1:5] == [f"{name}: {i}/4 images" for i in range(1, 5)]
    assert lines[5].startswith(f"{name}: 4/4 images in ") and len(lines) == 6


def test_reg_images_alone_are_said_to_be_no_train_images_not_decode_failures(parts, tmp_path, monkeypatch):
    """The tester's e3.toml (only an is_reg subset) reaching the encoder: its message names the reg-only dataset,
    not images that failed to decode (none did)."""
    from conftest import write_image

    from lora_sweep.data.dataset import inspect_datasets
    from lora_sweep.data.prepare import prepare_datasets
    from lora_sweep.data.subsets import dataset_specs
    from lora_sweep.errors import UserError

    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "reg" / "r.png", caption="a reg")
    (tmp_path / "e3.toml").write_text("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'reg'\n  is_reg = true\n",
                                      encoding="utf-8")
    cfg = compose_config("data.dataset_config=e3.toml", f"data.cache_dir={tmp_path / 'cache'}")
    specs = dataset_specs(cfg, None)
    scans = inspect_datasets(specs)
    with pytest.raises(UserError) as error:
        prepare_datasets(parts, scans, specs, cfg.data, device=torch.device("cpu"), cache_text=False)
    assert "no train images to train on: no image with repeats >= 1 outside the reg subsets" in str(error.value)
    assert "decode" not in str(error.value)


def test_a_max_token_length_has_its_own_text_entries_of_227_tokens(parts, dataset, tmp_path):
    cache = tmp_path / "cache"
    prepare(parts, dataset, cache)
    longer = prepare(parts, dataset, cache, max_token_length=225)
    assert longer.cache_stats["cache/text/misses"] == 4 and longer.cache_stats["cache/latents/hits"] == 4
    assert {tuple(e.context.shape) for e in longer.examples} == {(227, 32 + 48)}
    assert prepare(parts, dataset, cache, max_token_length=75).cache_stats["cache/text/hits"] == 4  # = null's


def test_captions_over_the_limit_are_counted_in_one_warning(parts, dataset):
    """The tiny tokenizer spells "cat" in 3 tokens: 26 cats are 78 tokens, over 75 and within 150."""
    (dataset / "2_photo" / "coffee.txt").write_text(" ".join(["cat"] * 26))
    (dataset / "2_photo" / "chelsea.txt").write_text(" ".join(["cat"] * 80))
    items = scan_folder(dataset).items
    fallback = truncated_captions(parts.tokenizer, items, None)
    assert fallback.setting == "data.max_token_length" and fallback.count == 2
    assert fallback.line().startswith("data.max_token_length: 2 images with captions over 75 tokens: trained on "
                                      "their first 75, as kohya v0.8.7 does: ")
    assert fallback.line().endswith("Set data.max_token_length=150 or 225 to train on more of them.")
    assert truncated_captions(parts.tokenizer, items, 150).paths == (str(dataset / "2_photo" / "chelsea.png"),)
    assert truncated_captions(parts.tokenizer, items, 225).line().endswith("as kohya v0.8.7 does: "
                                                                          f"'{dataset / '2_photo' / 'chelsea.png'}'.")
    (dataset / "2_photo" / "chelsea.txt").write_text(" ".join(["cat"] * 75))
    assert truncated_captions(parts.tokenizer, scan_folder(dataset).items, 225) is None


ORDER_AT_128 = [("chelsea", (160, 96)), ("coffee", (160, 96)), ("rocket_portrait", (96, 160)),
                ("astronaut", (128, 128))]


def prepare_training(parts, folder: Path, cache: Path, *overrides):
    """prepare_datasets as a run calls it: after set_seed(42), so the samples come from the global stream."""
    from lora_sweep.data.dataset import inspect_datasets
    from lora_sweep.data.prepare import prepare_datasets
    from lora_sweep.data.subsets import dataset_specs
    from lora_sweep.training.train import seed_everything

    cfg = compose_config("data=folder", f"data.dir={folder}", f"data.cache_dir={cache}", "data.resolution=128",
                         *overrides)
    specs = dataset_specs(cfg, folder)
    seed_everything(42)
    return prepare_datasets(parts, inspect_datasets(specs), specs, cfg.data, device=torch.device("cpu"),
                            cache_text=False)


def test_latent_samples_are_drawn_from_the_seeded_global_stream_in_kohyas_caching_order(parts, dataset, tmp_path):
    # v0.8.7 BaseDataset.cache_latents (train_util.py 972-1022): image_data in registration order (sorted paths),
    # stably sorted by bucket area, vae_batch_size 1; cache_batch_latents (2389-2412) draws latent_dist.sample()
    # = mean + std * randn((1, 4, h, w)) per image, then its flip. Areas at 128 px: 160x96 = 96x160 = 15360 first
    # (ties keep the path order), then astronaut's 128x128 = 16384.
    prepared = prepare_training(parts, dataset, tmp_path / "cache", "data.flip_aug=true")
    examples = prepared.examples
    assert [e.item.path.stem for e in examples] == ["astronaut", "chelsea", "coffee", "rocket_portrait"]
    order = sorted(examples, key=lambda e: e.bucket[0] * e.bucket[1])
    assert [(e.item.path.stem, e.bucket) for e in order] == ORDER_AT_128
    torch.manual_seed(42)  # what accelerate's set_seed(42) leaves in the CPU stream
    for e in order:
        for flipped, latents in [(False, e.latents), (True, e.latents_flipped)]:
            mean, std, _ = e.posteriors[flipped]
            expected = mean + std * torch.randn((1, *mean.shape))[0]
            assert torch.equal(latents, expected), (e.item.path.stem, flipped)
    first = order[0].posteriors[False]
    # the mean ignores the stream and reads the same entries
    again = prepare_training(parts, dataset, tmp_path / "cache", "data.flip_aug=true", "data.latent_sample=mean")
    assert again.cache_stats["cache/latents/hits"] == 8 and again.cache_stats["cache/latents/misses"] == 0
    assert torch.equal(next(e for e in again.examples if e.item.path == order[0].item.path).latents, first.mean)
