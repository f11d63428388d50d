"""A dataset folder in kohya's DreamBooth layout: `<dir>/<repeats>_<name>/<image>` + `<image><caption_extension>`.

The scan reads image headers, caption files and the tree (pixels are decoded later, on a cache miss) and never stops
at the first problem: `inspect_folder` returns every problem (one line each, naming the setting and file) and every
`Fallback` taken: an image without a caption trains on its folder's class token (as kohya); a blank first line is an
empty caption; an unreadable image is skipped and counted; a multi-frame image trains on its first frame; folders
without `<repeats>_`, with 0 repeats or nested, images directly in `data.dir` and formats PIL cannot read here are
not used (kohya ignores them silently).
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lora_sweep.data.captions import caption_path, read_caption
from lora_sweep.data.images import probe_image
from lora_sweep.errors import Fallback, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")
NOT_READ_EXTENSIONS = (".heic", ".heif", ".jxl", ".psd", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                       ".raf", ".rw2", ".exr", ".hdr")
_NOT_CAPTIONS = (*IMAGE_EXTENSIONS, *NOT_READ_EXTENSIONS, ".npz", ".json", ".xmp", ".pt", ".safetensors")


def subset_params(name: str) -> tuple[int, str] | None:
    """(repeats, class token) of a folder name, as kohya's `extract_dreambooth_params`: `10_my_char` -> (10, "my_char"),
    `10_` and `10` -> (10, ""), `notes` -> None; fewer than 1 repeat is not used."""
    head, _, rest = name.partition("_")
    try:
        return int(head), rest
    except ValueError:
        return None


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # (width, height) after EXIF orientation


@dataclass
class FolderScan:
    root: Path  # the folder scanned (a user's ~ expanded)
    setting: str = "data.dir"  # the config key naming it in messages (data.dir or data.validation_dir)
    items: list[ImageItem] = field(default_factory=list)
    # every non-hidden file directly in a <repeats>_<name> folder: what the fingerprint digests
    subset_files: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # unreadable images (header at scan time, pixels at encode time)
    ignored_dirs: list[Path] = field(default_factory=list)  # subfolders without the `<repeats>_` prefix
    problems: list[str] = field(default_factory=list)  # one line each, naming the setting and file: refused
    fallbacks: list[Fallback] = field(default_factory=list)  # what was used instead of what the user gave


def gone(scan: FolderScan, path: Path) -> UserError:
    """A file `scan` listed that is no longer there (removed while the job set up): one paragraph naming it."""
    return UserError(f"{scan.setting}: '{path}' is gone: it was removed after the dataset was scanned, before "
                     "training started. Put it back, or start again to train on the files that are there.")


def files_seen(scan: FolderScan, caption_extension: str = ".txt") -> dict[str, list[int]]:
    """The scan's images and captions: {relative posix path: [size in bytes, mtime in ns]}, for `dataset_changes`."""
    suffixes = {*IMAGE_EXTENSIONS, caption_extension.lower()}
    seen = {}
    for path in scan.subset_files:
        if path.suffix.lower() in suffixes:
            with contextlib.suppress(OSError):  # gone since the scan: the job's scan tells
                stat = path.stat()
                seen[path.relative_to(scan.root).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return seen


def seen_key(scan: FolderScan, caption_extension: str = ".txt") -> str:
    """A record's key for `files_seen(scan, caption_extension)`: the resolved folder and the caption extension."""
    return f"{scan.root.resolve()} {caption_extension}"


def dataset_changes(scan: FolderScan, record: dict[str, dict[str, list[int]]],
                    caption_extension: str = ".txt") -> list[str]:
    """One line naming the files removed, changed and added in `scan` since `record` (`files_seen` of earlier scans
    by `seen_key`); none when they match or the record has no such scan. A sweep's variants must train on the files
    its pre-flight checked."""
    seen = record.get(seen_key(scan, caption_extension))
    if seen is None:
        return []
    now = files_seen(scan, caption_extension)
    kinds = [("removed", sorted(seen.keys() - now.keys())),
             ("changed", sorted(k for k in seen.keys() & now.keys() if seen[k] != now[k])),
             ("added", sorted(now.keys() - seen.keys()))]
    said = [f"{kind} {_some(paths)}" for kind, paths in kinds if paths]
    if not said:
        return []
    return [f"{scan.setting}: in '{scan.root}', since the pre-flight, {'; '.join(said)}. A sweep's variants train on "
            "the files its pre-flight checked: put them back as they were, or start the sweep again."]


def _some(paths: list[str], shown: int = 5) -> str:
    names = ", ".join(f"'{p}'" for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def scan_folder(root: str | Path, caption_extension: str = ".txt", *, setting: str = "data.dir") -> FolderScan:
    """`inspect_folder`, raising one UserError listing every problem (one per line) if there is any."""
    scan = inspect_folder(root, caption_extension, setting=setting)
    if scan.problems:
        raise UserError("\n".join(scan.problems))
    return scan


def inspect_folder(root: str | Path, caption_extension: str = ".txt", *, setting: str = "data.dir") -> FolderScan:
    """Every readable image in `root`'s `<repeats>_<name>` subfolders with its caption, repeats and size (after EXIF
    orientation), from headers only. Never raises for what it finds; `setting` names the config key in messages."""
    root = Path(root).expanduser()
    scan = FolderScan(root, setting)
    if not root.is_dir():
        scan.problems.append(
            f"{setting}: '{root}' is not a folder. Point {setting} at a dataset in kohya's layout: a folder holding "
            "subfolders named <repeats>_<name> (e.g. 10_mychar) with images and same-named caption files.")
        return scan
    found = _Found()
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            found.loose.append(entry)
        elif entry.is_dir():
            params = subset_params(entry.name)
            if params is None:
                scan.ignored_dirs.append(entry)
            elif params[0] < 1:
                found.zero_repeats.append(entry)
                scan.subset_files += sorted(p for p in entry.iterdir() if not p.name.startswith(".") and p.is_file())
            else:
                if not params[1]:
                    found.empty_class_token.append(entry)
                _scan_subset(entry, params[0], params[1], caption_extension, setting, scan, found)
    scan.fallbacks += found.fallbacks(setting, caption_extension, scan)
    if not scan.items:
        scan.problems.append(_nothing_to_train(root, setting, caption_extension, scan, found))
    return scan


@dataclass
class _Found:
    """What the scan saw besides the items, gathered for the warnings."""

    loose: list[Path] = field(default_factory=list)  # images directly in the root
    zero_repeats: list[Path] = field(default_factory=list)
    empty_class_token: list[Path] = field(default_factory=list)  # `10_` or `10`: trained, with an empty class token
    nested: list[Path] = field(default_factory=list)  # images in subfolders of a subset folder
    not_read: list[Path] = field(default_factory=list)
    missing_caption: list[Path] = field(default_factory=list)
    other_caption_ext: Counter = field(default_factory=Counter)  # extension -> images that have such a file
    blank_first_line: list[Path] = field(default_factory=list)
    multi_frame: list[str] = field(default_factory=list)

    def fallbacks(self, setting: str, ext: str, scan: FolderScan) -> list[Fallback]:
        other = ", ".join(f"{n} with a {e} file" for e, n in self.other_caption_ext.most_common())
        zero_images = sum(len(_images_in(d)) for d in self.zero_repeats)
        rows = [
            (self.missing_caption, f"images without a {ext} caption file: trained on their folder's class token "
             "(the <name> of <repeats>_<name>), as kohya does",
             f"{other}: set data.caption_extension to that extension." if other else
             f"Write a {ext} file beside each image to caption it."),
            (self.blank_first_line, f"caption files ({ext}) whose first line is blank: trained with an empty caption "
             "(kohya reads only the first line)", "Put the caption on the first line."),
            (scan.skipped, "images PIL cannot read: skipped (counted in data.skipped_images)",
             "Re-save them as PNG or JPEG."),
            (self.multi_frame, "images that are animated or have several frames: trained on their first frame only",
             "Extract the frames you want as separate images."),
            (scan.ignored_dirs, "subfolders without kohya's '<repeats>_' prefix: not used",
             "Rename a folder to <repeats>_<name> (e.g. 10_mychar) to train on it."),
            (self.empty_class_token, "folders named <repeats>_ or <repeats> without a <name>: trained with an empty "
             "class token, as kohya does (their images without a caption file train on an empty caption)",
             "Name the folder <repeats>_<name> (e.g. 10_mychar) to give it a class token."),
            (self.zero_repeats, f"folders with 0 repeats: not used ({zero_images} images)",
             "Give them 1 or more repeats to train on them."),
            (self.nested, "images inside subfolders of a <repeats>_<name> folder: not used (kohya does not look "
             "into subfolders)", "Move them up into the <repeats>_<name> folder, or give the subfolder its own "
             "<repeats>_<name> folder under the dataset folder."),
            (self.loose, "images directly in the dataset folder, outside any <repeats>_<name> folder: not used",
             "Move them into a <repeats>_<name> subfolder."),
            (self.not_read, f"files with an image extension lora-sweep does not read ({', '.join(NOT_READ_EXTENSIONS)})"
             ": not used", "Convert them to PNG or JPEG."),
        ]
        return [Fallback(setting, what, tuple(map(str, paths)), hint) for paths, what, hint in rows if paths]


def _scan_subset(folder: Path, repeats: int, class_token: str, caption_extension: str, setting: str,
                 scan: FolderScan, found: _Found) -> None:
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        if path.is_file():
            by_stem[path.stem].append(path)
            scan.subset_files.append(path)
        elif path.is_dir():
            found.nested += _images_in(path)
    for path in files:
        suffix = path.suffix.lower()
        if suffix in NOT_READ_EXTENSIONS:
            found.not_read.append(path)
        if suffix not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        try:
            info = probe_image(path)
        except Exception:  # PIL raises many types for files it cannot identify
            scan.skipped.append(path)
            continue
        if info.frames > 1:
            found.multi_frame.append(f"{path} ({info.frames} frames)")
        try:
            caption = read_caption(path, caption_extension)
        except UserError as error:  # not UTF-8, or an empty file: refused (the item is kept to count it)
            scan.problems.append(f"{setting}: {error}")
            caption = class_token
        if caption is None:
            found.missing_caption.append(path)
            own = caption_path(path, caption_extension)
            for other in by_stem.get(path.stem, []):
                if other not in (path, own) and other.suffix.lower() not in _NOT_CAPTIONS:
                    found.other_caption_ext[other.suffix] += 1
                    break
            caption = class_token
        elif caption == "":
            found.blank_first_line.append(caption_path(path, caption_extension))
        scan.items.append(ImageItem(path=path, caption=caption, repeats=repeats, size=info.size))


def _images_in(folder: Path) -> list[Path]:
    """Every image file under `folder`, at any depth."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _nothing_to_train(root: Path, setting: str, caption_extension: str, scan: FolderScan, found: _Found) -> str:
    reasons = [f"{len(scan.skipped)} image(s) could not be read"] if scan.skipped else []
    if found.zero_repeats:
        reasons.append(f"folders with 0 repeats are not used: {[p.name for p in found.zero_repeats]}")
    if scan.ignored_dirs:
        reasons.append(f"folders without the prefix are not used: {[p.name for p in scan.ignored_dirs]}")
    if found.nested:
        reasons.append(f"{len(found.nested)} image(s) sit in nested subfolders, which are not scanned")
    if found.loose:
        reasons.append(f"{len(found.loose)} image(s) sit directly in the folder, outside any <repeats>_<name> folder"
                       + (f" (is {setting} the folder '{root.name}' itself instead of its parent '{root.parent}'?)"
                          if subset_params(root.name) else ""))
    return (f"{setting}: no readable images to train on in '{root}'. Expected subfolders named <repeats>_<name> with "
            f"1 or more repeats (e.g. 10_photo) holding images ({', '.join(IMAGE_EXTENSIONS)}) and optional "
            f"'{caption_extension}' captions" + ("; " + "; ".join(reasons) if reasons else "") + ".")
