"""Which images a batch holds, in which order, and each image's random stream: shared by both augment backends.

Every sample's augmentation is a function of (seed, epoch, index) only. The sampler runs in the main process and
yields `(index, epoch)` keys; the dataset of either backend draws the epoch's augmentation from
`stream(seed, epoch, AUGMENT_STREAM)`. So the batches do not depend on the number of workers or on which worker
handles a sample, and both backends see the same images in the same batches.

The training loop calls `set_epoch(loader, epoch)` before iterating the loader each epoch: it picks that epoch's
shuffle order and augmentations. Without it every epoch repeats epoch 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import BatchSampler, Sampler

# Spawn-key tag of an epoch's augmentation stream, (epoch, AUGMENT_STREAM): the shuffle order is (epoch,), and no
# other key has this length. Each backend draws its epoch's augmentation from it (one backend runs at a time).
AUGMENT_STREAM = 2**32


def stream(seed: int, *key: int) -> np.random.Generator:
    """The random stream named by `key`: (epoch,) for the shuffle order, (epoch, AUGMENT_STREAM) for augmentation.

    A spawn key, not an entropy tuple: SeedSequence ignores trailing zeros in its entropy, so (42, 0, 0) would be
    the same stream as (42, 0) and as plain 42. Spawn keys of different lengths never coincide.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


class EpochSampler(Sampler):
    """Yields `(index, epoch)` keys: shuffled from (seed, epoch) when `shuffle`, in order otherwise."""

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = stream(self.seed, self.epoch).permutation(self.size)
        else:
            order = np.arange(self.size)
        epoch = self.epoch
        return ((int(i), epoch) for i in order)


def share(batch_size: int, rank: int, world_size: int) -> slice:
    """The contiguous part of a global batch of `batch_size` images that process `rank` of `world_size` trains on
    (the first `batch_size % world_size` processes take one image more; one may get none of a short last batch)."""
    size, extra = divmod(batch_size, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


class ShardedBatchSampler(BatchSampler):
    """A BatchSampler whose batches are this process's share (`share`) of each global batch: the whole batch when
    there is one process. `len` and `global_sizes` are the global batches'."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool, rank: int = 0, world_size: int = 1):
        super().__init__(sampler, batch_size, drop_last)
        self.rank = rank
        self.world_size = world_size

    def take_share(self, batch):
        """This process's part of a global `batch` (a list of keys, or a tensor of indices)."""
        return batch if self.world_size == 1 else batch[share(len(batch), self.rank, self.world_size)]

    def __iter__(self) -> Iterator[list]:
        return (self.take_share(batch) for batch in super().__iter__())

    def global_sizes(self) -> list[int]:
        """The number of images in each global batch of an epoch, in order."""
        full, rest = divmod(len(self.sampler), self.batch_size)
        return [self.batch_size] * full + ([rest] if rest and not self.drop_last else [])


def batch_sampler(
    size: int, seed: int, batch_size: int, train: bool, full_batches: bool = False, rank: int = 0, world_size: int = 1
) -> ShardedBatchSampler:
    """Batches of `(index, epoch)` keys: shuffled for training, in order otherwise; on several processes, this
    process's share of each (`rank` of `world_size`).

    Every image is used, except that a lone last training sample is dropped: batch norm statistics from a single
    image are noise (the shuffle drops a different one each epoch). `full_batches` drops any short last batch, so
    that every batch has one shape (torch.compile builds one graph, CUDA graphs record once).
    """
    drop_last = full_batches or (train and size % batch_size == 1 and size > 1)
    return ShardedBatchSampler(EpochSampler(size, seed, shuffle=train), batch_size, drop_last, rank, world_size)


def set_epoch(loader, epoch: int) -> None:
    """Select the shuffle order and augmentations of `epoch` for the next pass over `loader`."""
    loader.batch_sampler.sampler.set_epoch(epoch)
