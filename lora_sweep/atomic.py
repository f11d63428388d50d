"""Atomic writes: a temporary name in the same folder, then a rename, so a reader sees the old file or the whole new
one, even if the writer is killed or the disk fills. A write that fails on a full disk raises an OSError (ENOSPC or
EDQUOT) naming the target file, whatever the writer raised (torch.save says "unexpected pos").
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lora_sweep.errors import disk_full_error

FULL_BELOW_BYTES = 2**20  # a write that failed with less free than this on its disk failed for want of space


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success fsync it and rename it over `target`, else remove it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 (and writers such as safetensors replace the file)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except Exception as error:
        full = disk_full_error(error)
        if full is None and _free_bytes(target.parent) < FULL_BELOW_BYTES:
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if full is not None and full.filename != str(target):
            raise OSError(full.errno, full.strerror, str(target)) from error
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def give_new_file_modes(folder: Path) -> None:
    """Give `folder`, its subfolders and files the modes the umask gives new ones: mkdtemp makes 0700 and some writers
    (diffusers' save_pretrained) 0600, which another account sharing a cache could not read."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return FULL_BELOW_BYTES


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Atomically write `data` to `target`."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Atomically write `text` (UTF-8) to `target`."""
    return write_bytes(target, text.encode("utf-8"))


def write_with(target: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomically write `target` with a function that writes to a given path (e.g. safetensors' save_file)."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)
