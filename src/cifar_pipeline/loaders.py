"""The loaders the stages train and evaluate with, for either `augment.backend`: Albumentations image by image in
loader worker processes (here), or whole batches on the training device (batched_augment.py). `auto` picks gpu on
CUDA, where a few CPU workers cannot feed the GPU (benchmarks/RESULTS.md), and albumentations elsewhere, where the
device is the CPU the workers would share anyway.

Both kinds of loader take their batches from sampling.py's sampler and yield float32 batches normalised on the
device (normalization.py); both have what the training loop uses: len, iteration, `.dataset`, and
`.batch_sampler.sampler.set_epoch` for sampling.set_epoch. Batches travel as uint8 pixels, a quarter of the bytes of
float32, until they are on the device.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from cifar_pipeline import paths
from cifar_pipeline.augment import train_transforms
from cifar_pipeline.batched_augment import DeviceDataset, DeviceLoader
from cifar_pipeline.errors import require_inputs
from cifar_pipeline.normalization import normalizer
from cifar_pipeline.params import AugmentParams, Params
from cifar_pipeline.runtime import Runtime, make_runtime, seed_everything
from cifar_pipeline.sampling import AUGMENT_STREAM, batch_sampler, stream
from cifar_pipeline.splits import Splits, check_images, load_splits
from cifar_pipeline.stats import load_stats

PREFETCH_FACTOR = 4  # batches each worker keeps ready
# PCG's default stream (its increment): each image's numpy generator runs on it from a state of its own.
PCG_INCREMENT = 0x5851F42D4C957F2D14057B7EF767814F


class CifarDataset(Dataset):
    """uint8 (N, 32, 32, 3) images and int64 (N,) labels, each image through `transform` (an Albumentations pipeline
    from uint8 HWC to uint8 HWC; None: as it is). Items are (uint8 (3, H, W) tensor, int64 label); a batch of keys
    (`__getitems__`, which DataLoader calls) gives (uint8 (n, 3, H, W), int64 (n,)) at once.

    A key is an index (epoch 0) or an `(index, epoch)` pair, as EpochSampler yields them.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: Callable[..., dict] | None, seed: int
    ) -> None:
        check_images(images, labels)
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
            seeds = stream(self.seed, epoch, AUGMENT_STREAM).integers(0, 2**64, (len(self), 2), dtype=np.uint64)
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


def make_loader(
    dataset: CifarDataset,
    batch_size: int,
    train: bool,
    num_workers: int,
    seed: int,
    pin_memory: bool,
    full_batches: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Shuffled, seeded uint8 batches for training; ordered ones otherwise; on several processes, this process's
    share of each (sampling.py). Call `set_epoch` before each epoch."""
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler(len(dataset), seed, batch_size, train, full_batches, rank, world_size),
        collate_fn=_as_collated,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=workers,
        prefetch_factor=PREFETCH_FACTOR if workers else None,
    )


class DeviceBatches:
    """The uint8 batches of a DataLoader, copied to `device` and normalised there."""

    def __init__(self, loader: DataLoader, normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
        self.loader = loader
        self.normalize = normalize
        self.device = device

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def batch_sampler(self) -> BatchSampler:
        return self.loader.batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Start the DataLoader's iterator now, not at the first batch: engine.loader_batches keeps the seed that
        # this draws from the global RNG away from the dropout masks only around this call.
        return self._on_device(iter(self.loader))

    def _on_device(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.device.type == "cuda"  # the loader pins its batches there: the copy overlaps compute
        for images, labels in batches:
            images = self.normalize(images.to(self.device, non_blocking=non_blocking))
            yield images, labels.to(self.device, non_blocking=non_blocking)


def make_train_loader(
    images: np.ndarray,
    labels: np.ndarray,
    augment: AugmentParams,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    backend: str,
    batch_size: int,
    seed: int,
    num_workers: int,
    device: torch.device,
    full_batches: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DeviceBatches | DeviceLoader:
    """The training loader of `backend` (resolved: runtime.resolve_backend): Albumentations in worker processes, or
    on `device`.
    `full_batches`: every batch holds batch_size images (train.compile wants one shape). `rank` of `world_size`:
    the share of every batch this process trains on."""
    if backend == "gpu":
        dataset = DeviceDataset(images, labels, mean, std, seed, device, augment)
        return DeviceLoader(dataset, batch_size, True, seed, full_batches, rank, world_size)
    dataset = CifarDataset(images, labels, train_transforms(augment, mean), seed)
    pin_memory = device.type == "cuda"
    loader = make_loader(dataset, batch_size, True, num_workers, seed, pin_memory, full_batches, rank, world_size)
    return DeviceBatches(loader, normalizer(mean, std, device), device)


def make_eval_loader(
    images: np.ndarray,
    labels: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    backend: str,
    batch_size: int,
    seed: int,
    num_workers: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> DeviceBatches | DeviceLoader:
    """An ordered, normalised, unaugmented loader (of this process's share of each batch, on several); with the gpu
    backend the split lives on `device` too."""
    if backend == "gpu":
        dataset = DeviceDataset(images, labels, mean, std, seed, device)
        return DeviceLoader(dataset, batch_size, False, seed, rank=rank, world_size=world_size)
    dataset = CifarDataset(images, labels, None, seed)
    pin_memory = device.type == "cuda"
    loader = make_loader(dataset, batch_size, False, num_workers, seed, pin_memory, rank=rank, world_size=world_size)
    return DeviceBatches(loader, normalizer(mean, std, device), device)


class Training(NamedTuple):
    """What lr-find and train start from (prepare_training)."""

    runtime: Runtime
    splits: Splits
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loader: DeviceBatches | DeviceLoader  # the training batches


def prepare_training(params: Params, full_batches: bool = False, runtime: Runtime | None = None) -> Training:
    """What lr-find and train both start from: every RNG seeded, the runtime, the splits, the dataset's mean and
    std, and the training loader over them (the same batches for the range test as for training). `runtime`: the
    train stage's on several processes (distributed.py): the loader gives this process its share of each batch."""
    require_inputs({str(paths.DATA_DIR): "download", str(paths.STATS): "compute-mean-std"})
    seed_everything(params.seed, params.train.deterministic)
    runtime = runtime or make_runtime(params.train, params.augment.backend, params.data.num_workers)
    splits = load_splits(paths.DATA_DIR, params.data, params.seed)
    mean, std = load_stats()
    loader = make_train_loader(
        splits.train_images,
        splits.train_labels,
        params.augment,
        mean,
        std,
        backend=runtime.backend,
        batch_size=params.train.batch_size,
        seed=params.seed,
        num_workers=runtime.num_workers,
        device=runtime.device,
        full_batches=full_batches,
        rank=runtime.rank,
        world_size=runtime.world_size,
    )
    return Training(runtime, splits, mean, std, loader)
