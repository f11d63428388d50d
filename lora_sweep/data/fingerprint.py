"""A dataset's fingerprint, which skip-finished compares besides the config so an edited dataset trains again: a sha256
over every subset file by relative path and content. The content digest is the latent cache's
(`cache_keys.file_sha256`, memoized in `.hashes/`), so after a training it costs a `stat` per file. Copying the
dataset elsewhere keeps it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_sweep.data.cache_keys import file_sha256
from lora_sweep.data.dataset import FolderScan, gone
from lora_sweep.paths import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Fingerprint:
    digest: str  # 16 hex digits
    files: int
    folders: tuple[str, ...]  # absolute dataset folders, for messages

    def describe(self) -> str:
        return f"dataset {self.digest} ({self.files} files in {', '.join(self.folders)})"


def dataset_fingerprint(scans: Sequence[FolderScan], caption_extension: str | None = None, *,
                        memo_dir: Path | None = None, files: Sequence[Path] = ()) -> Fingerprint:
    """Fingerprint of the training scans' subset files and any validation scan's (in that order), hidden files aside,
    then the content of `files` (a data.dataset_config file). Captions by `caption_extension`, default each scan's.
    `memo_dir`: the cache's `.hashes/`. A file removed since the scan is a UserError naming it; one the scan could not
    read counts by its name alone."""
    digest = hashlib.sha256()
    count = 0
    for index, scan in enumerate(scans):
        suffixes = {*IMAGE_EXTENSIONS, (caption_extension or scan.caption_extension).lower()}
        digest.update(f"folder {index}\n".encode())
        for path in scan.subset_files:
            if path.suffix.lower() not in suffixes:
                continue
            relative = path.relative_to(scan.root).as_posix()
            try:  # a broken link, a FIFO, a file without read permission: named by the scan, counted by name
                sha = file_sha256(path, memo_dir=memo_dir) if path.is_file() or not os.path.lexists(path) else None
            except FileNotFoundError:
                raise gone(scan, path) from None
            except PermissionError:
                sha = None
            if sha is None:
                digest.update(f"{relative}\tunreadable\n".encode())
                continue
            digest.update(f"{relative}\t{sha}\n".encode())
            count += 1
    for path in files:
        digest.update(f"file {Path(path).name}\t{file_sha256(path, memo_dir=memo_dir)}\n".encode())
    return Fingerprint(digest.hexdigest()[:16], count, tuple(str(scan.root.resolve()) for scan in scans))
