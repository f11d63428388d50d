"""Failing early and clearly: free space before training, and messages a user can act on.

Why: a sweep of hours-long runs must not find its disk full at step 4000. Free space is checked once the LoRA
exists (its real size); writable folders before the model loads (checks/folders.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import traceback
from collections.abc import Mapping
from pathlib import Path

from lora_sweep.errors import SamplingOutOfMemory, UserError, is_out_of_memory

# Optimizer state tensors per LoRA parameter, roughly (8-bit states are a quarter of fp32 ones).
OPTIMIZER_STATE_SLOTS = {"adamw": 2.0, "adamw8bit": 0.5, "lion8bit": 0.25, "prodigy": 4.0,
                         "dadapt_adam": 3.0, "dadapt_adam_preprint": 3.0}
HEADROOM_BYTES = 16 * 2**20


def check_free_space(needs: Mapping[Path, tuple[str, int]]) -> None:
    """`needs`: folder -> (config field, bytes it will receive). Folders on one filesystem share its free space."""
    by_device: dict[int, list[tuple[Path, str, int]]] = {}
    for folder, (what, size) in needs.items():
        by_device.setdefault(os.stat(folder).st_dev, []).append((Path(folder), what, size))
    for entries in by_device.values():
        need = sum(size for _, _, size in entries) + HEADROOM_BYTES
        free = shutil.disk_usage(entries[0][0]).free
        if free < need:
            listing = ", ".join(f"{what} '{folder}' ({_mib(size)})" for folder, what, size in entries)
            raise UserError(
                f"not enough free disk space: {_mib(free)} free where this training will write about {_mib(need)}: "
                f"{listing}. Free some space, lower train.keep_states or raise train.save_every, or point those "
                "folders at another disk (nothing was trained)."
            )


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
    if cfg.data.shuffle_caption:
        hints.append("cached text embeddings need data.shuffle_caption=false (now the text encoders stay on the GPU)")
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


def failure_reason(cfg, exc: BaseException, last_state: Path | None = None) -> str:
    """One readable line first (the status file and the queue show it), details after."""
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
