"""Images decode to what they show, whatever mode PIL opens them in; sizes come from the header alone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from lora_sweep.data.images import load_rgb, probe_image


def _noise16(shape=(96, 128)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 65536, shape).astype(np.uint16)


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    """A 128x96 I;16 PNG of uniform noise over 0..65535 (convert("RGB") gave mean 254.6)."""
    path = tmp_path / "gray16.png"
    Image.fromarray(_noise16()).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_rgb(path)).astype(float)
    assert rgb.shape == (96, 128, 3)
    assert abs(rgb.mean() - 127.5) < 2 and abs(rgb.std() - 73.9) < 2
    np.testing.assert_array_equal(rgb[..., 0], (_noise16() >> 8).astype(float))  # 65535 -> 255, by 256ths
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_32_bit_integer_and_float_images_are_scaled_by_their_range(tmp_path):
    values = _noise16((8, 8))
    as_int = Image.fromarray(values.astype(np.int32))  # mode I, values of a 16-bit image
    assert as_int.mode == "I"
    as_int.save(tmp_path / "i32.tif")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "i32.tif"))[..., 0], values >> 8)
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(unit, mode="F").save(tmp_path / "f.tif")
    decoded = np.asarray(load_rgb(tmp_path / "f.tif"))[..., 1]
    assert decoded.min() == 0 and decoded.max() == 255 and abs(float(decoded.mean()) - 127.5) < 1
    wide = (unit * 5000 - 1000).astype(np.float32)  # outside 0..1: stretched over 0..255, with a warning
    Image.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
    stretched = np.asarray(load_rgb(tmp_path / "wide.tif"))[..., 0]
    assert stretched.min() == 0 and stretched.max() == 255


@pytest.mark.parametrize("mode, color, expected", [
    ("1", 1, (255, 255, 255)),
    ("L", 77, (77, 77, 77)),
    ("RGB", (10, 20, 30), (10, 20, 30)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # cyan 0, magenta and yellow full: red
    ("YCbCr", (76, 85, 255), (254, 0, 0)),  # JPEG's YCbCr of red
    ("LAB", (128, 128, 128), (119, 119, 119)),  # L* 50, neutral: mid grey (sRGB 119)
])
def test_every_opaque_mode_decodes_to_what_it_shows(tmp_path, mode, color, expected):
    rgb = load_rgb(_saved(tmp_path, Image.new(mode, (4, 4), color)))
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == pytest.approx(expected, abs=2)


def _saved(tmp_path, image: Image.Image):
    """TIFF keeps every one of these modes as it is."""
    path = tmp_path / f"{image.mode}.tif"
    image.save(path)
    assert Image.open(path).mode == image.mode
    return path


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    out = load_rgb(tmp_path / "rgba.png")
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((2, 2)) == (255, 255, 255)
    Image.new("LA", (4, 4), (0, 128)).save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").getpixel((1, 1)) == pytest.approx((127, 127, 127), abs=1)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "p.png", transparency=1)  # palette index 1 (green) is transparent
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = load_rgb(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (0, 0, 255) and out.getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_from_the_header_matches_the_decode(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # a red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    info = probe_image(tmp_path / "rot.jpg")
    assert info.size == (20, 60) and info.orientation == 6
    decoded = load_rgb(tmp_path / "rot.jpg")
    assert decoded.size == info.size
    assert decoded.getpixel((10, 2))[0] > 200  # the left band is now on top


def test_animated_gif_trains_on_its_first_frame_and_says_how_many(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert probe_image(tmp_path / "anim.gif").frames == 3
    assert load_rgb(tmp_path / "anim.gif").getpixel((4, 4)) == pytest.approx((255, 0, 0), abs=8)
    assert probe_image(_saved(tmp_path, frames[0])).frames == 1


def test_probe_reads_no_pixels(tmp_path, monkeypatch):
    Image.new("RGB", (2048, 1536)).save(tmp_path / "big.jpg")
    Image.fromarray(_noise16()).save(tmp_path / "gray16.png")

    def no_decode(self):
        raise AssertionError("probe_image decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert probe_image(tmp_path / "big.jpg").size == (2048, 1536)
    assert probe_image(tmp_path / "gray16.png").size == (128, 96)
