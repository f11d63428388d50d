"""How long a training runs: `train.max_train_epochs` converted to optimizer steps as kohya sd-scripts v0.8.7 does.

`train.max_steps` counts optimizer updates. With `train.max_train_epochs` set, v0.8.7 replaces it by
max_train_epochs x ceil(len(dataloader) / grad_accum), len(dataloader) being one epoch's micro-batches
(`session.batches_per_epoch`: every bucket of every dataset in batches, reg entries after balancing). The job calls
`resolve_max_steps` once, from its scans, before its run logs params, and writes the result into its config copy:
the loop, the LR schedule, sampling and validation, caption token warm-up, the progress bar, the disk-space check,
`ss_max_train_steps` and the MLflow param `train.max_steps` all read that one number (`train.train` repeats the
call for callers without a job; it finds the value in place). The config hash leaves
train.max_steps out when train.max_train_epochs is set (`config.hashed_settings`), so resolving changes no hash.
docs/kohya-reference.md §6 and docs/sweeps.md#length-and-saving.
"""

from __future__ import annotations

import logging
import math

from lora_sweep.data.buckets import assign_with_settings, bucket_settings
from lora_sweep.data.dataset import FolderScan
from lora_sweep.data.subsets import DatasetSpec
from lora_sweep.training.evaluate import split_training
from lora_sweep.training.session import batches_per_epoch, is_reg

log = logging.getLogger(__name__)


def steps_for_epochs(epochs: int, batches: int, grad_accum: int) -> int:
    """v0.8.7's max_train_steps for `epochs`: epochs x ceil(batches / grad_accum) (one process)."""
    return epochs * math.ceil(batches / grad_accum)


def scanned_batches_per_epoch(cfg, specs: list[DatasetSpec], scans: list[FolderScan]) -> int:
    """One epoch's micro-batches as the session will cut them, from the scans alone (image headers, no pixels): the
    entries that train (held-out images left out, repeats expanded) in their datasets' buckets and batch sizes.
    UserError for an image no bucket fits (the pre-flight names it first)."""
    items = [item for scan in scans for item in scan.items if item.repeats > 0]
    trained, _, _ = split_training([is_reg(item.subset) for item in items], cfg.data.validation_split,
                                   cfg.validation.seed)
    settings = [bucket_settings(spec) for spec in specs]
    bucket = {i: assign_with_settings(items[i].size, settings[items[i].dataset])[0] for i in trained}
    entries = [i for i in trained for _ in range(items[i].repeats)]
    sizes = [spec.batch_size for spec in specs] or [cfg.train.batch_size]
    return batches_per_epoch([bucket[i] for i in entries], sizes, [items[i].dataset for i in entries])


def max_train_steps(cfg, specs: list[DatasetSpec], scans: list[FolderScan]) -> int:
    """The optimizer steps this training runs: train.max_steps, or v0.8.7's conversion of train.max_train_epochs."""
    epochs = cfg.train.max_train_epochs
    if epochs is None:
        return int(cfg.train.max_steps)
    return steps_for_epochs(epochs, scanned_batches_per_epoch(cfg, specs, scans), cfg.train.grad_accum)


def resolve_max_steps(cfg, specs: list[DatasetSpec], scans: list[FolderScan]) -> None:
    """Write `max_train_steps` into cfg.train.max_steps when train.max_train_epochs is set, logging the conversion
    (once: a second call finds the value in place). Nothing to do without train.max_train_epochs."""
    t = cfg.train
    if t.max_train_epochs is None:
        return
    batches = scanned_batches_per_epoch(cfg, specs, scans)
    steps = steps_for_epochs(t.max_train_epochs, batches, t.grad_accum)
    if t.max_steps != steps:
        epochs = "1 epoch" if t.max_train_epochs == 1 else f"{t.max_train_epochs} epochs"
        log.info("train.max_train_epochs=%d: %d optimizer steps (%s x ceil(%d batches / grad_accum %d), as "
                 "v0.8.7) replace train.max_steps=%d", t.max_train_epochs, steps, epochs, batches, t.grad_accum,
                 t.max_steps)
        t.max_steps = steps
