"""v0.8.7's batch order (docs/kohya-exact.md#data-order): `order.kohya_epoch_batches` against the lists v0.8.7's
dataset code gives, run through torch's own DataLoader (its workers, its index dispatch) with accelerate 0.25.0's
sampler, for 0 and 2 workers across an epoch boundary."""

from __future__ import annotations

import math
import random
from multiprocessing import Value

import pytest
import torch

from lora_sweep.data.order import dataset_seed, kohya_epoch_batches, kohya_epoch_random_state


class _KohyaBuckets(torch.utils.data.Dataset):
    """v0.8.7's BaseDataset, the order parts only (library/train_util.py at v0.8.7): BucketManager.add_image / sort /
    shuffle (l. 188-212), make_buckets' buckets_indices and first shuffle (l. 848-941), shuffle_buckets
    (l. 943-948), set_current_epoch (l. 650-653), __getitem__'s bucket slice (l. 1156-1159); config_util
    generate_dataset_group_by_blueprint draws S and calls set_seed after make_buckets (l. 566-573)."""

    def __init__(self, entries: list[int], buckets: list[tuple[int, int]], batch_size: int):
        self.seed, self.current_epoch, self.batch_size = 0, 0, batch_size
        resos = sorted({buckets[i] for i in entries})  # sort() after every image took its bucket
        self.buckets = [[i for i in entries if buckets[i] == reso] for reso in resos]
        self.buckets_indices = [(g, i) for g, bucket in enumerate(self.buckets)
                                for i in range(math.ceil(len(bucket) / batch_size))]
        self.shuffle_buckets()

    def shuffle_buckets(self):
        random.seed(self.seed + self.current_epoch)
        random.shuffle(self.buckets_indices)
        for bucket in self.buckets:
            random.shuffle(bucket)

    def set_current_epoch(self, epoch):
        if not self.current_epoch == epoch:
            self.shuffle_buckets()
        self.current_epoch = epoch

    def __len__(self):
        return len(self.buckets_indices)

    def __getitem__(self, index):
        g, i = self.buckets_indices[index]
        return self.buckets[g][i * self.batch_size : (i + 1) * self.batch_size]


class _KohyaGroup(torch.utils.data.ConcatDataset):
    """train_util.DatasetGroup (l. 2047-2106): a ConcatDataset whose epoch reaches every dataset."""

    def set_current_epoch(self, epoch):
        for dataset in self.datasets:
            dataset.set_current_epoch(epoch)


class _Collator:
    """train_util.collator_class (l. 5364-5381): the batch's dataset learns the loop's epoch after building it."""

    def __init__(self, epoch, dataset):
        self.current_epoch, self.dataset = epoch, dataset

    def __call__(self, examples):
        info = torch.utils.data.get_worker_info()
        (info.dataset if info is not None else self.dataset).set_current_epoch(self.current_epoch.value)
        return examples[0]


class _SeedableRandomSampler(torch.utils.data.RandomSampler):
    """accelerate 0.25.0's data_loader.SeedableRandomSampler (l. 67-96), which prepare() puts in place of the
    DataLoader's RandomSampler; DataLoaderShard.__iter__ sets its epoch to the iteration (l. 444)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch, self.seed = 0, torch.random.initial_seed()

    def __iter__(self):
        self.generator = torch.Generator()
        self.generator.manual_seed(self.epoch + self.seed)
        yield from super().__iter__()


def _v087_loader(buckets: list[tuple[int, int]], datasets: list[int], batch_sizes: list[int], seed: int,
                 workers: int) -> tuple:
    """v0.8.7's dataset group, epoch counter, sampler and DataLoader after set_seed(seed), as train_network.py
    makes them (the dataset seed S is the first draw of Python's `random`)."""
    torch.manual_seed(seed)  # set_seed(seed): the sampler's initial_seed
    random.seed(seed)
    s = random.randint(0, 2**31)
    members = [_KohyaBuckets([i for i, d in enumerate(datasets) if d == k], buckets, batch_sizes[k])
               for k in sorted(set(datasets))]
    for member in members:
        member.seed = s
    dataset = _KohyaGroup(members)
    current_epoch = Value("i", 0)
    sampler = _SeedableRandomSampler(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers,
                                         collate_fn=_Collator(current_epoch, dataset if workers == 0 else None))
    return dataset, current_epoch, sampler, loader


def v087_order(buckets: list[tuple[int, int]], datasets: list[int], batch_sizes: list[int], seed: int, steps: int,
               workers: int) -> list:
    """The batches v0.8.7's train_network.py (l. 151, 203-206, 352-361, 796-803) serves for `steps` steps."""
    dataset, current_epoch, sampler, loader = _v087_loader(buckets, datasets, batch_sizes, seed, workers)
    served = []
    for epoch in range(math.ceil(steps / len(dataset))):
        current_epoch.value = epoch + 1
        sampler.epoch = epoch
        served += list(loader)
    return served[:steps]


# 8 images x 5 repeats: images 0-4 in one bucket, 5-7 in another (entries 5i..5i+4 are image i's repeats)
BUCKETS = [(64, 64)] * 25 + [(96, 32)] * 15
IMAGE_ORDER = {  # the images of 42 steps at batch size 1, seed 42, as v0.8.7's own train_util, config_util and
    # DataLoader served them (sd-scripts v0.8.7 and accelerate 0.25.0 run unmodified on 8 PNGs of these sizes)
    0: [1, 0, 0, 0, 2, 6, 1, 5, 6, 0, 1, 2, 3, 0, 1, 7, 5, 3, 3, 5, 7, 5, 7, 6, 6, 6, 4, 7, 2, 1, 4, 5, 2, 4, 7, 3,
        3, 2, 4, 1, 2, 5],
    # each worker's first batch comes in make_buckets' order: steps 2 and 41-42 differ
    2: [1, 3, 0, 0, 2, 6, 1, 5, 6, 0, 1, 2, 3, 0, 1, 7, 5, 3, 3, 5, 7, 5, 7, 6, 6, 6, 4, 7, 2, 1, 4, 5, 2, 4, 7, 3,
        3, 2, 4, 1, 7, 6],
}


def _images(batches: list[list[int]]) -> list[int]:
    return [entry // 5 for batch in batches for entry in batch]


@pytest.mark.parametrize("workers", [0, 2])
def test_42_steps_of_8_images_x_5_repeats_follow_v087_across_the_epoch_boundary(workers):
    ours = kohya_epoch_batches(BUCKETS, [0] * 40, [1], 42, 0, workers) + \
        kohya_epoch_batches(BUCKETS, [0] * 40, [1], 42, 1, workers)[:2]
    assert _images(ours) == IMAGE_ORDER[workers]
    assert ours == v087_order(BUCKETS, [0] * 40, [1], 42, 42, workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_datasets_batches_of_two_and_three_and_a_third_epoch_follow_v087(workers):
    datasets = [0] * 10 + [1] * 20 + [0] * 10  # image 0-1 and 6-7 in dataset 0, 2-5 in dataset 1
    ours = [b for epoch in range(3) for b in kohya_epoch_batches(BUCKETS, datasets, [2, 3], 7, epoch, workers)]
    assert ours == v087_order(BUCKETS, datasets, [2, 3], 7, len(ours), workers)


def v087_python_states(buckets: list[tuple[int, int]], datasets: list[int], batch_sizes: list[int], seed: int,
                       epochs: int) -> list[tuple]:
    """Python's global `random` state right after each epoch's first batch, 0 workers, as `v087_order` serves them:
    the state multires noise (custom_train_functions.pyramid_noise_like, `random.random()`) draws from at step 1."""
    _, current_epoch, sampler, loader = _v087_loader(buckets, datasets, batch_sizes, seed, 0)
    states = []
    for epoch in range(epochs):
        current_epoch.value = epoch + 1
        sampler.epoch = epoch
        batches = iter(loader)
        next(batches)
        states.append(random.getstate())
        list(batches)
    return states


@pytest.mark.parametrize("datasets, batch_sizes", [([0] * 40, [1]), ([0] * 10 + [1] * 20 + [0] * 10, [2, 3])])
def test_pythons_stream_after_an_epochs_first_batch_is_v087s(datasets, batch_sizes):
    """v0.8.7 reseeds Python's global `random` in the collate of each epoch's first batch (set_current_epoch ->
    shuffle_buckets, 0 workers), before the batch's noise: multires noise's level ratios come from there."""
    want = v087_python_states(BUCKETS, datasets, batch_sizes, 42, 3)
    ours = [kohya_epoch_random_state(BUCKETS, datasets, batch_sizes, 42, epoch, 0) for epoch in range(3)]
    assert ours == want
    assert kohya_epoch_random_state(BUCKETS, datasets, batch_sizes, 42, 0, 2) is None  # a worker reshuffles


def test_the_dataset_seed_is_the_first_draw_after_set_seed():
    assert dataset_seed(42) == 478163327


def test_an_epoch_depends_on_seed_epoch_and_workers_only():
    """What a resume needs: epoch e's batches are the same whenever they are asked for."""
    first = kohya_epoch_batches(BUCKETS, [0] * 40, [1], 42, 3, 2)
    kohya_epoch_batches(BUCKETS, [0] * 40, [1], 42, 0, 2)
    assert kohya_epoch_batches(BUCKETS, [0] * 40, [1], 42, 3, 2) == first
    assert kohya_epoch_batches(BUCKETS, [0] * 40, [1], 42, 3, 0) != first
