"""Cache keys: sha256 of what determines a cached tensor (image, caption and model-weight content) and nothing else;
training options are not parameters here, so they cannot reach a key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_sweep import atomic
from lora_sweep.errors import UserError

CACHE_FORMAT = 1  # bump when what an entry holds changes for the same identity; it is part of every key
RESAMPLE = "cv2-inter-area"  # the resize of lora_sweep.data.buckets.resize_and_center_crop, part of latent keys
LATENT_HOLDS = "posterior mean, std"  # entries before it held one drawn sample: their keys differ
# Where a single-file SDXL checkpoint keeps each part (a diffusers folder: the sub-folders below).
_FILE_PREFIXES = {"vae": ("first_stage_model.",), "text": ("conditioner.embedders.", "cond_stage_model.")}
_SUBFOLDERS = {"vae": ("vae",), "text": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}


def cache_key(**identity: Any) -> str:
    """sha256 (hex) of the canonical JSON of `identity` plus CACHE_FORMAT. Values are JSON data; a Path is refused (hash
    the file's content instead). Prefer `latent_cache_key` / `text_cache_key`."""
    if not identity:
        raise ValueError("cache_key needs at least one identity field")

    def refuse(value: Any) -> Any:
        raise TypeError(f"cache_key: {type(value).__name__} {value!r} is not JSON data; hash content instead")

    payload = json.dumps({"format": CACHE_FORMAT, "identity": identity}, sort_keys=True, separators=(",", ":"),
                         ensure_ascii=False, allow_nan=False, default=refuse)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def latent_cache_key(*, vae: str, image_sha256: str, bucket: Sequence[int], resized: Sequence[int],
                     crop_left_top: Sequence[int], flipped: bool, vae_dtype: str = "float32") -> str:
    """Key of one image's posterior (mean and std): VAE identity, image bytes, bucket, resize, crop, flip and the VAE's
    encode dtype (fixed, not the training precision's, so precision variants share entries). The sample is drawn per
    run, so data.latent_sample=sample and mean share the entry."""
    return cache_key(kind="latents", vae=vae, image=image_sha256, bucket=list(bucket), resized=list(resized),
                     crop=list(crop_left_top), flip=bool(flipped), vae_dtype=vae_dtype, resample=RESAMPLE,
                     holds=LATENT_HOLDS)


def text_cache_key(*, text_encoders: str, caption: str, max_token_length: int = 75, dtype: str = "float32",
                   attention: str = "eager") -> str:
    """Key of one caption's text-encoder outputs (hidden states of both encoders and the pooled output); `attention`
    is the encoders' (model.loading.TEXT_ENCODER_ATTENTION), so entries encoded with SDPA are not reused."""
    return cache_key(kind="text", text_encoders=text_encoders, caption=caption, max_token_length=max_token_length,
                     dtype=dtype, attention=attention)


def computed_key(key: str, device: Any) -> str:
    """The store key of an entry of `key` (`latent_cache_key`, `text_cache_key`) computed on `device`: on the CPU,
    torch's intra-op thread count joins the identity, elsewhere it is `key` itself.

    On the CPU the encoders' products and reductions split their sums by thread, so the VAE's posterior comes out
    different in the last bits at 1 and 2 threads (2.3e-7 relative on SDXL's VAE at 64 px); kohya encodes afresh at
    its run's count, so an entry encoded at another count would make the run's latents differ from kohya's
    (docs/kohya-exact.md#cpu-threads). `key` itself stays what seeds draws outside the training's stream
    (`posterior_seed`), the same on every machine.
    """
    import torch

    if torch.device(device).type != "cpu":
        return key
    return cache_key(kind="computed", key=key, cpu_threads=torch.get_num_threads())


def posterior_seed(key: str) -> int:
    """A seed from a latent entry's key, for a posterior sample outside the training's stream (validation images): the
    same whichever job draws it."""
    return int(key[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF


def file_sha256(path: str | os.PathLike, *, memo_dir: Path | None = None) -> str:
    """sha256 (hex) of a file's bytes; with `memo_dir`, remembered by (path, size, mtime, inode) (files modified in the
    last 2 s are always read, as git does)."""
    return _memoized(Path(path), "file", memo_dir, lambda: _sha256_ranges(Path(path), None))


def model_identity(path: str | os.PathLike, component: str | None = None, *, memo_dir: Path | None = None) -> str:
    """sha256 over the weights' file contents: renaming a model keeps its entries, editing a weight misses.

    `component` narrows it: "vae" (vae/; a single file's first_stage_model.*) or "text" (text_encoder*/, tokenizer*/;
    conditioner.embedders.*); without those, the whole folder or file counts. Hidden files are skipped. About 1 s per
    GB once; with `memo_dir`, a stat per file after.
    """
    path = Path(path).expanduser()
    if component is not None and component not in _SUBFOLDERS:
        raise ValueError(f"component must be one of {sorted(_SUBFOLDERS)} or None, not {component!r}")
    if path.is_file():
        prefixes = _FILE_PREFIXES.get(component or "", ())
        digest = None
        if prefixes and path.suffix == ".safetensors":
            digest = _memoized(path, "part:" + ",".join(prefixes), memo_dir, lambda: _sha256_ranges(path, prefixes))
        digest = digest or file_sha256(path, memo_dir=memo_dir)
        return hashlib.sha256(f"file\t{digest}".encode()).hexdigest()
    if not path.is_dir():
        raise UserError(f"model path '{path}' does not exist; give a diffusers folder or a .safetensors file.")
    roots = [path / name for name in _SUBFOLDERS.get(component or "", ()) if (path / name).is_dir()] or [path]
    files = [f for r in roots for f in _files(r)]
    for f in files:
        if not f.exists():  # listed but gone: a link whose blob or target was removed
            raise UserError(f"model folder '{path}': '{f}' is a link to '{os.readlink(f)}', which is gone. Restore "
                            "it (download the model again) or point model.path at a complete copy.")
    lines = [f"{f.relative_to(path).as_posix()}\t{file_sha256(f, memo_dir=memo_dir)}" for f in files]
    if not lines:
        raise UserError(f"model folder '{path}' holds no files for {component or 'the model'}.")
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(root, followlinks=True):  # HF snapshots are links to blobs
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / n for n in names if not n.startswith(".")]
    return sorted(found)


def _sha256_ranges(path: Path, prefixes: tuple[str, ...] | None) -> str | None:
    """sha256 of the file, or of the names, dtypes, shapes and bytes of the tensors under `prefixes`; None if none."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if prefixes is None:
            ranges = [(0, None)]
        else:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            names = sorted(n for n in header if n != "__metadata__" and n.startswith(prefixes))
            if not names:
                return None
            ranges = []
            for name in names:
                info = header[name]
                digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode("utf-8"))
                start, end = info["data_offsets"]
                ranges.append((8 + header_len + start, end - start))
        for offset, length in ranges:
            f.seek(offset)
            while length is None or length > 0:
                chunk = f.read(1 << 20 if length is None else min(1 << 20, length))
                if not chunk:
                    break
                digest.update(chunk)
                length = None if length is None else length - len(chunk)
    return digest.hexdigest()


def _memoized(path: Path, what: str, memo_dir: Path | None, compute: Callable[[], str | None]) -> str | None:
    st = path.stat()
    if memo_dir is None or time.time_ns() - st.st_mtime_ns < 2_000_000_000:
        return compute()  # a file changed in the last 2 s could change again within one mtime tick: no memo
    state = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, what])
    name = hashlib.sha256(state.encode("utf-8")).hexdigest()
    memo = Path(memo_dir) / name[:2] / f"{name}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads(memo.read_text(encoding="utf-8"))["sha256"]
    digest = compute()
    with contextlib.suppress(OSError):
        atomic.write_text(memo, json.dumps({"sha256": digest, "path": str(path)}))
    return digest
