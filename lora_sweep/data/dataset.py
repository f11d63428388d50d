"""A dataset folder in kohya's DreamBooth layout: `<dir>/<repeats>_<name>/<image>` + `<image><caption_extension>`.

The scan reads image headers, caption files and the tree (pixels are decoded later, on a cache miss) and never stops
at the first problem: `inspect_folder` returns every problem (one line each, naming the setting and file) and every
`Fallback` taken: an image without a caption trains on its folder's class token (as kohya); a blank first line is an
empty caption; an image that cannot be read (a broken link, no permission, not a regular file, a file PIL cannot
identify) is skipped, counted and named with why; a dataset with no readable image, or a caption file that cannot be
read, is refused (kohya stops with an error); a multi-frame image trains on its first frame; folders
without `<repeats>_`, with 0 repeats or nested, images directly in `data.dir` and formats PIL cannot read here are
not used (kohya ignores them silently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_sweep.data import subsets
from lora_sweep.data.captions import caption_path, read_caption
from lora_sweep.data.images import probe_image
from lora_sweep.data.subsets import DatasetSpec, Subset
from lora_sweep.errors import Fallback, UserError
from lora_sweep.paths import IMAGE_EXTENSIONS, is_image_entry

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
    repeats: int  # the subset's num_repeats; a reg image's after v0.8.7's balancing (0: never used)
    size: tuple[int, int]  # (width, height) after EXIF orientation
    subset: Subset | None = None  # the options it trains with
    dataset: int = 0  # index of its DatasetSpec


@dataclass
class FolderScan:
    root: Path  # the folder scanned (a user's ~ expanded)
    setting: str = "data.dir"  # the config key naming it in messages (data.dir or data.validation_dir)
    caption_extension: str = ".txt"  # what `files_seen` and the fingerprint count as captions
    items: list[ImageItem] = field(default_factory=list)
    # every non-hidden entry but folders directly in a <repeats>_<name> folder (broken links too): what the fingerprint
    # digests
    subset_files: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # unreadable images (header at scan time, pixels at encode time)
    skipped_why: list[str] = field(default_factory=list)  # "<path> (<why>)" for each image the scan skipped
    ignored_dirs: list[Path] = field(default_factory=list)  # subfolders without the `<repeats>_` prefix
    problems: list[str] = field(default_factory=list)  # one line each, naming the setting and file: refused
    fallbacks: list[Fallback] = field(default_factory=list)  # what was used instead of what the user gave


def gone(scan: FolderScan, path: Path) -> UserError:
    """A file `scan` listed that is no longer there (removed while the job set up): one paragraph naming it."""
    return UserError(f"{scan.setting}: '{path}' is gone: it was removed after the dataset was scanned, before "
                     "training started. Put it back, or start again to train on the files that are there.")


def files_seen(scan: FolderScan, caption_extension: str | None = None) -> dict[str, list[int]]:
    """The scan's images and captions (`caption_extension`, default the scan's): {relative posix path: [size in bytes,
    mtime in ns]}, for `dataset_changes`."""
    suffixes = {*IMAGE_EXTENSIONS, (caption_extension or scan.caption_extension).lower()}
    seen = {}
    for path in scan.subset_files:
        if path.suffix.lower() in suffixes:
            with contextlib.suppress(OSError):  # gone since the scan: the job's scan tells
                stat = path.stat()
                seen[path.relative_to(scan.root).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return seen


def seen_key(scan: FolderScan, caption_extension: str | None = None) -> str:
    """A record's key for `files_seen(scan, caption_extension)`: the resolved folder and the caption extension."""
    return f"{scan.root.resolve()} {caption_extension or scan.caption_extension}"


def dataset_changes(scan: FolderScan, record: dict[str, dict[str, list[int]]],
                    caption_extension: str | None = None) -> list[str]:
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


def inspect_folder(root: str | Path, caption_extension: str = ".txt", *, setting: str = "data.dir",
                   template: Subset | None = None, is_reg: bool = False, dataset: int = 0) -> FolderScan:
    """Every readable image in `root`'s `<repeats>_<name>` subfolders with its caption, repeats and size (after EXIF
    orientation), from headers only. Never raises for what it finds; `setting` names the config key in messages.
    Each subfolder is a `Subset` made from `template` (its image_dir, num_repeats, class_tokens, is_reg and setting
    replaced; by default the data.* defaults with `caption_extension`); items name it and `dataset`."""
    root = Path(root).expanduser()
    template = template or Subset(image_dir=root, setting=setting, caption_extension=caption_extension)
    caption_extension = template.caption_extension
    scan = FolderScan(root, setting, caption_extension)
    if not root.is_dir():
        scan.problems.append(
            f"{setting}: '{root}' is not a folder. Point {setting} at a dataset in kohya's layout: a folder holding "
            "subfolders named <repeats>_<name> (e.g. 10_mychar) with images and same-named caption files.")
        return scan
    found = _Found()
    try:
        entries = sorted(root.iterdir())
    except OSError as error:
        scan.problems.append(f"{setting}: cannot list the folder '{root}' ({error.strerror or error}). Make it "
                             "readable.")
        return scan
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            found.loose.append(entry)
        elif not entry.exists():  # a link whose target is gone (a moved folder, an unplugged drive)
            found.broken_links.append(f"{entry} (a link to '{os.readlink(entry)}', which is gone)")
        elif entry.is_dir():
            params = subset_params(entry.name)
            if params is None:
                scan.ignored_dirs.append(entry)
            elif params[0] < 1:
                found.zero_repeats.append(entry)
                scan.subset_files += [p for p in _listing(entry, found) if not p.is_dir()]
            else:
                if not params[1]:
                    found.empty_class_token.append(entry)
                subset = dataclasses.replace(template, image_dir=entry, num_repeats=params[0],
                                             class_tokens=params[1], is_reg=is_reg, setting=f"{setting} '{entry.name}'")
                _scan_subset(entry, subset, dataset, scan, found)
    scan.fallbacks += found.fallbacks(setting, caption_extension, scan)
    if not scan.items:
        scan.problems.append(_nothing_to_train(root, setting, caption_extension, scan, found))
    return scan


def inspect_subset(subset: Subset, dataset: int = 0) -> FolderScan:
    """A dataset-config subset: the images directly in `subset.image_dir` (kohya does not look into subfolders), each
    captioned by its `caption_extension` file or, without one, `class_tokens`; the same problems and fallbacks as
    `inspect_folder`, named by `subset.setting`. Never raises for what it finds."""
    root, setting = Path(subset.image_dir).expanduser(), subset.setting
    scan = FolderScan(root, setting, subset.caption_extension)
    if not root.is_dir():
        scan.problems.append(f"{setting}: image_dir '{root}' is not a folder. Point image_dir at a folder holding "
                             "the subset's images and same-named caption files.")
        return scan
    found = _Found()
    _scan_subset(root, subset, dataset, scan, found)
    scan.fallbacks += [f for f in found.fallbacks(setting, subset.caption_extension, scan)
                       if not f.what.startswith("<repeats>_<name> folders without an image")]
    if not scan.items and not scan.skipped:  # v0.8.7 skips a subset without images, with a warning
        scan.fallbacks.append(Fallback(setting, "subsets without an image directly in image_dir (subfolders are not "
                                       "scanned): not used", (str(root),),
                                       "Put images in image_dir, or remove the subset."))
    elif not scan.items:
        scan.problems.append(f"{setting}: no readable images to train on directly in image_dir '{root}': "
                             f"{len(scan.skipped)} could not be read: {_listed(scan.skipped_why)}.")
    return scan


def inspect_datasets(specs: Sequence[DatasetSpec], inspect=None) -> list[FolderScan]:
    """The training scans of `specs` in order (each dataset's `folders`, then its `subsets`; its train ones before its
    reg ones, the order v0.8.7 registers their images), reg images balanced (`balance_datasets`).
    `inspect(target, spec_index, spec)` scans one (folder, is_reg) or Subset, or returns None to leave it out (default:
    `inspect_one`)."""
    inspect = inspect or inspect_one
    scans = []
    for index, spec in enumerate(specs):
        targets = sorted([*spec.folders, *spec.subsets], key=_target_is_reg)  # stable: file order within each
        found = [inspect(target, index, spec) for target in targets]
        problem = _no_train_images(spec, list(zip(targets, found, strict=True)))
        first = next((k for k, scan in enumerate(found) if scan is not None), None)
        if problem and first is not None:  # on a copy: `inspect` may return a memo's scan
            found[first] = dataclasses.replace(found[first], problems=[*found[first].problems, problem])
        scans += found
    return balance_datasets([scan for scan in scans if scan is not None], specs)


def _no_train_images(spec: DatasetSpec, scanned: list) -> str | None:
    """The problem of a dataset whose (target, scan) pairs hold no train image, when its train targets were all
    scanned without a problem of their own (a missing or unreadable folder is named by that); else None."""
    train = [scan for target, scan in scanned if not _target_is_reg(target)]
    if not scanned or any(scan is None or scan.problems for scan in train):
        return None
    if any(not _is_reg(item) for _, scan in scanned if scan is not None for item in scan.items):
        return None
    why = []
    reg = sum(len(scan.items) for target, scan in scanned if _target_is_reg(target) and scan is not None)
    if reg:
        why.append(f"only reg images ({reg}, is_reg = true), which train only beside train images (v0.8.7 balances "
                   "them to the train entries: 0 here)")
    dropped = [path for f in spec.fallbacks if "num_repeats < 1" in f.what for path in f.paths]
    if dropped:
        why.append(f"subsets with num_repeats < 1 are not used: {_listed([repr(p) for p in dropped])}")
    empty = [repr(str(scan.root)) for scan in train if not scan.items]
    if empty:
        why.append(f"train subsets without an image: {_listed(empty)}")
    return (f"{spec.setting}: no train images to train on: {'; '.join(why) or 'no train subset'}. Give the dataset "
            "a subset with images directly in its image_dir, num_repeats >= 1 and is_reg = false (the default).")


def _target_is_reg(target: Subset | tuple[Path, bool]) -> bool:
    return target.is_reg if isinstance(target, Subset) else target[1]


def inspect_one(target: Subset | tuple[Path, bool], index: int, spec: DatasetSpec) -> FolderScan:
    """`inspect_subset` of a Subset, or `inspect_folder` of a (folder, is_reg) of dataset `index` (`spec`)."""
    if isinstance(target, Subset):
        return inspect_subset(target, index)
    folder, is_reg = target
    return inspect_folder(folder, setting=folder_setting(spec, is_reg), template=spec.template, is_reg=is_reg,
                          dataset=index)


def folder_setting(spec: DatasetSpec, is_reg: bool) -> str:
    """The setting naming a `<repeats>_<name>` tree of `spec` in messages: data.dir or data.reg_data_dir."""
    return "data.reg_data_dir" if is_reg else spec.template.setting if spec.template else spec.setting


NEVER_USED = ("reg images never used: v0.8.7's balancing stops once the reg entries reach the train entries "
              "(images x repeats), so the images after that point are not registered")


def balance_datasets(scans: Sequence[FolderScan], specs: Sequence[DatasetSpec]) -> list[FolderScan]:
    """Copies of `scans` whose reg items carry v0.8.7's balanced repeats (`subsets.balance_reg` per dataset, reg
    images in scan order: subset order, then sorted path; 0 = never used), with a Fallback naming the never-used
    ones. The scans themselves are left as they are (a memo may hold them)."""
    scans = [dataclasses.replace(s, items=list(s.items), skipped=list(s.skipped), fallbacks=list(s.fallbacks))
             for s in scans]
    for index in range(len(specs)):
        places = [(scan, i) for scan in scans for i, item in enumerate(scan.items) if item.dataset == index]
        train = sum(scan.items[i].repeats for scan, i in places if not _is_reg(scan.items[i]))
        reg = [(scan, i) for scan, i in places if _is_reg(scan.items[i])]
        if not reg:
            continue
        balanced = subsets.balance_reg(train, [scan.items[i].repeats for scan, i in reg])
        unused = []
        for (scan, i), repeats in zip(reg, balanced, strict=True):
            scan.items[i] = dataclasses.replace(scan.items[i], repeats=repeats)
            if repeats == 0:
                unused.append(scan.items[i])
        if unused:
            first = next(scan for scan, i in reg if scan.items[i] is unused[0])
            first.fallbacks.append(Fallback(
                first.setting, NEVER_USED, tuple(str(item.path) for item in unused),
                f"Lower the reg folders' repeats or use fewer reg images; {train} train entries were matched."))
    return scans


def _is_reg(item: ImageItem) -> bool:
    return item.subset is not None and item.subset.is_reg


def raw_reg_entries(items: Sequence[ImageItem]) -> int:
    """kohya's num_reg_images (ss_num_reg_images): reg images x their subset's num_repeats, before balancing."""
    return sum(item.subset.num_repeats for item in items if _is_reg(item))


@dataclass
class _Found:
    """What the scan saw besides the items, gathered for the warnings."""

    loose: list[Path] = field(default_factory=list)  # images directly in the root
    broken_links: list[str] = field(default_factory=list)  # "<link> (<target>)" of links to nothing, not images
    unlisted: list[str] = field(default_factory=list)  # "<folder> (<why>)" of subset folders that cannot be listed
    zero_repeats: list[Path] = field(default_factory=list)
    empty_class_token: list[Path] = field(default_factory=list)  # `10_` or `10`: trained, with an empty class token
    nested: list[Path] = field(default_factory=list)  # images in subfolders of a subset folder
    no_images: list[Path] = field(default_factory=list)  # subset folders with nothing named like an image
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
            (scan.skipped_why, "images that cannot be read: skipped (counted in data.skipped_images)",
             "Restore a link's target, make the file readable, or re-save it as PNG or JPEG."),
            (self.broken_links, "links whose target is gone: not used",
             "Restore the target (reconnect the drive, move the folder back) or remove the link."),
            (self.unlisted, "subset folders that cannot be listed: not used", "Make them readable."),
            (self.multi_frame, "images that are animated or have several frames: trained on their first frame only",
             "Extract the frames you want as separate images."),
            (scan.ignored_dirs, "subfolders without kohya's '<repeats>_' prefix: not used",
             "Rename a folder to <repeats>_<name> (e.g. 10_mychar) to train on it."),
            (self.empty_class_token, "folders named <repeats>_ or <repeats> without a <name>: trained with an empty "
             "class token, as kohya does (their images without a caption file train on an empty caption)",
             "Name the folder <repeats>_<name> (e.g. 10_mychar) to give it a class token."),
            (self.no_images, "<repeats>_<name> folders without an image: nothing trained from them",
             "Put images in them, or remove them."),
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


def _listing(folder: Path, found: _Found) -> list[Path]:
    """The non-hidden entries of a subset folder, sorted; none (and the folder named) when it cannot be listed."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as error:
        found.unlisted.append(f"{folder} ({error.strerror or error})")
        return []


def unreadable_why(path: Path) -> str | None:
    """Why a file listed as an image cannot be read, in a few words; None when its header can be read."""
    try:
        mode = os.stat(path).st_mode  # follows links
    except FileNotFoundError:
        return f"a link to '{os.readlink(path)}', which is gone" if path.is_symlink() else "gone since it was listed"
    except OSError as error:
        return error.strerror or str(error)
    if not stat.S_ISREG(mode):  # a FIFO would block the read; a device is not an image
        return "not a regular file"
    try:
        probe_image(path)
    except OSError as error:
        if error.errno is not None:  # the OS refused (permission, I/O): PIL's own OSErrors carry no errno
            return error.strerror or str(error)
        return "empty (0 bytes)" if os.stat(path).st_size == 0 else f"PIL cannot read it: {error}"
    except Exception as error:  # PIL raises many types for files it cannot identify
        return f"PIL cannot read it: {type(error).__name__}"
    return None


def _scan_subset(folder: Path, subset: Subset, dataset: int, scan: FolderScan, found: _Found) -> None:
    setting, caption_extension = scan.setting, subset.caption_extension
    class_token = subset.class_tokens or ""  # kohya: neither a caption file nor class tokens -> an empty caption
    files = _listing(folder, found)
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        if path.is_dir() and path.suffix.lower() in IMAGE_EXTENSIONS:  # kohya's glob would take it for an image
            scan.skipped.append(path)
            scan.skipped_why.append(f"{path} (a folder, not an image file)")
        if path.is_dir():
            found.nested += _images_in(path)
        else:  # files, and links whose target is gone: the image loop names those
            by_stem[path.stem].append(path)
            scan.subset_files.append(path)
    for path in files:
        suffix = path.suffix.lower()
        if suffix in NOT_READ_EXTENSIONS:
            found.not_read.append(path)
        if not is_image_entry(path):  # compare --score lists a run's training images by the same rule
            continue
        try:
            info = probe_image(path) if stat.S_ISREG(os.stat(path).st_mode) else None
        except Exception:  # PIL raises many types for files it cannot identify; the OS, OSErrors
            info = None
        if info is None:
            scan.skipped.append(path)
            scan.skipped_why.append(f"{path} ({unreadable_why(path) or 'cannot be read'})")
            continue
        if info.frames > 1:
            found.multi_frame.append(f"{path} ({info.frames} frames)")
        try:
            caption = read_caption(path, caption_extension, enable_wildcard=subset.enable_wildcard)
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
        scan.items.append(ImageItem(path=path, caption=caption, repeats=subset.num_repeats, size=info.size,
                                    subset=subset, dataset=dataset))
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
        found.no_images.append(folder)


def _images_in(folder: Path) -> list[Path]:
    """Every image file under `folder`, at any depth."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _listed(lines: list[str], shown: int = 3) -> str:
    return ", ".join(lines[:shown]) + (f" and {len(lines) - shown} more" if len(lines) > shown else "")


def _nothing_to_train(root: Path, setting: str, caption_extension: str, scan: FolderScan, found: _Found) -> str:
    reasons = [f"{len(scan.skipped)} image(s) could not be read: {_listed(scan.skipped_why)}"] if scan.skipped else []
    if found.broken_links:
        reasons.append(f"links whose target is gone: {_listed(found.broken_links)}")
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


def datasets_record(specs: list[DatasetSpec], items) -> list[dict]:
    """The resolved datasets as JSON values: each dataset's fields and its subsets' (a folder-mode dataset: one per
    `<repeats>_<name>` folder), with image counts and entries (images x repeats, reg balanced)."""
    record = []
    for index, spec in enumerate(specs):
        mine = [item for item in items if item.dataset == index]
        subsets = list(dict.fromkeys(item.subset for item in mine))
        left_out = ("subsets", "folders", "template", "fallbacks")  # fallbacks: the run's warnings.txt
        values = {k: v for k, v in _json_fields(spec).items() if k not in left_out}
        record.append({**values, "subsets": [
            {**_json_fields(subset), "images": sum(item.subset == subset for item in mine),
             "entries": sum(item.repeats for item in mine if item.subset == subset)} for subset in subsets]})
    return record


def resolved_dataset_params(specs: list[DatasetSpec]) -> dict[str, Any]:
    """The value every dataset and subset trains with, as MLflow params: `data.datasets.<i>.<key>` and
    `data.datasets.<i>.subsets.<j>.<key>` (j in the file's order), so runs compare on what trained, not on the data.*
    fallbacks a dataset config overrides."""
    params = {}
    for i, spec in enumerate(specs):
        for key, value in _json_fields(spec).items():
            if key not in ("setting", "subsets", "folders", "template", "fallbacks"):
                params[f"data.datasets.{i}.{key}"] = value
        for j, subset in enumerate(spec.subsets):
            for key, value in _json_fields(subset).items():
                if key != "setting":
                    params[f"data.datasets.{i}.subsets.{j}.{key}"] = value
    return params


def _json_fields(value) -> dict:
    return {f.name: _json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}


def _json_value(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value
