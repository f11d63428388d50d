"""The order kohya sd-scripts v0.8.7 serves batches in (with accelerate 0.25.0), as a pure function of the entries'
buckets and datasets, the seed, the epoch and the data-loader workers, so a resumed run sees the same batches.

What v0.8.7 does (docs/kohya-exact.md#data-order):
- a dataset's batches are (bucket, batch) pairs, buckets sorted by resolution, each bucket's entries in image order
  with an image's repeats side by side; `make_buckets` shuffles the pairs, then each bucket, after random.seed(0);
- the dataset seed S = random.randint(0, 2**31), drawn right after set_seed(seed) (`dataset_seed`);
- a dataset learns the loop's epoch k (1-based) in the collate of a batch it has just built; when k differs from
  the epoch it holds, `set_current_epoch` reshuffles pairs and buckets in place after random.seed(S + the epoch it
  held), then holds k (train_util.py l. 650-653, 943-948 at v0.8.7);
- accelerate's SeedableRandomSampler serves the datasets' concatenated batches in randperm(N) seeded seed + epoch;
- with 0 workers the training process's dataset carries its order and epoch across epochs, so an epoch's first batch
  comes in the previous epoch's order; W workers (batch j from worker j % W) copy the training process's dataset,
  which never learns an epoch: each epoch, a worker's first batch comes in make_buckets' order and the rest after
  random.seed(S + 0).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def dataset_seed(seed: int) -> int:
    """v0.8.7's S (config_util.generate_dataset_group_by_blueprint): the first Python draw after set_seed(seed)."""
    return random.Random(seed).randint(0, 2**31)


@dataclass
class _BucketBatches:
    """One dataset's shuffle state: kohya's `buckets_indices` (bucket, batch) and `bucket_manager.buckets`."""

    pairs: list[tuple[int, int]]
    groups: list[list[int]]
    batch_size: int

    def shuffled(self, seed: int) -> _BucketBatches:
        """`shuffle_buckets` after random.seed(seed): the pairs, then each bucket, from one stream."""
        rng = random.Random(seed)
        pairs, groups = list(self.pairs), [list(g) for g in self.groups]
        rng.shuffle(pairs)
        for group in groups:
            rng.shuffle(group)
        return _BucketBatches(pairs, groups, self.batch_size)

    def batch(self, k: int) -> list[int]:
        bucket, i = self.pairs[k]
        return self.groups[bucket][i * self.batch_size : (i + 1) * self.batch_size]


def _made(entries: list[int], buckets: Sequence[tuple[int, int]], batch_size: int) -> _BucketBatches:
    """A dataset as `make_buckets` leaves it (before the shuffle): buckets sorted by (width, height)."""
    members: dict[tuple[int, int], list[int]] = {}
    for index in entries:
        members.setdefault(tuple(buckets[index]), []).append(index)
    groups = [members[b] for b in sorted(members)]
    pairs = [(g, i) for g, items in enumerate(groups) for i in range(math.ceil(len(items) / batch_size))]
    return _BucketBatches(pairs, groups, batch_size)


def kohya_epoch_random_state(buckets: Sequence[tuple[int, int]], datasets: Sequence[int],
                              batch_sizes: Sequence[int], seed: int, epoch: int, workers: int) -> tuple | None:
    """Python's global `random` state as v0.8.7 leaves it when epoch `epoch` (0-based) has served its first batch,
    before that batch's noise (multires noise draws its level ratios from it), or None with `workers` > 0 (the
    reshuffle then runs in a worker process). With 0 workers the first batch's collate makes each dataset, in
    order, call random.seed(S + epoch) and shuffle its pairs and buckets (`set_current_epoch`): the stream goes on
    from the last dataset's shuffles. Arguments as `kohya_epoch_batches`."""
    if workers:
        return None
    S = dataset_seed(seed)  # noqa: N806 (kohya's name in the docs)
    made = [_made([i for i, d in enumerate(datasets) if d == dataset], buckets, batch_sizes[dataset])
            for dataset in sorted(set(datasets))]
    served = [m.shuffled(0) for m in made]
    for k in range(epoch):
        served = [d.shuffled(S + k) for d in served]
    rng = random.Random(S + epoch)  # the last dataset's reseed; its shuffles as `shuffled` makes them
    rng.shuffle(list(served[-1].pairs))
    for group in served[-1].groups:
        rng.shuffle(list(group))
    return rng.getstate()


def kohya_epoch_batches(buckets: Sequence[tuple[int, int]], datasets: Sequence[int], batch_sizes: Sequence[int],
                        seed: int, epoch: int, workers: int) -> list[list[int]]:
    """Epoch `epoch`'s (0-based) micro-batches of entry indices, in v0.8.7's order with `workers` data-loader workers
    (not persistent). `buckets`, `datasets`: each entry's bucket (W, H) and dataset, entries in kohya's image order
    with repeats side by side; `batch_sizes`: each dataset's."""
    S = dataset_seed(seed)  # noqa: N806 (kohya's name in the docs)
    made = [_made([i for i, d in enumerate(datasets) if d == dataset], buckets, batch_sizes[dataset])
            for dataset in sorted(set(datasets))]
    first = [m.shuffled(0) for m in made]  # make_buckets runs before set_seed(S): self.seed is still 0
    served_first = first
    if workers == 0:  # the one dataset object has reshuffled once per epoch before, seeded by the epoch it held
        for k in range(epoch):
            served_first = [d.shuffled(S + k) for d in served_first]
    now = [d.shuffled(S + (epoch if workers == 0 else 0)) for d in served_first]
    owners = [(d, k) for d, dataset in enumerate(made) for k in range(len(dataset.pairs))]  # ConcatDataset
    order = torch.randperm(len(owners), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    batches = []
    for j, index in enumerate(order):
        d, k = owners[index]
        batches.append((served_first if j < max(workers, 1) else now)[d].batch(k))
    return batches
