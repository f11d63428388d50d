"""What a training saves to go on later: kohya's LoRA checkpoints and training states, and resuming from one.

`Checkpoints` (docs/kohya-reference.md §6, docs/sweeps.md#length-and-saving): every `train.save_every` steps a LoRA
`-step00000500` and a state; at the end of epoch e when e % save_every_epochs == 0 and e is not the last, a LoRA
`-00000e` and a state; a state at the end and on a stop; the newest `train.keep_states` kept. After each LoRA file,
v0.8.7's windows (`train.save_last_n_steps`, `train.save_last_n_epochs`) delete the file that falls out: computed
from the step or epoch alone, so a resumed run goes on deleting where the first left off. The files are in
`train.save_precision` (`SAVE_DTYPES`). Resuming reproduces a run that never stopped.

A state, `state-step00000500.pt` (written atomically), holds the LoRA tensors, optimizer / LR-scheduler / scaler
state_dicts, the loop's `Position`, every RNG the loop draws from, and its config hash, run id and the config's
hashed settings (`config.hashed_settings`). Restored, the optimizer's hyperparameters and the LR schedule follow the
config being trained (`resume.RULES` says which changes a state can follow). It lives in
`<train.state_dir>/<config_hash>/<run_id>/` (independent of Hydra's job folder, so a rerun finds it; one folder
per run, so a fresh start never mixes with an old run), read with `weights_only=True`. `ConfigLock` keeps a second
process off a config being trained.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_sweep.atomic import write_with
from lora_sweep.config import hashed_settings
from lora_sweep.errors import UserError

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
# train.save_precision -> the dtype of every tensor of the LoRA files (v0.8.7's prepare_dtype); null: fp32, the
# LoRA's training dtype
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STATE_NAME = re.compile(r"^state-step(\d{8,})\.pt$")


@dataclass
class Position:
    """Where the loop stands right after an optimizer step (an accumulation is never half done there)."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # epoch the next batch belongs to (0-based)
    batch_index: int = 0  # index of the next batch in `Session.epoch_batches(epoch)`
    images_seen: int = 0
    skipped_steps: int = 0
    last_loss: float = float("nan")


class ConfigLock:
    """An exclusive flock on `<state root>/<config_hash>/.lock`, held while one process trains that config.

    The kernel drops it when the process dies (never stale). The file names the holder for the waiter's message.
    Where flock is unavailable it warns once and locks nothing.
    """

    def __init__(self, hash_folder: Path):
        self.path = Path(hash_folder) / ".lock"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True if held now (or if locking is unavailable here)."""
        try:
            import fcntl
        except ImportError:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:  # ENOLCK: no locks on this filesystem
            os.close(fd)
            log.warning("no file locking at %s (%s): two processes on this config would not exclude each other",
                        self.path, exc)
            return True
        self.fd = fd
        self.note()
        return True

    def note(self, **info: Any) -> None:
        """Rewrite the holder's description (pid, host, since, and e.g. run_id)."""
        if self.fd is None:
            return
        data = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(data).encode(), 0)

    def holder(self) -> dict[str, Any]:
        """What the current holder wrote ({} if unreadable)."""
        try:
            return dict(json.loads(self.path.read_text() or "{}"))
        except (OSError, ValueError, TypeError):
            return {}

    def describe_holder(self) -> str:
        info = self.holder()
        who = f"process {info.get('pid', '?')} on {info.get('host', '?')}"
        run = f", MLflow run {info['run_id']}" if info.get("run_id") else ""
        return f"{who} (since {info.get('since', '?')}{run}; lock file {self.path})"

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Checkpoints:
    """The LoRA files and training states of one training.

    `target`: a train.StateTarget, or None to write no states; `flip_rng` is saved with the other RNGs.
    `last_state`: the newest state written or resumed (None: none yet).
    """

    def __init__(self, s: Any, target: Any | None, flip_rng: random.Random):
        self.s, self.target, self.flip_rng = s, target, flip_rng
        self.last_state: Path | None = None

    def resume(self) -> Position:
        """A fresh Position, or the one `target.resume_from` restores into the freshly built session.

        Call it after every set-up draw from the RNGs. UserError if the state is beyond train.max_steps.
        """
        if self.target is None or self.target.resume_from is None:
            return Position()
        s, path = self.s, self.target.resume_from
        pos = restore(load_state(path), lora=s.lora, optimizer=s.optimizer, lr_scheduler=s.lr_scheduler,
                      scaler=s.scaler, flip_rng=self.flip_rng)
        if pos.step > s.cfg.train.max_steps:
            raise UserError(f"train.resume: the state '{path}' is at step {pos.step}, beyond train.max_steps="
                            f"{s.cfg.train.max_steps}.")
        log.info("resumed from %s: step %d, epoch %d, batch %d", path, pos.step, pos.epoch + 1, pos.batch_index)
        self.last_state = path
        return pos

    def after_step(self, pos: Position, epoch: int, last_of_epoch: bool, final: bool) -> None:
        """After optimizer step `pos.step` of `epoch` (0-based): the LoRA files due with a state, or a state if `final`.
        """
        if (self._lora_files(pos.step, epoch, last_of_epoch) or final) and self.target is not None:
            self.last_state = self._state(pos)

    def _lora_files(self, step: int, epoch: int, last_of_epoch: bool) -> bool:
        """kohya's `-step00000500` and `-000005` files when due, each followed by its window's deletion; True if any.

        `epoch` is 0-based; ss_epoch is that loop epoch in a step file and the 1-based epoch in an epoch file, as
        v0.8.7 writes them.
        """
        s, t = self.s, self.s.cfg.train
        done = epoch + 1
        by_step = bool(t.save_every) and step % t.save_every == 0
        by_epoch = last_of_epoch and bool(t.save_every_epochs) and done % t.save_every_epochs == 0 and done < s.epochs
        if by_step:
            s.save_checkpoint(step_file(t.output_name, step), steps=step, epoch=epoch)
            self._remove(step_file_to_remove(step, t.save_every, t.save_last_n_steps), step_file)
        if by_epoch:
            s.save_checkpoint(epoch_file(t.output_name, done), steps=step, epoch=done)
            self._remove(epoch_file_to_remove(done, t.save_every_epochs, t.save_last_n_epochs), epoch_file)
        return by_step or by_epoch

    def _remove(self, number: int | None, name: Callable[[str, int], str]) -> None:
        """Delete the LoRA file `name(output_name, number)` from the output folder if it is there (MLflow keeps the
        copy the run logged: artifacts cannot be deleted)."""
        if number is None:
            return
        path = self.s.output_dir / name(self.s.cfg.train.output_name, number)
        if path.exists():
            log.info("removing old checkpoint %s (outside the train.save_last_n_* window)", path)
            path.unlink()

    def _state(self, pos: Position) -> Path:
        """Write a state after a short flush of the metrics (a store that lags is not waited for: a resume names
        any steps whose metrics never arrived)."""
        s, target = self.s, self.target
        s.sink.flush()
        return save_state(
            target.folder, lora=s.lora, optimizer=s.optimizer, lr_scheduler=s.lr_scheduler, scaler=s.scaler,
            position=pos, rng=capture_rng(self.flip_rng), config_hash=target.config_hash, run_id=target.run_id,
            keep=s.cfg.train.keep_states, params=hashed_settings(s.cfg), dataset=getattr(target, "dataset", None))


def step_file(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}.safetensors"


def epoch_file(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}.safetensors"


def step_file_to_remove(step: int, every: int, last_n: int | None) -> int | None:
    """The step file v0.8.7 deletes after saving step `step` (every `every` steps) with --save_last_n_steps `last_n`:
    step - last_n - 1 rounded down to a multiple of `every`, if >= 0. A window of `last_n` steps, not `last_n` files:
    every=10, last_n=30 deletes step 10 at step 50 and keeps 20-50."""
    if last_n is None:
        return None
    number = step - last_n - 1
    number -= number % every
    return number if number >= 0 else None


def epoch_file_to_remove(epoch: int, every: int, last_n: int | None) -> int | None:
    """The epoch file v0.8.7 deletes after saving epoch `epoch` (1-based, every `every` epochs) with
    --save_last_n_epochs `last_n`: epoch - every x last_n, if >= 0 (0 names no file): the last `last_n` files stay."""
    if last_n is None:
        return None
    number = epoch - every * last_n
    return number if number >= 0 else None


def state_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"state-step{step:08d}.pt"


def run_folder(root: Path, config_hash: str, run_id: str) -> Path:
    return Path(root) / config_hash / run_id


# --- RNG ------------------------------------------------------------------------------------------------------


def capture_rng(flip_rng: random.Random) -> dict[str, Any]:
    """Every random stream the loop draws from, as tensors and plain tuples (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "flip": flip_rng.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any], flip_rng: random.Random) -> None:
    random.setstate(_tuples(rng["python"]))
    flip_rng.setstate(_tuples(rng["flip"]))
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _tuples(value):
    """random.setstate wants tuples all the way down; a loaded state may hold lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- save / load ----------------------------------------------------------------------------------------------


def save_state(
    folder: Path, *, lora: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler, position: Position,
    rng: dict[str, Any], config_hash: str, run_id: str, keep: int, params: dict[str, Any] | None = None,
    dataset: str | None = None,
) -> Path:
    """Write the state of `position.step` atomically, then drop all but the newest `keep` states. `params` (the
    config's hashed settings) and `dataset` (the files' digest) are for checking a resume (`resume.py`)."""
    meta = {"config_hash": config_hash, "run_id": run_id, "step": position.step}
    meta |= {k: v for k, v in (("params", params), ("dataset", dataset)) if v is not None}
    state = {
        "format": FORMAT_VERSION,
        "meta": meta,
        "position": asdict(position),
        "lora": {k: v.detach().to("cpu", copy=True) for k, v in lora.items()},
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
    }
    target = state_path(folder, position.step)
    write_with(target, lambda tmp: torch.save(state, tmp))
    prune(folder, keep)
    return target


def load_state(path: Path) -> dict[str, Any]:
    """Read a state file; a broken or foreign file is a UserError naming it."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"train.resume: cannot read the training state '{path}' ({type(exc).__name__}: {exc}). "
                        "Point train.resume at a state-step*.pt file or set train.resume=never.") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise UserError(f"train.resume: '{path}' is not a lora-sweep training state (format {FORMAT_VERSION}).")
    return state


def read_meta(path: Path) -> dict[str, Any]:
    """Config hash, run id, step (and the config's `params` and the `dataset` digest where saved) of a state,
    without reading its tensors (memory-mapped load)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
        return dict(state["meta"])
    except Exception as exc:
        raise UserError(f"train.resume: cannot read the training state '{path}' ({exc}).") from exc


def restore(state: dict[str, Any], *, lora: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler,
            flip_rng: random.Random) -> Position:
    """Put a loaded state back into freshly built objects and the RNGs; return the loop's position.

    The LoRA tensors, the optimizer's moments, the schedule's step, the scaler and the RNGs come from the state; the
    optimizer's hyperparameters and the LR schedule stay those the fresh objects were built with (`follow_config`).
    """
    missing = sorted(set(lora) ^ set(state["lora"]))
    if missing:
        raise UserError(f"train.resume: the state's LoRA does not match this network (e.g. {missing[:3]}): it was "
                        "saved with other network or model settings.")
    with torch.no_grad():
        for name, param in lora.items():
            param.copy_(state["lora"][name])
    follow_config(optimizer, lr_scheduler, state["optimizer"], state["lr_scheduler"])
    if state["scaler"]:  # a state saved without fp16's scaler has none: this run's scaler starts afresh
        scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], flip_rng)
    return Position(**state["position"])


def follow_config(optimizer, lr_scheduler, saved_optimizer: dict, saved_scheduler: dict) -> None:
    """Load the saved optimizer and schedule step into `optimizer` / `lr_scheduler` (a LambdaLR), keeping the
    hyperparameters and the schedule they were built with: group lr = base lr x the schedule's factor at the saved
    step. The same config gives back the saved lrs exactly (the same product LambdaLR computes).
    """
    hyper = {*getattr(optimizer, "lora_sweep_kwargs", optimizer.defaults), "initial_lr"}  # not D-Adaptation's d
    built = [{k: v for k, v in group.items() if k in hyper} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved_optimizer)
    for group, values in zip(optimizer.param_groups, built, strict=True):
        group.update(values)
    step = saved_scheduler["last_epoch"]
    lrs = [base * factor(step) for factor, base in zip(lr_scheduler.lr_lambdas, lr_scheduler.base_lrs, strict=True)]
    lr_scheduler.load_state_dict({**saved_scheduler, "base_lrs": list(lr_scheduler.base_lrs), "_last_lr": lrs})
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


# --- listing ----------------------------------------------------------------------------------------------------


def list_states(folder: Path) -> list[Path]:
    """Complete states in `folder`, oldest step first (temporary files of an interrupted write are not states)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := _STATE_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` states; remove older ones and leftovers of interrupted writes."""
    states = list_states(folder)
    for old in states[: max(0, len(states) - keep)]:
        old.unlink(missing_ok=True)
    for leftover in Path(folder).glob(".state-step*.tmp"):
        leftover.unlink(missing_ok=True)


def find_resumable(hash_folder: Path, is_resumable: Callable[[str], bool]) -> Path | None:
    """The newest state (by write time) of any run folder under `hash_folder` whose run `is_resumable(run_id)`."""
    candidates = []
    for run_dir in sorted(p for p in Path(hash_folder).glob("*") if p.is_dir()) if Path(hash_folder).is_dir() else []:
        states = list_states(run_dir)
        if states and is_resumable(run_dir.name):
            candidates.append(states[-1])
        elif states:
            log.info("states in %s belong to run %s, which is finished or not in this MLflow store: not resumed",
                     run_dir, run_dir.name)
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def resolve_state_arg(value: str) -> Path:
    """`train.resume=PATH`: a state file, or a run folder (its newest state)."""
    path = Path(value).expanduser()
    if path.is_dir():
        states = list_states(path)
        if not states:
            raise UserError(f"train.resume: the folder '{path}' holds no state-step*.pt file.")
        return states[-1]
    if not path.is_file():
        raise UserError(f"train.resume: '{value}' is neither 'auto', 'never' nor an existing state file or folder.")
    return path
