"""Buckets against values worked out by hand from kohya sd-scripts v0.8.7's algorithm (arithmetic in the comments)."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
from PIL import Image

from lora_sweep.data import buckets
from lora_sweep.errors import ConfigError, UserError


def test_bucket_set_base_512_steps_64_by_hand():
    # max_area = 512*512 = 262144; square = floor(512/64)*64 = 512.
    # width w -> height min(1024, floor((262144 // w) / 64) * 64):
    #  256: 1024 -> 1024 | 320: 819 -> 768 | 384: 682 -> 640 | 448: 585 -> 576 | 512: 512 -> 512
    #  576: 455 -> 448   | 640: 409 -> 384 | 704: 372 -> 320 | 768: 341 -> 320 | 832: 315 -> 256
    #  896: 292 -> 256   | 960: 273 -> 256 | 1024: 256 -> 256
    # each (w, h) and (h, w) added; the set sorted.
    expected = [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
        (1024, 256),
    ]
    assert list(buckets.make_bucket_resolutions((512, 512), 256, 1024, 64)) == expected


def test_bucket_set_2048_steps_32_has_113_buckets():
    # max_area = 2048^2 = 4194304. Every width w in 256..2048 (57 widths, step 32) has 4194304 // w >= 2048, so
    # height = min(2048, ...) = 2048: buckets (w, 2048) and (2048, w); 57 + 57 - 1 (2048x2048 twice) = 113.
    resos = list(buckets.make_bucket_resolutions((2048, 2048), 256, 2048, 32))
    assert len(resos) == 113
    assert resos == sorted(resos)
    assert all(2048 in r for r in resos)
    assert resos[0] == (256, 2048) and resos[-1] == (2048, 2048)


BASE_512 = dict(resolution=512, reso_steps=64, min_reso=256, max_reso=1024)


@pytest.mark.parametrize(
    "size, expected",
    [
        # equal to the base area and itself a bucket: kept, scale 1.
        ((512, 512), ((512, 512), (512, 512))),
        # exact match wins: 704x320 is a bucket.
        ((704, 320), ((704, 320), (704, 320))),
        # larger, odd: ar = 1001/777 = 1.28829; nearest bucket ar: 576/448 = 1.28571 (|err| 0.0026; 640/384 = 1.667,
        # 512/512 = 1). Image wider than bucket -> scale = 448/777; w = 1001*448/777 = 577.15 -> int(577.65) = 577;
        # h = int(448.5) = 448.
        ((1001, 777), ((576, 448), (577, 448))),
        # smaller (60501 px < 262144), odd: ar = 201/301 = 0.66777; 384/640 = 0.6 (err 0.068) beats 448/576 = 0.778
        # (err 0.110). Wider than bucket -> scale = 640/301; w = 201*640/301 = 427.38 -> 427; h = 640. Upscales.
        ((201, 301), ((384, 640), (427, 640))),
        # ar 300/500 = 0.6 equals 384/640: not wider -> scale = 384/300 = 1.28 -> (384, 640). Upscales.
        ((300, 500), ((384, 640), (384, 640))),
    ],
)
def test_assign_bucket_predefined_mode(size, expected):
    assert buckets.assign_bucket(*size, no_upscale=False, **BASE_512) == expected


@pytest.mark.parametrize(
    "size, expected",
    [
        # smaller than the base area: no resize; bucket = size rounded down to 64: 300-44, 500-52.
        ((300, 500), ((256, 448), (300, 500))),
        ((333, 257), ((320, 256), (333, 257))),
        # equal area (not larger): no resize.
        ((512, 512), ((512, 512), (512, 512))),
        # larger, odd: ar = 1001/777 = 1.288288; rw = sqrt(262144*ar) = 581.13, rh = 262144/rw = 451.09.
        # A: round(581.13) = 581 -> 576; 576/ar = 447.1 -> 447 -> 384; ar_A = 1.5 (err 0.2117).
        # B: round(451.09) = 451 -> 448; 448*ar = 577.15 -> 577 -> 576; ar_B = 1.2857 (err 0.0026) -> B wins:
        # resized = (int(448*ar + 0.5), 448) = (577, 448); bucket = (577 - 1, 448).
        ((1001, 777), ((576, 448), (577, 448))),
        # larger, odd: ar = 1500/1001 = 1.4985; rw = sqrt(262144*ar) = 626.75, rh = 418.26.
        # A: 627 -> 576; 576/ar = 384.38 -> 384 -> 384; ar_A = 1.5 (err 0.0015).
        # B: 418 -> 384; 384*ar = 575.4 -> 575 -> 512; ar_B = 1.333 (err 0.165) -> A wins:
        # resized = (576, int(576/ar + 0.5) = int(384.88) = 384).
        ((1500, 1001), ((576, 384), (576, 384))),
    ],
)
def test_assign_bucket_no_upscale_mode(size, expected):
    assert buckets.assign_bucket(*size, no_upscale=True, **BASE_512) == expected


def test_article_setting_2048_steps_32():
    settings = dict(resolution=2048, reso_steps=32, min_reso=256, max_reso=2048)
    # Mode (a): buckets are (w, 2048)/(2048, w). ar = 1000/1500 = 0.6667 -> w ~ 1365.3: 1376/2048 = 0.671875
    # (err 0.0052) beats 1344/2048 = 0.65625 (err 0.0104). Not wider -> scale = 1376/1000 = 1.376:
    # (1376, int(2064 + 0.5)) = (1376, 2064), cropped 8 px top and bottom.
    assert buckets.assign_bucket(1000, 1500, no_upscale=False, **settings) == ((1376, 2048), (1376, 2064))
    # Mode (b), larger than 2048^2: ar 1.5, rw = sqrt(4194304*1.5) = 2508.28, rh = 1672.19.
    # A: 2508 -> 2496, 2496/1.5 = 1664 -> 1664 (ar 1.5). B: 1672 -> 1664, 1664*1.5 = 2496 (ar 1.5). Tie -> B:
    # (int(1664*1.5 + 0.5), 1664) = (2496, 1664). max_bucket_reso (2048) does not apply in this mode.
    assert buckets.assign_bucket(3000, 2000, no_upscale=True, **settings) == ((2496, 1664), (2496, 1664))
    # Mode (b), smaller: kept; 1001 -> 992 (1001 - 9), 667 -> 640 (667 - 27).
    assert buckets.assign_bucket(1001, 667, no_upscale=True, **settings) == ((992, 640), (1001, 667))


def test_doc_example_and_resized_covers_bucket():
    # GUI defaults for SDXL: 1024, steps 64, 256..2048. 832: 1048576 // 832 = 1260 -> 1216. ar 1000/1500 = 0.6667:
    # 832/1216 = 0.684 (err 0.018) is the closest (768/1280 = 0.6, 896/1152 = 0.778).
    # scale = 832/1000: (832, int(1248.5)) = (832, 1248): 32 px too tall, 16 cropped at the top.
    bucket, resized = buckets.assign_bucket(1000, 1500, resolution=1024, reso_steps=64, no_upscale=False,
                                            min_reso=256, max_reso=2048)
    assert (bucket, resized) == ((832, 1216), (832, 1248))
    image = Image.new("RGB", (1000, 1500), (10, 20, 30))
    cropped, crop_left_top = buckets.resize_and_center_crop(image, bucket, resized)
    assert cropped.size == (832, 1216) and crop_left_top == (0, 16)


def test_kohya_crop_top_left_letterbox_quirk():
    # fitted = (1216 * 1000/1500, 1216) = (810.67, 1216): left = (832 - 810.67) // 2 = 10, top = 0 -- not the real
    # crop (16 px at the top). Flipped: left = 832 - (10 + 810.67) = 11.33 -> 11.
    assert buckets.kohya_crop_top_left((832, 1216), (1000, 1500)) == (0, 10)
    assert buckets.kohya_crop_top_left((832, 1216), (1000, 1500), flipped=True) == (0, 11)
    # Landscape: bucket ar 1216/832 = 1.4615 < 1.5 -> fitted = (1216, 810.67): top = (832 - 810.67) // 2 = 10.
    assert buckets.kohya_crop_top_left((1216, 832), (1500, 1000)) == (10, 0)
    assert buckets.kohya_crop_top_left((1216, 832), (1500, 1000), flipped=True) == (10, 0)


def test_sdxl_time_ids_order():
    assert buckets.sdxl_time_ids((1500, 1000), (0, 10), (1216, 832)) == [1500, 1000, 0, 10, 1216, 832]


def test_resize_is_area_average_and_crop_is_centred():
    # 8x4 -> 4x2: each output pixel is the mean of a 2x2 block.
    pixels = np.arange(8 * 4 * 3, dtype=np.uint8).reshape(4, 8, 3) * 2
    out, offset = buckets.resize_and_center_crop(Image.fromarray(pixels), (4, 2), (4, 2))
    expected = pixels.reshape(2, 2, 4, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert offset == (0, 0)
    assert np.abs(np.asarray(out, dtype=np.float64) - expected).max() <= 0.5
    # no resize, 10x7 into 8x4: excess 2 and 3 -> offsets 2 // 2 = 1 and 3 // 2 = 1.
    image = np.random.default_rng(0).integers(0, 255, (7, 10, 3), dtype=np.uint8)
    out, offset = buckets.resize_and_center_crop(Image.fromarray(image), (8, 4), (10, 7))
    assert offset == (1, 1)
    np.testing.assert_array_equal(np.asarray(out), image[1:5, 1:9])


def test_resize_is_kohyas_cv2_inter_area_not_pil_box():
    # v0.8.7 train_util.load_image + trim_and_resize_if_required (lines 2349-2365): PIL RGB -> uint8 array ->
    # cv2.resize(image, resized_size, interpolation=cv2.INTER_AREA). 600x400 -> 96x64 is a scale of 1/6.25.
    image = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    out, offset = buckets.resize_and_center_crop(Image.fromarray(image), (96, 64), (96, 64))
    array = np.array(Image.fromarray(image).convert("RGB"), np.uint8)
    kohya = cv2.resize(array, (96, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(np.asarray(out), kohya)
    assert offset == (0, 0)
    assert hashlib.sha256(np.asarray(out).tobytes()).hexdigest() == (
        "bdbb048406bbafc57d6301b312674b1f53bf51a45f1cbbb9fb79dd60e32107d1")
    box = np.asarray(Image.fromarray(image).resize((96, 64), Image.Resampling.BOX))
    # PIL's BOX (the old resize) differs in 6121 of the 6144 pixels, by up to 14 grey levels
    assert (box != kohya).any(axis=2).sum() == 6121
    assert np.abs(box.astype(int) - kohya).max() == 14


def test_palette_image_is_converted_before_resizing():
    image = Image.new("P", (6, 6))
    out, _ = buckets.resize_and_center_crop(image, (3, 3), (3, 3))
    assert out.mode == "RGB" and out.size == (3, 3)


def test_histogram_and_format():
    hist = buckets.bucket_histogram([(832, 1216), (1024, 1024), (832, 1216), (1216, 832)])
    assert hist == {"832x1216": 2, "1024x1024": 1, "1216x832": 1}
    assert list(hist) == ["832x1216", "1024x1024", "1216x832"]
    text = buckets.format_histogram(hist, mean_ar_error=0.01)
    assert "bucket 0: resolution (832, 1216), count: 2" in text
    assert "bucket 2: resolution (1216, 832), count: 1" in text
    assert text.splitlines()[0].startswith("number of images (including repeats): 4 in 3 buckets")


@pytest.mark.parametrize(
    "value, expected",
    [(1024, (1024, 1024)), ("832,1216", (832, 1216)), ([832, 1216], (832, 1216)), ("512", (512, 512))],
)
def test_parse_resolution(value, expected):
    assert buckets.parse_resolution(value) == expected


@pytest.mark.parametrize("value", ["a,b", "1,2,3", 0, -5, 1024.5, True, None])
def test_parse_resolution_rejects(value):
    with pytest.raises(ConfigError, match="data.resolution"):
        buckets.parse_resolution(value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"reso_steps": 48}, "data.bucket_reso_steps"),
        ({"reso_steps": 0}, "data.bucket_reso_steps"),
        ({"max_reso": 1000}, "data.max_bucket_reso"),
        ({"min_reso": 2048, "max_reso": 1536}, "data.min_bucket_reso"),
        ({"min_reso": 1100, "max_reso": 2048}, "data.min_bucket_reso"),
    ],
)
def test_invalid_settings_name_the_field(overrides, field):
    settings = dict(resolution=1024, reso_steps=64, min_reso=256, max_reso=2048, no_upscale=False) | overrides
    with pytest.raises(ConfigError, match=field):
        buckets.assign_bucket(100, 100, **settings)


def test_check_bucket_options_skips_unset_min_max():
    assert buckets.check_bucket_options(resolution="832,1216", reso_steps=32) == (832, 1216)
    with pytest.raises(ConfigError, match="data.max_bucket_reso"):
        buckets.check_bucket_options(resolution=1024, reso_steps=64, max_reso=512)


@pytest.mark.parametrize("resolution, steps, expected", [
    ("1000", 32, 224),  # 1000 // 4 = 250 -> 7 steps of 32
    ("1024", 32, 256), ("1024", 64, 256),  # kohya's fixed default at SDXL's size
    ("1000", 64, 192),  # 250 -> 3 steps of 64
    ("96", 32, 32), ("64", 32, 32),  # a quarter (24, 16) is under one step
    ("832,1216", 32, 192),  # the shorter side: 832 // 4 = 208 -> 6 steps of 32
])
def test_min_bucket_reso_default(resolution, steps, expected):
    from conftest import compose_config

    cfg = compose_config(f"data.resolution='{resolution}'", f"data.bucket_reso_steps={steps}")
    assert buckets.bucket_settings(cfg.data)["min_reso"] == expected


def test_max_reso_default_is_sd_scripts_1024():
    with pytest.raises(ConfigError, match="data.max_bucket_reso"):
        buckets.assign_bucket(100, 100, resolution=2048, reso_steps=64, no_upscale=False)


def test_no_upscale_image_too_small_for_a_bucket():
    with pytest.raises(UserError, match="empty bucket"):
        buckets.assign_bucket(50, 600, no_upscale=True, **BASE_512)
