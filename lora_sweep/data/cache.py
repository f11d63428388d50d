"""A content-addressed tensor cache on disk (latents, text-encoder outputs), shared by every job of every sweep.

Keys hash what determines a tensor and nothing else (`cache_keys`), so every variant of a sweep reads what the first
wrote and an edit misses exactly the entries it changes. Layout: `<kind>/<key[:2]>/<key>.safetensors`,
`.locks/<kind>/<key>.lock`, `.hashes/` (file digests). Writes are atomic renames; concurrent jobs take a per-key
`flock` (the second waits, then reads). Without flock, or past `lock_timeout_s`, a job computes its own copy: the
rename keeps that safe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_sweep import atomic
from lora_sweep.data.cache_keys import (
    CACHE_FORMAT,
    file_sha256,
    model_identity,
)
from lora_sweep.errors import UserError
from lora_sweep.paths import default_cache_dir

try:
    import fcntl
except ImportError:  # Windows: no locking, only the atomic rename
    fcntl = None

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_SHARD = re.compile(r"[0-9a-f]{2}")
_KIND = re.compile(r"[a-z][a-z0-9_]*")
_OWNED = re.compile(r"[0-9a-f]{64}\.(safetensors|json|lock)|\.[0-9a-f]{64}\.(safetensors|json)\.[^/]+\.tmp")


class NonFiniteCacheError(UserError, RuntimeError):
    """A tensor to be cached holds NaN or Inf (kohya raises RuntimeError for NaN latents); nothing was written."""


class _KeyLock:
    """An exclusive flock on a per-key lock file, deleted on release. After locking, the path must still name the locked
    inode (a holder may have deleted it); the kernel releases the flock when its process dies."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self, timeout_s: float) -> bool:
        """True once held (or when locking is unavailable here); False after `timeout_s` of waiting."""
        if fcntl is None:
            return True
        deadline, pause = time.monotonic() + timeout_s, 0.02
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # the folder was removed meanwhile (clear())
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
                continue
            except OSError as error:  # e.g. ENOLCK on a network filesystem
                os.close(fd)
                log.warning("cache: no file locking at %s (%s); jobs may compute an entry twice", self.path, error)
                return True
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return True
            os.close(fd)  # the file was replaced or deleted while we waited: lock the current one

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class TensorCache:
    """Entries of named tensors by (kind, key); counts hits and misses of `get_or_compute` for the run's metrics."""

    def __init__(self, root: str | os.PathLike | None = None, *, lock_timeout_s: float = 900.0):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.lock_timeout_s = lock_timeout_s
        self.hits = self.misses = 0
        self.hits_by_kind: dict[str, int] = {}
        self.misses_by_kind: dict[str, int] = {}

    def path_for(self, kind: str, key: str) -> Path:
        if not _KIND.fullmatch(kind) or not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ValueError(f"cache kind must match [a-z][a-z0-9_]* and key be 64 hex digits: {kind!r}, {key!r}")
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors (CPU), or None if absent or unreadable (then it is recomputed and replaced)."""
        from safetensors.torch import load_file

        path = self.path_for(kind, key)
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except Exception as error:  # a damaged file (disk trouble, manual edits): treat as missing
            log.warning("cache: unreadable entry %s (%s); recomputing it", path, error)
            return None

    def get_or_compute(self, kind: str, key: str, compute: Callable[[], Mapping[str, torch.Tensor]],
                       meta: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The cached entry, or `compute()` stored and returned as stored (CPU copies: a first run and a cached run see
        identical tensors). Another job computing the same key is waited for, then read."""
        tensors = self.get(kind, key)
        if tensors is None:
            with self._locked(kind, key, self.lock_timeout_s):
                tensors = self.get(kind, key)
                if tensors is None:
                    stored = self._write(kind, key, compute(), meta)
                    self._count(kind, hit=False)
                    return stored
        self._count(kind, hit=True)
        return tensors

    def stats(self) -> dict[str, int]:
        """Metrics for the run: cache/hits, cache/misses, and cache/<kind>/hits|misses."""
        out = {"cache/hits": self.hits, "cache/misses": self.misses}
        for kind in sorted(set(self.hits_by_kind) | set(self.misses_by_kind)):
            out[f"cache/{kind}/hits"] = self.hits_by_kind.get(kind, 0)
            out[f"cache/{kind}/misses"] = self.misses_by_kind.get(kind, 0)
        return out

    def model_identity(self, path: str | os.PathLike, component: str | None = None) -> str:
        """`model_identity` with file digests remembered under this cache (weights are hashed once per version)."""
        return model_identity(path, component, memo_dir=self.root / ".hashes")

    def file_sha256(self, path: str | os.PathLike) -> str:
        return file_sha256(path, memo_dir=self.root / ".hashes")

    def size_bytes(self) -> int:
        """Bytes of everything the cache wrote under its root (entries, leftovers of killed writes, digests)."""
        return sum(_size(f) for f in self._owned_files())

    def clear(self) -> int:
        """Delete the files the cache writes (only its own names) and return the bytes freed; safe while jobs run."""
        freed = 0
        for folder in self._owned_folders():
            for f in [f for f in folder.iterdir() if _OWNED.fullmatch(f.name) and f.is_file()]:
                size = _size(f)
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                    freed += size
            for empty in (folder, folder.parent):  # only folders the cache made, and only when empty
                with contextlib.suppress(OSError):
                    empty.rmdir()
        return freed

    def usage(self) -> dict[str, tuple[int, int]]:
        """(entries, bytes) per kind (`latents`, `text`; leftovers of killed writes in bytes only), and "bookkeeping":
        (files, bytes) of digests and locks."""
        usage: dict[str, list[int]] = {}
        for f in self._owned_files():
            top = f.parent.parent.name  # <root>/<kind>/<shard>/file, <root>/.hashes/<shard>/file, .locks/<kind>/file
            kind = "bookkeeping" if top in (".hashes", ".locks") else top
            counts = usage.setdefault(kind, [0, 0])
            counts[0] += kind == "bookkeeping" or f.name.endswith(".safetensors") and not f.name.startswith(".")
            counts[1] += _size(f)
        return {kind: (n, size) for kind, (n, size) in sorted(usage.items())}

    def summary(self) -> str:
        entries = sum(1 for f in self._owned_files() if f.suffix == ".safetensors")
        return f"{entries} entries, {self.size_bytes() / 2**20:.1f} MiB in {self.root}"


    def _count(self, kind: str, *, hit: bool) -> None:
        if hit:
            self.hits += 1
            self.hits_by_kind[kind] = self.hits_by_kind.get(kind, 0) + 1
        else:
            self.misses += 1
            self.misses_by_kind[kind] = self.misses_by_kind.get(kind, 0) + 1

    def _lock_path(self, kind: str, key: str) -> Path:
        self.path_for(kind, key)  # validates
        return self.root / ".locks" / kind / f"{key}.lock"

    @contextlib.contextmanager
    def _locked(self, kind: str, key: str, timeout_s: float) -> Iterator[None]:
        lock = _KeyLock(self._lock_path(kind, key))
        if not lock.acquire(timeout_s):
            log.warning("cache: waited %.0f s for another job's %s entry %s; computing it here too",
                        timeout_s, kind, key[:12])
        try:
            yield
        finally:
            lock.release()

    def _write(self, kind: str, key: str, tensors: Mapping[str, torch.Tensor],
               meta: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        import torch
        from safetensors.torch import save_file

        path = self.path_for(kind, key)
        source = (meta or {}).get("source", f"{kind} entry {key[:12]}")
        stored = {}
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"cache entry {name!r} must be a torch.Tensor, not {type(tensor).__name__}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteCacheError(
                    f"the {kind} of '{source}' contain NaN or Inf (tensor {name!r}); nothing was cached and the run "
                    "stops, as kohya does for NaN latents. With SDXL's VAE in float16 this is its known overflow: "
                    "encode in float32 (kohya's --no_half_vae) or use the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix)."
                )
            stored[name] = tensor.detach().to("cpu").contiguous().clone()
        header = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
                  for k, v in (meta or {}).items()}
        header.update({"lora_sweep.format": str(CACHE_FORMAT), "lora_sweep.kind": kind, "lora_sweep.key": key})
        if not _readable(path):
            try:
                with atomic.atomic_path(path) as tmp:
                    save_file(stored, str(tmp), metadata=header)
                    if _readable(path):  # another job finished first: keep its entry, drop ours
                        raise _AlreadyStored
            except _AlreadyStored:
                pass
        return stored

    def _owned_files(self) -> Iterator[Path]:
        for folder in self._owned_folders():
            yield from (f for f in folder.iterdir() if _OWNED.fullmatch(f.name) and f.is_file())

    def _owned_folders(self) -> list[Path]:
        """The folders this cache writes files into: <kind>/<shard>, .hashes/<shard> and .locks/<kind>."""
        folders: list[Path] = []
        if not self.root.is_dir():
            return folders
        for top in self.root.iterdir():
            if not top.is_dir() or top.is_symlink():
                continue
            if top.name == ".locks":
                pattern = _KIND
            elif top.name == ".hashes" or _KIND.fullmatch(top.name):
                pattern = _SHARD
            else:
                continue
            folders += [f for f in top.iterdir() if f.is_dir() and not f.is_symlink() and pattern.fullmatch(f.name)]
        return folders


class _AlreadyStored(Exception):
    pass


def _readable(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
        return True
    except Exception:
        return False


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0
