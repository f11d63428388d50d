"""A dataset's fingerprint changes with any edit that changes training, and only with those."""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_sweep.data.fingerprint import dataset_fingerprint


def make(folder: Path) -> Path:
    (folder / "10_cat").mkdir(parents=True)
    (folder / "10_cat" / "a.png").write_bytes(b"png bytes a")
    (folder / "10_cat" / "a.txt").write_text("a cat")
    (folder / "notes").mkdir()  # no <repeats>_ prefix: not part of the dataset
    (folder / "notes" / "todo.txt").write_text("x")
    return folder


def test_edits_change_it_copies_and_unrelated_files_do_not(tmp_path):
    data = make(tmp_path / "data")
    base = dataset_fingerprint([data], memo_dir=tmp_path / "memo")
    assert base.files == 2 and base.folders == (str(data.resolve()),) and base.describe().startswith("dataset ")
    assert dataset_fingerprint([shutil.copytree(data, tmp_path / "copy")]).digest == base.digest
    (data / "notes" / "todo.txt").write_text("y")
    (data / "10_cat" / ".hidden").write_text("z")
    assert dataset_fingerprint([data]).digest == base.digest
    (data / "10_cat" / "a.txt").write_text("a black cat")  # a caption
    captioned = dataset_fingerprint([data], memo_dir=tmp_path / "memo")
    assert captioned.digest != base.digest
    (data / "10_cat").rename(data / "5_cat")  # repeats
    assert dataset_fingerprint([data]).digest not in (base.digest, captioned.digest)


def test_the_validation_folder_counts_in_its_place(tmp_path):
    train, val = make(tmp_path / "train"), make(tmp_path / "val")
    (val / "10_cat" / "a.png").write_bytes(b"other")
    both = dataset_fingerprint([train, val])
    assert both.files == 4 and both.digest != dataset_fingerprint([val, train]).digest
    assert both.digest != dataset_fingerprint([train]).digest
