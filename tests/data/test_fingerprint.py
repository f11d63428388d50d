"""A dataset's fingerprint changes with any edit that changes training, and only with those; it digests the files
the scan listed, exactly as it digested the folders it listed itself (runs recorded before keep matching)."""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_sweep.data.dataset import inspect_folder
from lora_sweep.data.fingerprint import dataset_fingerprint


def fingerprint(*folders: Path, memo_dir: Path | None = None):
    return dataset_fingerprint([inspect_folder(f) for f in folders], memo_dir=memo_dir)


def make(folder: Path) -> Path:
    (folder / "10_cat").mkdir(parents=True)
    (folder / "10_cat" / "a.png").write_bytes(b"png bytes a")
    (folder / "10_cat" / "a.txt").write_text("a cat")
    (folder / "notes").mkdir()  # no <repeats>_ prefix: not part of the dataset
    (folder / "notes" / "todo.txt").write_text("x")
    return folder


def test_edits_change_it_copies_and_unrelated_files_do_not(tmp_path):
    data = make(tmp_path / "data")
    base = fingerprint(data, memo_dir=tmp_path / "memo")
    assert base.files == 2 and base.folders == (str(data.resolve()),) and base.describe().startswith("dataset ")
    assert fingerprint(shutil.copytree(data, tmp_path / "copy")).digest == base.digest
    (data / "notes" / "todo.txt").write_text("y")
    (data / "10_cat" / ".hidden").write_text("z")
    assert fingerprint(data).digest == base.digest
    (data / "10_cat" / "a.txt").write_text("a black cat")  # a caption
    captioned = fingerprint(data, memo_dir=tmp_path / "memo")
    assert captioned.digest != base.digest
    (data / "10_cat").rename(data / "5_cat")  # repeats
    assert fingerprint(data).digest not in (base.digest, captioned.digest)


def test_the_validation_folder_counts_in_its_place(tmp_path):
    train, val = make(tmp_path / "train"), make(tmp_path / "val")
    (val / "10_cat" / "a.png").write_bytes(b"other")
    both = fingerprint(train, val)
    assert both.files == 4 and both.digest != fingerprint(val, train).digest
    assert both.digest != fingerprint(train).digest


def test_the_digest_is_the_one_runs_were_recorded_with(tmp_path):
    """Every kind of entry a dataset folder holds: the digests below were computed by listing the folders, before
    the fingerprint took the scan's files; a run's `lora_sweep.skip_key` holds them."""
    files = {
        "train/10_cat/a.png": b"png bytes a", "train/10_cat/a.txt": b"a cat",
        "train/10_cat/B.PNG": b"png bytes b", "train/10_cat/c.TXT": b"orphan caption",
        "train/10_cat/d.jpg": b"jpeg bytes d", "train/10_cat/d.caption": b"other extension",
        "train/10_cat/notes.md": b"not a dataset file", "train/10_cat/.hidden.png": b"hidden",
        "train/10_cat/nested/e.png": b"nested", "train/0_off/f.png": b"zero repeats",
        "train/-1_neg/g.png": b"negative repeats", "train/2_/h.webp": b"empty class token",
        "train/misc/i.png": b"no prefix", "train/loose.png": b"loose",
        "val/1_val/v.png": b"validation", "val/1_val/v.txt": b"a held-out cat",
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    both = fingerprint(tmp_path / "train", tmp_path / "val", memo_dir=tmp_path / "memo")
    assert (both.digest, both.files) == ("ef4c65eea55c1462", 10)
    assert (fingerprint(tmp_path / "train").digest, fingerprint(tmp_path / "train").files) == ("28f4decee054d176", 8)


def test_broken_links_and_fifos_count_by_name_without_being_read(tmp_path):
    import os

    data = make(tmp_path / "data")
    base = fingerprint(data)
    (data / "10_cat" / "b.png").symlink_to(tmp_path / "unplugged.png")
    linked = fingerprint(data)
    os.mkfifo(data / "10_cat" / "c.png")  # reading it would wait forever
    assert len({base.digest, linked.digest, fingerprint(data).digest}) == 3 and linked.files == base.files == 2
