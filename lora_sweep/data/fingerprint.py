"""A dataset's fingerprint: what skip-finished compares besides the config, so an edited dataset trains again.

The fingerprint is a sha256 over every image and caption file of the kohya subsets (`<repeats>_<name>/` folders)
by relative path and content, the content digest being the one the latent cache already keys its entries by
(`cache_keys.file_sha256`, memoized in the cache's `.hashes/` by path, size, mtime and inode): after a training
has encoded the dataset, fingerprinting it costs one `stat` per file. Any edit (an image touched up, a caption
reworded, a file added, removed or moved to another subset) changes it; copying the dataset elsewhere does not.
The files are the ones the job's scan listed (`FolderScan.subset_files`): the folders are not listed again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_sweep.data.cache_keys import file_sha256
from lora_sweep.data.dataset import IMAGE_EXTENSIONS, FolderScan, gone


@dataclass(frozen=True)
class Fingerprint:
    digest: str  # 16 hex digits
    files: int
    folders: tuple[str, ...]  # absolute dataset folders, for messages

    def describe(self) -> str:
        return f"dataset {self.digest} ({self.files} files in {', '.join(self.folders)})"


def dataset_fingerprint(scans: Sequence[FolderScan], caption_extension: str = ".txt", *,
                        memo_dir: Path | None = None) -> Fingerprint:
    """Fingerprint of the training folder's scan and any validation folder's (in that order: swapping them changes
    it): each image and `caption_extension` file of their subsets, hidden files aside. A file removed since the
    scan is a UserError naming it.

    `memo_dir`: the cache's `.hashes/` folder, where file digests are remembered between runs."""
    digest = hashlib.sha256()
    count = 0
    suffixes = {*IMAGE_EXTENSIONS, caption_extension.lower()}
    for index, scan in enumerate(scans):
        digest.update(f"folder {index}\n".encode())
        for path in scan.subset_files:
            if path.suffix.lower() in suffixes:
                try:
                    sha = file_sha256(path, memo_dir=memo_dir)
                except FileNotFoundError:
                    raise gone(scan, path) from None
                digest.update(f"{path.relative_to(scan.root).as_posix()}\t{sha}\n".encode())
                count += 1
    return Fingerprint(digest.hexdigest()[:16], count, tuple(str(scan.root.resolve()) for scan in scans))
