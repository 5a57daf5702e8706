"""Datasets and loaders over in-memory CIFAR arrays, with augmentation that is reproducible per sample.

Every sample's augmentation is a function of (seed, epoch, index) only. The loader's sampler runs in the main
process and yields `(index, epoch)` keys; the dataset seeds the Albumentations pipeline from those before it
transforms the image. So the result does not depend on the number of workers or on which worker handles a sample,
no two samples share a random stream (the classic PyTorch + NumPy worker pitfall), and it works with persistent
workers, whose dataset copies never see attributes set in the main process.

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


def _rng(seed: int, *key: int) -> np.random.Generator:
    """The random stream named by `key`: (epoch,) for the shuffle order, (epoch, index) for one sample.

    A spawn key, not an entropy tuple: SeedSequence ignores trailing zeros in its entropy, so (42, 0, 0) would be
    the same stream as (42, 0) and as plain 42. Spawn keys of different lengths never coincide.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


class CifarDataset(Dataset):
    """uint8 (N, 32, 32, 3) images and int64 (N,) labels; items are (float32 CHW tensor, int64 label).

    A key is an index (epoch 0) or an `(index, epoch)` pair, as EpochSampler yields them.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[..., dict], seed: int) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise PipelineError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise PipelineError(f"labels must have shape ({len(images)},), got {labels.shape}")
        self.images = images
        self.labels = labels
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        # One generator for the whole pipeline. Compose.set_random_seed would instead give every transform its own
        # generator with the same seed, so flip, affine and dropout would all draw the same first number and
        # fire together. Seeding costs ~35 us an image, against ~230 us for the transforms themselves.
        rng = _rng(self.seed, epoch, index)
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        image = self.transform(image=self.images[index])["image"]
        return image, torch.tensor(self.labels[index], dtype=torch.int64)


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
    """Shuffled, seeded batches for training; ordered ones otherwise. Call `set_epoch` before each epoch."""
    # Every image is used, except that a lone last training sample is dropped: batch norm statistics
    # from a single image are noise. The shuffle drops a different one each epoch.
    drop_last = drop_last or (train and len(dataset) % batch_size == 1 and len(dataset) > 1)
    sampler = EpochSampler(len(dataset), seed, shuffle=train)
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last),
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
