"""Datasets and loaders over in-memory CIFAR arrays, with augmentation that is reproducible per sample.

Every sample's augmentation is a function of (seed, epoch, index) only. The loader's sampler runs in the main
process and yields `(index, epoch)` keys; the dataset builds a whole batch from them, seeding the Albumentations
pipeline for each image from that image's entry in the epoch's table of seeds. So the result does not depend on the
number of workers or on which worker handles a sample, no two samples share a random stream (the classic PyTorch +
NumPy worker pitfall), and it works with persistent workers, whose dataset copies never see attributes set in the
main process.

Batches are uint8 (n, 3, H, W) pixels, a quarter of the bytes of float32: they are normalised on the training
device (loaders.py, normalization.py).

The training loop calls `set_epoch(loader, epoch)` before iterating the loader each epoch: it picks that epoch's
shuffle order and augmentations. Without it every epoch repeats epoch 0.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from cifar_pipeline.errors import PipelineError

PREFETCH_FACTOR = 4  # batches each worker keeps ready
MAX_AUTO_WORKERS = 8  # beyond this, workers stop paying for their memory and start-up time on 32x32 images
# Spawn-key tag of an epoch's augmentation stream, (epoch, AUGMENT_STREAM): the shuffle order is (epoch,), and no
# other key has this length. Each backend draws its epoch's augmentation from it (one backend runs at a time).
AUGMENT_STREAM = 2**32
# PCG's default stream (its increment): each image's numpy generator runs on it from a state of its own.
PCG_INCREMENT = 0x5851F42D4C957F2D14057B7EF767814F


def _rng(seed: int, *key: int) -> np.random.Generator:
    """The random stream named by `key`: (epoch,) for the shuffle order, (epoch, AUGMENT_STREAM) for augmentation.

    A spawn key, not an entropy tuple: SeedSequence ignores trailing zeros in its entropy, so (42, 0, 0) would be
    the same stream as (42, 0) and as plain 42. Spawn keys of different lengths never coincide.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


class CifarDataset(Dataset):
    """uint8 (N, 32, 32, 3) images and int64 (N,) labels, each image through `transform` (an Albumentations pipeline
    from uint8 HWC to uint8 HWC; None: as it is). Items are (uint8 (3, H, W) tensor, int64 label); a batch of keys
    (`__getitems__`, which DataLoader calls) gives (uint8 (n, 3, H, W), int64 (n,)) at once.

    A key is an index (epoch 0) or an `(index, epoch)` pair, as EpochSampler yields them.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: Callable[..., dict] | None, seed: int
    ) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise PipelineError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise PipelineError(f"labels must have shape ({len(images)},), got {labels.shape}")
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.transform = transform
        self.seed = seed
        # One numpy and one Python generator for the whole pipeline, reseeded in place for every image: building a
        # SeedSequence and two fresh generators per image cost ~28 us, setting their states costs ~8 us. (One pair
        # for all transforms: Compose.set_random_seed would give each transform its own generator with the same
        # seed, so flip, affine and dropout would all draw the same first number and fire together.)
        self._numpy_random = np.random.Generator(np.random.PCG64())
        self._python_random = random.Random()
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(self._numpy_random, self._python_random)
        self._seeds: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def epoch_seeds(self, epoch: int) -> np.ndarray:
        """(N, 2) uint64: the 128-bit seed of every sample's augmentation in `epoch`, drawn at once (the last
        epoch's are kept: one draw per epoch in each worker)."""
        if self._seeds is None or self._seeds[0] != epoch:
            seeds = _rng(self.seed, epoch, AUGMENT_STREAM).integers(0, 2**64, (len(self), 2), dtype=np.uint64)
            self._seeds = epoch, seeds
        return self._seeds[1]

    def _reseed(self, high: int, low: int) -> None:
        seed = high << 64 | low
        self._numpy_random.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": seed, "inc": PCG_INCREMENT},
            "has_uint32": 0,
            "uinteger": 0,
        }
        self._python_random.seed(seed)

    def __getitems__(self, keys: list[int | tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = np.array([key if isinstance(key, tuple) else (key, 0) for key in keys], dtype=np.int64).reshape(-1, 2)
        index, epochs = pairs[:, 0], pairs[:, 1]
        images = self.images[index]  # a copy: the transforms write into it
        if self.transform is not None:
            # The whole batch's seeds at once (EpochSampler's batches hold one epoch; any mix works all the same).
            seeds = np.empty((len(index), 2), dtype=np.uint64)
            for epoch in np.unique(epochs):
                seeds[epochs == epoch] = self.epoch_seeds(int(epoch))[index[epochs == epoch]]
            for k, (high, low) in enumerate(seeds.tolist()):
                self._reseed(high, low)
                images[k] = self.transform(image=images[k])["image"]
        # NHWC memory seen as NCHW: the channels_last layout, which the step uses by default, with no copy.
        return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(self.labels[index])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([key])
        return images[0], labels[0]


def _as_collated(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader's collate_fn for CifarDataset, whose __getitems__ builds the whole batch already."""
    return batch


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
            order = _rng(self.seed, self.epoch).permutation(self.size)
        else:
            order = np.arange(self.size)
        epoch = self.epoch
        return ((int(i), epoch) for i in order)


def resolve_num_workers(setting: int | Literal["auto"]) -> int:
    """`data.num_workers` as a number: `auto` leaves one CPU to the training process, up to MAX_AUTO_WORKERS."""
    if setting == "auto":
        try:
            cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use, not the machine's count
        except AttributeError:  # macOS, Windows
            cpus = os.cpu_count() or 1
        return max(0, min(cpus - 1, MAX_AUTO_WORKERS))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise PipelineError(f"data.num_workers must be 'auto' or an integer >= 0, got {setting!r}")
    return setting


def make_loader(
    dataset: CifarDataset,
    batch_size: int,
    train: bool,
    num_workers: int,
    seed: int,
    pin_memory: bool,
    drop_last: bool = False,
) -> DataLoader:
    """Shuffled, seeded uint8 batches for training; ordered ones otherwise. Call `set_epoch` before each epoch."""
    # Every image is used, except that a lone last training sample is dropped: batch norm statistics
    # from a single image are noise. The shuffle drops a different one each epoch.
    drop_last = drop_last or (train and len(dataset) % batch_size == 1 and len(dataset) > 1)
    sampler = EpochSampler(len(dataset), seed, shuffle=train)
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last),
        collate_fn=_as_collated,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=workers,
        prefetch_factor=PREFETCH_FACTOR if workers else None,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select the shuffle order and augmentations of `epoch` for the next pass over `loader`."""
    loader.batch_sampler.sampler.set_epoch(epoch)


def loader_throughput(loader: DataLoader, max_batches: int | None = None) -> dict[str, Any]:
    """Images per second of one pass over `loader` (or its first `max_batches` batches).

    The clock starts when the first batch has arrived, so worker start-up is left out: what remains is the
    steady rate a training loop can be fed at.
    """
    images, start, batches = 0, None, 0
    for batch, _ in loader:
        batches += 1
        if start is None:
            start = time.perf_counter()
        else:
            images += len(batch)
        if max_batches is not None and batches >= max_batches:
            break
    seconds = time.perf_counter() - start if start is not None else 0.0
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0}
