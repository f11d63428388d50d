"""The dataset scan: every problem at once, each naming its file; every fallback a warning with counts and paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_image
from PIL import Image

from lora_sweep.data.dataset import FolderScan, dataset_changes, files_seen, inspect_folder, scan_folder, seen_key
from lora_sweep.errors import UserError

CP1252_ARTISTS = bytes.fromhex("6172746973749273")  # "artist's" with cp1252's right quote


def image(path: Path, size=(64, 48), caption: str | bytes | None = None) -> Path:
    return write_image(path, size, caption, color=(120, 80, 40))


def fallback(scan, fragment: str):
    found = [f for f in scan.fallbacks if fragment in f.what]
    assert len(found) == 1, [f.line() for f in scan.fallbacks]
    return found[0]


def test_every_bad_caption_is_reported_with_its_file_not_only_the_first(tmp_path):
    image(tmp_path / "1_subj" / "img1.png", caption=CP1252_ARTISTS)
    image(tmp_path / "1_subj" / "img2.png", caption=CP1252_ARTISTS)
    image(tmp_path / "1_subj" / "img3.png", caption=b"")
    image(tmp_path / "1_subj" / "ok.png", caption="a photo")
    scan = inspect_folder(tmp_path)
    assert len(scan.problems) == 3
    assert all(p.startswith("data.dir: caption file '") for p in scan.problems)
    assert "img1.txt' is not valid UTF-8 (invalid start byte at byte 6)" in scan.problems[0]
    assert "img2.txt' is not valid UTF-8" in scan.problems[1]
    assert "img3.txt' is empty" in scan.problems[2]
    with pytest.raises(UserError) as error:
        scan_folder(tmp_path)
    assert str(error.value).count("\n") == 2  # one line per problem


def test_blank_first_line_gives_an_empty_caption_with_a_warning(tmp_path):
    image(tmp_path / "2_subj" / "a.png", caption="\n\nmytoken, red hat")
    scan = inspect_folder(tmp_path)
    assert not scan.problems and scan.items[0].caption == ""  # kohya reads the first line
    warning = fallback(scan, "first line is blank")
    assert warning.paths == (str(tmp_path / "2_subj" / "a.txt"),) and warning.setting == "data.dir"


def test_missing_captions_are_counted_and_another_extension_is_named(tmp_path):
    for name in ("a", "b", "c", "d"):
        image(tmp_path / "3_mychar" / f"{name}.png", caption="tagged")  # .txt files only
    scan = inspect_folder(tmp_path, caption_extension=".caption")
    assert [item.caption for item in scan.items] == ["mychar"] * 4
    warning = fallback(scan, "without a .caption caption file")
    assert warning.count == 4 and "4 with a .txt file: set data.caption_extension" in warning.hint
    line = warning.line()
    assert line.startswith("data.dir: 4 images without a .caption") and "and 1 more" in line


def test_zero_repeat_and_nested_folders_are_not_used_and_said(tmp_path):
    image(tmp_path / "1_alpha" / "a.png", caption="a")
    image(tmp_path / "0_beta" / "b.png", caption="b")
    image(tmp_path / "3_gamma" / "nested" / "g.png", caption="g")
    image(tmp_path / "loose.png")
    (tmp_path / "notes").mkdir()
    scan = inspect_folder(tmp_path)
    assert [i.path.name for i in scan.items] == ["a.png"]  # 0_beta is neither counted nor encoded
    assert fallback(scan, "0 repeats").paths == (str(tmp_path / "0_beta"),)
    assert fallback(scan, "inside subfolders").paths == (str(tmp_path / "3_gamma" / "nested" / "g.png"),)
    assert fallback(scan, "directly in the dataset folder").count == 1
    assert fallback(scan, "without kohya's '<repeats>_' prefix").paths == (str(tmp_path / "notes"),)


def test_only_zero_repeat_folders_is_a_clear_problem_not_a_division_by_zero(tmp_path):
    image(tmp_path / "0_x" / "a.png", caption="a")
    scan = inspect_folder(tmp_path)
    assert len(scan.problems) == 1
    assert "no readable images to train on" in scan.problems[0] and "0 repeats" in scan.problems[0]


def test_unreadable_and_animated_images_and_unsupported_formats(tmp_path):
    image(tmp_path / "1_s" / "good.png", caption="g")
    (tmp_path / "1_s" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "1_s" / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "1_s" / "phone.HEIC").write_bytes(b"\0")
    scan = inspect_folder(tmp_path)
    assert sorted(i.path.name for i in scan.items) == ["anim.gif", "good.png"]
    assert scan.skipped == [tmp_path / "1_s" / "broken.png"]
    assert fallback(scan, "images that cannot be read").paths == (
        f"{tmp_path / '1_s' / 'broken.png'} (PIL cannot read it: Truncated File Read)",)
    assert fallback(scan, "first frame").paths == (f"{tmp_path / '1_s' / 'anim.gif'} (2 frames)",)
    assert fallback(scan, "does not read").paths == (str(tmp_path / "1_s" / "phone.HEIC"),)


def test_sizes_come_from_the_header_after_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    (tmp_path / "1_s").mkdir()
    Image.new("RGB", (300, 100)).save(tmp_path / "1_s" / "r.jpg", exif=exif)
    assert inspect_folder(tmp_path).items[0].size == (100, 300)


def test_a_clean_dataset_has_no_problems_and_no_warnings(tmp_path):
    image(tmp_path / "5_photo" / "a.png", caption="a photo")
    scan = scan_folder(tmp_path)
    assert not scan.problems and not scan.fallbacks and scan.items[0].repeats == 5


def test_pointing_at_a_repeats_folder_itself_says_so(tmp_path):
    image(tmp_path / "10_mychar" / "a.png", caption="a")
    scan = inspect_folder(tmp_path / "10_mychar")
    assert "instead of its parent" in scan.problems[0] and str(tmp_path) in scan.problems[0]


def test_a_warning_line_counts_in_words():
    from lora_sweep.errors import Fallback

    one = Fallback("data.dir", "images without a .txt caption file: trained on the class token", ("a.png",), "Hint.")
    assert one.line() == "data.dir: 1 image without a .txt caption file: trained on the class token: 'a.png'. Hint."
    many = Fallback("data.dir", "caption files (.txt) whose first line is blank", tuple("abcde"))
    assert many.line() == "data.dir: 5 caption files (.txt) whose first line is blank: 'a', 'b', 'c' and 2 more."
    assert many.full().splitlines()[1:] == [f"    {p}" for p in "abcde"]


def test_a_folder_without_a_name_trains_with_an_empty_class_token_as_in_kohya(tmp_path):
    """kohya splits a folder name on '_' and reads the first part as the repeats (config_util.py,
    extract_dreambooth_params): `10_` and `10` are 10 repeats with an empty class token, `3_my_char` has the class
    token `my_char`. Trained, and said: images without a caption there train on an empty caption."""
    from lora_sweep.data.dataset import subset_params

    assert [subset_params(n) for n in ("10_", "10", "3_my_char", "notes", "x_10")] == [
        (10, ""), (10, ""), (3, "my_char"), None, None]
    image(tmp_path / "10_" / "a.png")
    image(tmp_path / "2" / "b.png", caption="a caption")
    image(tmp_path / "3_my_char" / "c.png")
    scan = inspect_folder(tmp_path)
    assert [(i.path.name, i.repeats, i.caption) for i in scan.items] == [
        ("a.png", 10, ""), ("b.png", 2, "a caption"), ("c.png", 3, "my_char")]
    assert fallback(scan, "without a <name>").paths == (str(tmp_path / "10_"), str(tmp_path / "2"))
    assert "empty class token, as kohya does" in fallback(scan, "without a <name>").line()
    assert not scan.ignored_dirs and not scan.problems
    assert [p.name for p in scan.subset_files] == ["a.png", "b.png", "b.txt", "c.png"]  # what the fingerprint reads


def test_a_record_is_compared_only_with_a_scan_of_the_same_folder_and_caption_extension(tmp_path):
    """A sweep over data.caption_extension=.txt,.caption: the .txt record does not make .caption files "added"."""
    write_image(tmp_path / "ds" / "1_x" / "a.png", caption="a")
    (tmp_path / "ds" / "1_x" / "a.caption").write_text("another", encoding="utf-8")
    scan = scan_folder(tmp_path / "ds")
    record = {seen_key(scan, ".txt"): files_seen(scan, ".txt")}
    assert sorted(record[seen_key(scan, ".txt")]) == ["1_x/a.png", "1_x/a.txt"]
    assert dataset_changes(scan, record, ".txt") == dataset_changes(scan, record, ".caption") == []
    (tmp_path / "ds" / "1_x" / "a.txt").unlink()
    assert dataset_changes(scan_folder(tmp_path / "ds"), record, ".txt")[0].endswith(
        "since the pre-flight, removed '1_x/a.txt'. A sweep's variants train on the files its pre-flight checked: "
        "put them back as they were, or start the sweep again.")


def test_broken_links_are_skipped_counted_and_each_named(tmp_path):
    image(tmp_path / "1_s" / "kept.png", caption="k")
    for name in ("a", "b", "c"):  # their drive was unplugged
        (tmp_path / "1_s" / f"{name}.png").symlink_to(tmp_path / "unplugged" / f"{name}.png")
    scan = inspect_folder(tmp_path)
    assert [i.path.name for i in scan.items] == ["kept.png"] and not scan.problems
    assert len(scan.skipped) == 3  # data.skipped_images
    assert fallback(scan, "images that cannot be read").paths == tuple(
        f"{tmp_path / '1_s' / n}.png (a link to '{tmp_path / 'unplugged' / n}.png', which is gone)" for n in "abc")


def test_a_fifo_an_empty_file_and_a_dangling_folder_link_are_named_not_read(tmp_path):
    import os

    image(tmp_path / "1_s" / "kept.png", caption="k")
    os.mkfifo(tmp_path / "1_s" / "pipe.png")  # opening it would wait for a writer forever
    (tmp_path / "1_s" / "empty.jpg").write_bytes(b"")
    (tmp_path / "2_moved").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    scan = inspect_folder(tmp_path)
    assert fallback(scan, "images that cannot be read").paths == (
        f"{tmp_path / '1_s' / 'empty.jpg'} (empty (0 bytes))", f"{tmp_path / '1_s' / 'pipe.png'} (not a regular file)")
    assert fallback(scan, "links whose target is gone").paths == (
        f"{tmp_path / '2_moved'} (a link to '{tmp_path / 'elsewhere'}', which is gone)",)


def test_a_folder_named_like_an_image_is_skipped_and_an_empty_subset_folder_said(tmp_path):
    """kohya's glob would take `dir.png/` for an image; `3_sub/` trains nothing: neither may vanish without a word."""
    image(tmp_path / "5_x" / "kept.png", caption="k")
    (tmp_path / "5_x" / "dir.png").mkdir()
    (tmp_path / "3_sub").mkdir()
    scan = inspect_folder(tmp_path)
    assert [i.path.name for i in scan.items] == ["kept.png"] and not scan.problems
    assert fallback(scan, "images that cannot be read").paths == (
        f"{tmp_path / '5_x' / 'dir.png'} (a folder, not an image file)",)
    assert len(scan.skipped) == 1  # data.skipped_images
    assert fallback(scan, "folders without an image").paths == (str(tmp_path / "3_sub"),)


def test_a_caption_that_is_a_broken_link_is_refused_not_replaced_by_the_class_token(tmp_path):
    image(tmp_path / "1_s" / "a.png")
    (tmp_path / "1_s" / "a.txt").symlink_to(tmp_path / "gone.txt")
    assert inspect_folder(tmp_path).problems == [
        f"data.dir: caption file '{tmp_path / '1_s' / 'a.txt'}' cannot be read (a link to '{tmp_path / 'gone.txt'}', "
        "which is gone). Restore or fix it, or delete it to use the folder's class tokens (the <name> of "
        "<repeats>_<name>) instead."]


def test_a_dataset_of_broken_links_only_is_a_problem_naming_them(tmp_path):
    (tmp_path / "1_s").mkdir()
    (tmp_path / "1_s" / "a.png").symlink_to(tmp_path / "gone.png")
    problems = inspect_folder(tmp_path).problems
    assert len(problems) == 1 and problems[0].startswith(f"data.dir: no readable images to train on in '{tmp_path}'")
    assert f"1 image(s) could not be read: {tmp_path / '1_s' / 'a.png'} (a link to '{tmp_path / 'gone.png'}'" \
        in problems[0]


def scan_as_nobody(root: Path) -> FolderScan:
    """`inspect_folder(root)` by a user without root's rights (chmod 000 stops only such a user): as root, in a forked
    child that drops to nobody; otherwise here."""
    import os
    import pickle

    if os.geteuid() != 0:
        return inspect_folder(root)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, scan, send the scan back, exit without pytest's clean-up
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, pickle.dumps(inspect_folder(root)))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


def test_files_and_folders_without_read_permission_are_counted_and_named():
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp())  # not tmp_path: nobody cannot enter pytest's 0700 base folder
    try:
        base.chmod(0o755)
        image(base / "1_s" / "kept.png", caption="k")
        image(base / "1_s" / "locked.png", caption="l").chmod(0o000)
        image(base / "2_locked" / "x.png", caption="x")
        (base / "2_locked").chmod(0o000)
        scan = scan_as_nobody(base)
    finally:
        (base / "2_locked").chmod(0o755)
        shutil.rmtree(base)
    assert [i.path.name for i in scan.items] == ["kept.png"] and scan.problems == []
    assert fallback(scan, "images that cannot be read").paths == (f"{base / '1_s' / 'locked.png'} (Permission denied)",)
    assert fallback(scan, "cannot be listed").paths == (f"{base / '2_locked'} (Permission denied)",)


def test_a_subset_reads_its_image_dir_alone_with_its_caption_extension_and_class_tokens(tmp_path):
    """A dataset-config subset: images directly in image_dir (not subfolders), captions by its extension, its
    class_tokens for an image without one; items name the subset and dataset."""
    from lora_sweep.data.dataset import inspect_subset
    from lora_sweep.data.subsets import Subset

    image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("a fox\n", encoding="utf-8")
    image(tmp_path / "b.png", caption="ignored: .txt is not this subset's extension")
    image(tmp_path / "deeper" / "c.png", caption="not scanned")
    subset = Subset(image_dir=tmp_path, setting="data.datasets[1].subsets[0]", num_repeats=3, class_tokens="fox",
                    caption_extension=".caption")
    scan = inspect_subset(subset, dataset=1)
    assert [(i.path.name, i.caption, i.repeats, i.dataset) for i in scan.items] == [("a.png", "a fox", 3, 1),
                                                                                   ("b.png", "fox", 3, 1)]
    assert scan.items[0].subset is subset and not scan.problems
    assert fallback(scan, "subfolders of a <repeats>_<name>").setting == "data.datasets[1].subsets[0]"
    assert inspect_subset(Subset(image_dir=tmp_path / "none", setting="s")).problems == [
        f"s: image_dir '{tmp_path / 'none'}' is not a folder. Point image_dir at a folder holding the subset's "
        "images and same-named caption files."]


def test_the_fingerprint_covers_every_subset_and_the_dataset_config_file(tmp_path):
    from lora_sweep.data.dataset import inspect_subset
    from lora_sweep.data.fingerprint import dataset_fingerprint
    from lora_sweep.data.subsets import Subset

    image(tmp_path / "one" / "a.png", caption="a")
    image(tmp_path / "two" / "b.png", caption="b")
    scans = [inspect_subset(Subset(image_dir=tmp_path / name, setting=name)) for name in ("one", "two")]
    config = tmp_path / "ds.toml"
    config.write_text("[[datasets]]\n", encoding="utf-8")
    base = dataset_fingerprint(scans, files=[config])
    assert base.files == 4 and base.digest != dataset_fingerprint(scans).digest
    (tmp_path / "two" / "b.txt").write_text("c", encoding="utf-8")
    assert dataset_fingerprint(scans, files=[config]).digest != base.digest
    config.write_text("[[datasets]]\nbatch_size = 2\n", encoding="utf-8")
    assert dataset_fingerprint(scans).digest != base.digest


def test_reg_folder_balanced_as_v087_names_the_images_never_used(tmp_path):
    """Reference §2.2: 15 train entries against a reg folder of 10 repeats x 3 images -> 10, 10 and never used."""
    from conftest import compose_config

    from lora_sweep.checks import preflight
    from lora_sweep.data.dataset import NEVER_USED, raw_reg_entries

    write_image(tmp_path / "train" / "15_cat" / "a.png", caption="a cat")
    for k in range(3):
        write_image(tmp_path / "reg" / "10_dog" / f"r{k}.png", caption="a dog")
    cfg = compose_config("data=folder", f"data.dir={tmp_path / 'train'}", f"data.reg_data_dir={tmp_path / 'reg'}")
    specs, scans = preflight.training_scans(cfg, Path(cfg.data.dir))
    train, reg = scans
    assert [i.repeats for i in train.items] == [15] and not train.items[0].subset.is_reg
    assert [i.repeats for i in reg.items] == [10, 10, 0] and all(i.subset.is_reg for i in reg.items)
    assert reg.items[0].subset.setting == "data.reg_data_dir '10_dog'" and reg.items[0].subset.class_tokens == "dog"
    assert raw_reg_entries(reg.items) == 30  # ss_num_reg_images: before balancing
    never = [f for f in reg.fallbacks if f.what == NEVER_USED]
    assert [Path(p).name for p in never[0].paths] == ["r2.png"]
    assert len(specs) == 1 and specs[0].folders[1] == (tmp_path / "reg", True)
