"""Failing early and clearly: free space before training, and messages a user can act on.

Why: a sweep of hours-long runs must not find its disk full at step 4000. Writable folders with free space are
checked before the model loads (checks/folders.py), the states' and checkpoints' space once the LoRA exists (its real
size). A disk that fills at any moment anyway ends the run in `failure_reason`: one paragraph naming the file and
what was saved.
"""

from __future__ import annotations

import errno
import os
import shutil
import traceback
from collections.abc import Mapping
from pathlib import Path

from lora_sweep.errors import SamplingOutOfMemory, UserError, disk_full_error, is_out_of_memory
from lora_sweep.paths import cache_root, state_root

# Optimizer state tensors per LoRA parameter, roughly (8-bit states are a quarter of fp32 ones).
OPTIMIZER_STATE_SLOTS = {"adamw": 2.0, "adamw8bit": 0.5, "lion8bit": 0.25, "prodigy": 4.0,
                         "dadapt_adam": 3.0, "dadapt_adam_preprint": 3.0, "paged_adamw8bit": 0.5,
                         "sgd_nesterov": 1.0, "adafactor": 1.0}  # Adafactor: factored moments, beta1's full one
HEADROOM_BYTES = 16 * 2**20  # left free on each disk: logs, MLflow's files, the store's journal
# LoRA parameters per unit of network.rank (U-Net, both text encoders) of a model whose size is known before it loads
LORA_NUMEL_PER_RANK = {"tiny": (24_960, 3_360), "tiny_random": (24_960, 3_360)}
TINY_MODEL_BYTES = 9_700_000  # the random tiny model's diffusers folder, built into the cache on first use
PHOTOS_BYTES = 5_200_000  # the bundled photos as PNGs, written into the cache on first use


def check_free_space(needs: Mapping[Path, tuple[str, int | None]]) -> None:
    """`needs`: folder (made or not yet) -> (config field, bytes it will receive; None: not known before the model
    loads). Folders on one filesystem share its free space, which must hold their bytes plus HEADROOM_BYTES; a
    UserError naming them if not. Makes nothing."""
    if (problem := free_space_problem(needs)) is not None:
        raise UserError(problem)


def free_space_problem(needs: Mapping[Path, tuple[str, int | None]]) -> str | None:
    """`check_free_space`'s paragraph, or None when every disk has room."""
    by_device: dict[int, list[tuple[Path, str, int | None]]] = {}
    for folder, (what, size) in needs.items():
        by_device.setdefault(os.stat(_existing(folder)).st_dev, []).append((Path(folder), what, size))
    for entries in by_device.values():
        written = sum(size or 0 for _, _, size in entries)
        free = shutil.disk_usage(_existing(entries[0][0])).free
        if free >= written + HEADROOM_BYTES:
            continue
        listing = ", ".join(f"{what} '{folder}'" + (f" ({_mib(size)})" if size else "")
                            for folder, what, size in entries)
        unknown = any(size is None for _, _, size in entries)
        writes = (f"this training will write {'at least' if unknown else 'about'} {_mib(written)} and " if written
                  else "")
        return (f"not enough free disk space: {_mib(free)} free where {writes}lora-sweep keeps {_mib(HEADROOM_BYTES)} "
                f"free: {listing}. Free some space, or point those folders at another disk; states and checkpoints "
                "take less with a lower train.keep_states or a higher train.save_every (nothing was trained).")
    return None


def _existing(folder: Path) -> Path:
    """`folder`, or its nearest parent that exists (whose disk it will be on)."""
    folder = Path(folder).expanduser()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def planned_bytes(cfg) -> tuple[int, int] | None:
    """(state folder bytes, output folder bytes) from the config alone, without epoch checkpoints; None where the
    model's LoRA size is known only once it loads (SDXL, model.path)."""
    per_rank = None if cfg.model.path else LORA_NUMEL_PER_RANK.get(cfg.model.name)
    if per_rank is None:
        return None
    unet, text = per_rank
    numel = cfg.network.rank * (unet + text * bool(cfg.network.train_text_encoder))
    return expected_bytes(lora_numel=numel, optimizer=cfg.optimizer.name, keep_states=cfg.train.keep_states,
                          save_every=cfg.train.save_every, max_steps=cfg.train.max_steps, epoch_checkpoints=0)


def first_use_bytes(cfg) -> int:
    """Bytes a job writes into data.cache_dir before encoding, where not there yet: the built random tiny model, the
    bundled photos (the trained tiny model is read from the package)."""
    from lora_sweep.data.photos import photos_path
    from lora_sweep.model.loading import tiny_model_path

    cache = cache_root(cfg)
    model = cfg.model.name == "tiny_random" and not cfg.model.path and not tiny_model_path(cache).is_dir()
    photos = cfg.data.name == "photos" and not cfg.data.dir and not photos_path(cache).is_dir()
    return TINY_MODEL_BYTES * model + PHOTOS_BYTES * photos


def cache_bytes(scans, data_cfg, *, text: bool) -> int:
    """Bytes the cache entries of `scans` take at most (none cached yet), for SDXL: a posterior's fp32 mean and std
    of 4 x H/8 x W/8 at the training resolution's area (twice with flip_aug), and with `text` a caption's (77, 2048)
    context and 1280 pooled floats."""
    from lora_sweep.data.buckets import parse_resolution

    width, height = parse_resolution(data_cfg.resolution)  # an int, or kohya's "W,H"
    latent = 2 * 4 * 4 * (width // 8) * (height // 8) * (2 if data_cfg.flip_aug else 1) + 2**12  # + the header
    captions = {item.caption for scan in scans for item in scan.items}
    return latent * sum(len(scan.items) for scan in scans) + (77 * 2048 + 1280) * 4 * len(captions) * text


def expected_bytes(*, lora_numel: int, optimizer: str, keep_states: int, save_every: int, max_steps: int,
                   epoch_checkpoints: int) -> tuple[int, int]:
    """(state folder bytes, output folder bytes) this training writes at most.

    `keep_states` states plus the one being written; every LoRA checkpoint plus the final LoRA in two formats (fp32).
    """
    lora_bytes = lora_numel * 4
    state_bytes = int(lora_bytes * (1 + OPTIMIZER_STATE_SLOTS.get(optimizer, 4.0))) + 2**20
    checkpoints = (max_steps // save_every if save_every else 0) + epoch_checkpoints
    return state_bytes * (keep_states + 1), lora_bytes * (checkpoints + 2)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def out_of_memory_message(cfg, exc: BaseException, last_state: Path | None = None) -> str:
    """What ran out and the knobs that lower memory, with this config's values, most effective first.

    For a `SamplingOutOfMemory`, the prompt and the settings that size it. `last_state`: the state a rerun resumes from.
    """
    if isinstance(exc, SamplingOutOfMemory):
        return _sampling_out_of_memory_message(exc) + _kept(last_state)
    t = cfg.train
    hints = []
    if cfg.precision.name not in ("fp8", "fp8_bf16"):
        hints.append(f"store the base model in fp8 (precision=fp8 or fp8_bf16; now precision={cfg.precision.name})")
    if not t.gradient_checkpointing:
        hints.append("recompute activations in backward (train.gradient_checkpointing=true)")
    if t.batch_size > 1:
        hints.append(f"a smaller batch with more accumulation, the same total batch (train.batch_size="
                     f"{max(1, t.batch_size // 2)} train.grad_accum={t.grad_accum * 2}; now {t.batch_size} x "
                     f"{t.grad_accum})")
    if cfg.network.train_text_encoder:
        hints.append("train the U-Net only, with cached text embeddings (network.train_text_encoder=false)")
    from lora_sweep.data.subsets import per_step_captions

    if not cfg.network.train_text_encoder and (reason := per_step_captions(cfg)):
        hints.append(f"cached text embeddings need captions that do not change per step (now {reason}: the text "
                     "encoders stay on the GPU)")
    hints.append(f"a smaller LoRA (network.rank, now {cfg.network.rank}) or resolution (data.resolution, now "
                 f"{cfg.data.resolution})")
    return ("out of memory during training (" + _first_line(exc) + "). To lower memory: "
            + "; ".join(f"({i}) {h}" for i, h in enumerate(hints, 1)) + "." + _kept(last_state))


def _sampling_out_of_memory_message(exc: SamplingOutOfMemory) -> str:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return (f"{exc} ({_first_line(cause)}). Training did not run out: this sample did, and its memory grows with its "
            f"size. Lower that prompt's --w/--h in {exc.where} (sampling.width/sampling.height for prompts without "
            "them; --s and sampling.steps set the time, not the memory).")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)[:300]


def _kept(last_state: Path | None) -> str:
    if last_state is None:
        return " No state had been saved yet: the next run of this config starts from step 0."
    return (f" The last saved state is kept ({last_state}): the next run of this config resumes from it "
            "(train.resume=auto).")


def describe_os_error(exc: OSError) -> str:
    """Disk full / read-only / permission errors met mid-run, naming the file."""
    where = f" '{exc.filename}'" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return (f"disk full while writing{where}. Free space (old states: train.state_dir; checkpoints: the output "
                "folder) and rerun: it resumes from the last saved state.")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where} ({exc.strerror}). Make it writable and rerun: it resumes from the last state."
    return f"{type(exc).__name__}: {exc}"


def disk_full_message(cfg, full: OSError, last_state: Path | None, output_dir: Path | None) -> str:
    """A full disk (ENOSPC, EDQUOT) met mid-run: the file, the disk's folders and free space, what was saved."""
    folders = _run_folders(cfg, output_dir)
    if full.filename:
        target = Path(full.filename)
        setting = next((s for s, f in folders if target.is_relative_to(f)), None)
        where = f"while writing '{target}'" + (f" ({setting})" if setting else "")
        fix = f"free space on that disk or point {setting or 'it'} at another disk"
    else:
        where = "while writing a file the library did not name"
        fix = "free space on the disk of a folder above (or point its setting at another disk)"
    free = "; ".join(f"{s} '{f}' {_mib(_free(f))} free" for s, f in folders)
    kinds = {errno.EDQUOT: "disk quota exceeded"}
    return (f"disk full ({kinds.get(full.errno, 'no space left on device')}) {where}. Now: {free}. "
            f"Saved: {_saved_files(output_dir)}.{_kept(last_state)} To go on, {fix} and rerun.")


def _run_folders(cfg, output_dir: Path | None) -> list[tuple[str, Path]]:
    """(setting, folder) of the folders a run writes besides its store: states before the cache (they live in it by
    default)."""
    folders = [("train.output_dir", Path(output_dir))] if output_dir else []
    return folders + [("train.state_dir", state_root(cfg)), ("data.cache_dir", cache_root(cfg).resolve())]


def _free(folder: Path) -> int:
    return shutil.disk_usage(_existing(folder)).free


def _saved_files(output_dir: Path | None) -> str:
    files = sorted(Path(output_dir).rglob("*.safetensors")) if output_dir and Path(output_dir).is_dir() else []
    return ", ".join(f"'{f}'" for f in files) if files else "no LoRA file yet"


def failure_reason(cfg, exc: BaseException, last_state: Path | None = None, output_dir: Path | None = None) -> str:
    """One readable line first (the status file and the queue show it), details after. Out of memory and a full
    disk are one paragraph without a traceback (`output_dir`: where the run's LoRA files are, for the latter)."""
    full = disk_full_error(exc)
    if full is not None:
        return "OSError: " + disk_full_message(cfg, full, last_state, output_dir)
    if is_out_of_memory(exc):
        _free_gpu_memory()
        return "OutOfMemoryError: " + out_of_memory_message(cfg, exc, last_state)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {describe_os_error(exc)}\n{traceback.format_exc()[-2000:]}"
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"


def _free_gpu_memory() -> None:
    """Free this job's GPU memory for the next job of a basic-launcher sweep (same process)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
