"""`compare --score` compares samples with the images the training read: the same listing rule as the data scan
(`paths.subset_images`), less the files PIL cannot read, so a .pdf, a .psd or a broken .png in the folder neither
joins the reference set nor stops the command."""

from __future__ import annotations

from conftest import write_image
from PIL import Image

from lora_sweep.compare.score import record_paths
from lora_sweep.data.dataset import inspect_folder


def test_score_reads_the_training_images_the_scan_read(tmp_path, caplog):
    folder = tmp_path / "data" / "10_cat"
    for name in ("a.png", "b.jpg", "sub/nested.png", ".hidden.png"):
        write_image(folder / name, caption="a cat")
    Image.new("RGB", (64, 64)).save(folder / "c.pdf")  # registered with PIL, which can only write it
    (folder / "d.psd").write_bytes(b"8BPS not really")
    (folder / "e.png").write_bytes(b"not a png")  # the scan skips it, and says so
    (folder / "reg").mkdir()
    write_image(tmp_path / "reg" / "1_dog" / "r.png")
    scan = inspect_folder(tmp_path / "data")
    trained = sorted(item.path for item in scan.items)
    record = [{"subsets": [{"image_dir": str(folder), "is_reg": False},
                           {"image_dir": str(tmp_path / "reg" / "1_dog"), "is_reg": True}]}]
    caplog.set_level("WARNING")
    assert record_paths(record) == trained == [folder / "a.png", folder / "b.jpg"]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"skipping unreadable training image '{folder / 'e.png'}'"]
