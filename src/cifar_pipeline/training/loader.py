"""The loader, whole: which images each batch holds and each image's random stream (sampling), the training
augmentations in both backends (Albumentations image by image in worker processes, or whole batches on the
training device), and the loaders lr-find and train start from (`prepare_training`).

Every sample's augmentation is a function of (seed, epoch, index) only, so the batches depend neither on the
workers nor on the process count, and both backends see the same images in the same batches.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from cifar_pipeline import paths
from cifar_pipeline.data.dataset import (
    Splits,
    check_images,
    check_stats,
    image_grid,
    load_splits,
    load_stats,
    mean_pixel,
    normalizer,
)
from cifar_pipeline.params import AugmentParams, Params
from cifar_pipeline.stage import require_inputs, save_figure, write_text
from cifar_pipeline.training.runtime import Runtime, make_runtime, seed_everything

# Albumentations checks PyPI for a newer version on import unless told not to; stages run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import yaml

# ---------------------------------------- sampling ----------------------------------------
# Which images a batch holds, in which order, and each image's random stream: shared by both augment backends.
#
# Every sample's augmentation is a function of (seed, epoch, index) only. The sampler runs in the main process and
# yields `(index, epoch)` keys; the dataset of either backend draws the epoch's augmentation from
# `stream(seed, epoch, AUGMENT_STREAM)`. So the batches do not depend on the number of workers or on which worker
# handles a sample, and both backends see the same images in the same batches.
#
# The training loop calls `set_epoch(loader, epoch)` before iterating the loader each epoch: it picks that epoch's
# shuffle order and augmentations. Without it every epoch repeats epoch 0.

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


# ---------------------------------------- augment ----------------------------------------
# The training augmentations: the Albumentations pipeline (the spec, and the CPU backend), and the record of what
# ran in reports/augmentations.yaml.
#
# Images go in and come out as uint8 HWC RGB arrays; the loaders normalise whole batches on the training device
# (data/dataset.py). Evaluation images are not transformed at all. training/loader.py implements the same
# transforms on whole batches for the gpu backend, equal in distribution.


def train_transforms(augment: AugmentParams, mean: Sequence[float]) -> A.Compose:
    """Flip, shift/scale/rotate and one hole filled with the dataset's `mean` (3 floats in 0..1), in that order."""
    fill = mean_pixel(mean)
    return A.Compose(
        [
            A.HorizontalFlip(p=augment.hflip_p),
            # ShiftScaleRotate warns in Albumentations 2.x ("a special case of Affine"); this is the same transform
            # with the same ranges, spelled the way ShiftScaleRotate itself builds its Affine.
            # Reflect (101) border: the uncovered corners get plausible image content instead of black wedges,
            # whose sharp artificial edges the network would otherwise learn to look at.
            A.Affine(
                scale=(1.0 - augment.scale_limit, 1.0 + augment.scale_limit),
                translate_percent=(-augment.shift_limit, augment.shift_limit),
                rotate=(-augment.rotate_limit, augment.rotate_limit),
                shear=0.0,
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_REFLECT_101,
                p=augment.shift_scale_rotate_p,
            ),
            # Exactly one hole of hole_size x hole_size, always fully inside the image, filled with the mean:
            # once normalised the hole is ~0, i.e. it carries no signal rather than a black patch.
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(augment.hole_size, augment.hole_size),
                hole_width_range=(augment.hole_size, augment.hole_size),
                fill=fill,
                fill_mask=None,
                p=augment.coarse_dropout_p,
            ),
        ]
    )


def save_augmentation_record(
    augment: AugmentParams, backend: str, mean: Sequence[float], std: Sequence[float], path: str | Path
) -> None:
    """reports/augmentations.yaml: the backend that ran, the transforms (Albumentations' own serialisation of the
    pipeline, which both backends implement), and the normalisation that follows them on the training device, as
    the usual pipeline's closing Normalize would do it (max_pixel_value 255: (pixel / 255 - mean) / std)."""
    mean, std = check_stats(mean, std)
    implementation = {
        "albumentations": "Albumentations, image by image in loader worker processes (training/loader.py)",
        "gpu": "augment_batch (training/loader.py), whole batches on the training device; equal in distribution to "
        "the transforms",
    }[backend]
    record = {
        "backend": backend,
        "implementation": implementation,
        # Through JSON: Albumentations' dict holds tuples, which YAML's safe dumper does not take.
        "transforms": json.loads(json.dumps(A.to_dict(train_transforms(augment, mean)))),
        "normalize": {"mean": list(mean), "std": list(std), "max_pixel_value": 255.0, "where": "training device"},
    }
    write_text(path, yaml.safe_dump(record, sort_keys=False))


# ---------------------------------------- batched augment ----------------------------------------
# The training augmentations on whole batches on the training device, and a loader over a split held there.
#
# `augment.backend: gpu` selects this path (on any device: the CPU runs it too, as the tests do). The Albumentations
# loader tops out around 4-5k images/s per CPU core, which cannot feed a fast GPU; here the uint8 split lives on the
# device (CIFAR-10's train split is 150 MB) and each batch is gathered by index, then flipped, warped, cut out and
# normalised (data/dataset.py) there: no DataLoader, no workers.
#
# The transforms and their parameters are those of train_transforms (above): HorizontalFlip, Affine (integer
# translation truncated like Albumentations', independent x and y scales, rotation about the centre, bilinear,
# reflect-101 border, output rounded like cv2's uint8 warp), and one CoarseDropout hole filled with the rounded mean
# pixel. The two implementations are equal in distribution, not image for image: each draws its parameters its own
# way. Sample i's parameters in epoch e depend on (seed, e, i) and the split's size only: a whole epoch's are drawn at
# once on the CPU, indexed by sample, and copied to the device once. So they depend neither on the batch size nor on
# the device, and nothing syncs the host with the device per batch. The shuffle order is training/loader.py's, so both
# backends see the same batches of images.


class Draw(NamedTuple):
    """Per-sample augmentation parameters, one row per sample."""

    flip: torch.Tensor  # bool
    warp: torch.Tensor  # bool: apply the affine warp
    theta: torch.Tensor  # float32 (n, 2, 3): output -> input coordinates, as F.affine_grid takes them
    hole: torch.Tensor  # bool: cut a hole
    top: torch.Tensor  # int64: the hole's first row
    left: torch.Tensor  # int64: the hole's first column

    def take(self, index: torch.Tensor) -> Draw:
        return Draw(*(t[index] for t in self))

    def to(self, device: torch.device) -> Draw:
        return Draw(*(t.to(device) for t in self))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator that draws every sample's augmentation parameters of `epoch`."""
    state = np.random.SeedSequence(seed, spawn_key=(epoch, AUGMENT_STREAM)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def affine_theta(
    tx: torch.Tensor,
    ty: torch.Tensor,
    sx: torch.Tensor,
    sy: torch.Tensor,
    degrees: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """The (n, 2, 3) `F.affine_grid` matrices (align_corners=True) of Albumentations' Affine warp.

    Albumentations maps input to output pixel centres by x' = R S (x - c) + c + t, with c the image centre,
    S = diag(sx, sy) and R = [[cos a, sin a], [-sin a, cos a]]; cv2 samples the input at the inverse of that.
    With align_corners=True the normalised coordinate of pixel x is (x - c) * 2 / (size - 1), so the corner pixel
    centres are +-1 and grid_sample's "reflection" padding reflects about them: cv2's BORDER_REFLECT_101.
    """
    a = torch.deg2rad(degrees.double() % 360)
    cos, sin = torch.cos(a), torch.sin(a)
    ku, kv = 2 / (width - 1), 2 / (height - 1)  # pixels -> normalised units, along x and along y
    # The inverse warp x = S^-1 R^T (x' - c - t) + c, written out element by element (batched 2x2 matmuls are slow).
    row_x = [cos / sx, -sin / sx * ku / kv, -(cos * tx - sin * ty) / sx * ku]
    row_y = [sin / sy * kv / ku, cos / sy, -(sin * tx + cos * ty) / sy * kv]
    return torch.stack([torch.stack(row_x, -1), torch.stack(row_y, -1)], -2).float()


def draw_params(augment: AugmentParams, n: int, height: int, width: int, generator: torch.Generator) -> Draw:
    """Parameters for `n` samples, drawn on the CPU from `generator` (the same ranges as train_transforms)."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low

    def chance(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < p

    flip = chance(augment.hflip_p)
    warp = chance(augment.shift_scale_rotate_p)
    # Albumentations truncates the shift to whole pixels: int(fraction * size).
    tx = torch.trunc(uniform(-augment.shift_limit, augment.shift_limit) * width)
    ty = torch.trunc(uniform(-augment.shift_limit, augment.shift_limit) * height)
    sx = uniform(1 - augment.scale_limit, 1 + augment.scale_limit)
    sy = uniform(1 - augment.scale_limit, 1 + augment.scale_limit)  # keep_ratio=False: independent of sx
    degrees = uniform(-augment.rotate_limit, augment.rotate_limit)
    hole = chance(augment.coarse_dropout_p)
    size = augment.hole_size
    top = torch.randint(0, height - size + 1, (n,), generator=generator)
    left = torch.randint(0, width - size + 1, (n,), generator=generator)
    return Draw(flip, warp, affine_theta(tx, ty, sx, sy, degrees, height, width), hole, top, left)


def augment_batch(images: torch.Tensor, draw: Draw, hole_size: int, fill: torch.Tensor) -> torch.Tensor:
    """Flip, warp and cut out uint8 (n, C, H, W) images; float32 pixel values (0..255) come out, not normalised."""
    x = images.float()
    per_image = (-1, 1, 1, 1)
    x = torch.where(draw.flip.view(per_image), x.flip(-1), x)
    grid = F.affine_grid(draw.theta, list(x.shape), align_corners=True)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    x = torch.where(draw.warp.view(per_image), warped.round_(), x)  # round: the cv2 warp writes uint8
    rows = torch.arange(x.shape[-2], device=x.device)
    cols = torch.arange(x.shape[-1], device=x.device)
    in_rows = (rows >= draw.top[:, None]) & (rows < draw.top[:, None] + hole_size)
    in_cols = (cols >= draw.left[:, None]) & (cols < draw.left[:, None] + hole_size)
    in_hole = in_rows[:, :, None] & in_cols[:, None, :] & draw.hole.view(-1, 1, 1)
    return torch.where(in_hole[:, None], fill.view(1, -1, 1, 1), x)


class DeviceDataset:
    """A split on the device: uint8 (N, 3, H, W) images and int64 labels, augmented (given `augment`) and normalised
    a batch at a time. Items are keyed like CifarDataset's and are, like its items, augmented uint8 (3, H, W) images
    on the CPU, so plots.save_train_samples works on either."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        device: torch.device | str,
        augment: AugmentParams | None = None,
    ) -> None:
        check_images(images, labels)
        self.device = torch.device(device)
        self.normalize = normalizer(mean, std, self.device)
        self.fill = torch.tensor(mean_pixel(mean), dtype=torch.float32, device=self.device)  # as training/loader.py's
        self.images = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels).to(self.device, torch.int64)
        self.augment = augment
        self.seed = seed
        self._draw: tuple[int, Draw] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def draw(self, epoch: int) -> Draw:
        """Every sample's augmentation parameters in `epoch`, on the device (the last epoch's are kept)."""
        if self._draw is None or self._draw[0] != epoch:
            height, width = self.images.shape[-2:]
            params = draw_params(self.augment, len(self), height, width, epoch_generator(self.seed, epoch))
            self._draw = epoch, params.to(self.device)
        return self._draw[1]

    def pixels(self, index: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """The samples at `index`, augmented: float32 (n, 3, H, W) whole pixel values 0..255, on the device."""
        images = self.images[index]
        if self.augment is None or not len(images):  # none: a process's share of a short last batch may be empty
            return images.float()
        return augment_batch(images, self.draw(epoch).take(index), self.augment.hole_size, self.fill)

    def batch(self, index: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 normalised (n, 3, H, W) images, int64 labels) of the samples at `index` (on the device)."""
        return self.normalize(self.pixels(index, epoch)), self.labels[index]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        at = torch.tensor([index], device=self.device)
        # The pixels are whole numbers in 0..255 (the warp rounds, the fill is a uint8 pixel): uint8 holds them exactly.
        return self.pixels(at, epoch)[0].to("cpu", torch.uint8), self.labels[index].cpu()


class DeviceLoader:
    """Batches of a DeviceDataset in training/loader.py's order: a drop-in for the Albumentations loader
    (DeviceBatches: len, iteration, `.dataset`, `.batch_sampler.sampler.set_epoch` for set_epoch)."""

    def __init__(
        self,
        dataset: DeviceDataset,
        batch_size: int,
        train: bool,
        seed: int,
        full_batches: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.batch_sampler = batch_sampler(len(dataset), seed, batch_size, train, full_batches, rank, world_size)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.batch_sampler.sampler
        epoch = sampler.epoch
        order = np.fromiter((i for i, _ in sampler), dtype=np.int64, count=len(sampler))
        # One copy of the epoch's order to the device, then slices of it: no host sync per batch.
        order = torch.from_numpy(order[: len(self) * self.batch_size]).to(self.dataset.device)
        for index in order.split(self.batch_size):
            yield self.dataset.batch(self.batch_sampler.take_share(index), epoch)


# ---------------------------------------- loaders ----------------------------------------
# The loaders the stages train and evaluate with, for either `augment.backend`: Albumentations image by image in
# loader worker processes (here), or whole batches on the training device (training/loader.py). `auto` picks gpu on
# CUDA, where a few CPU workers cannot feed the GPU (benchmarks/RESULTS.md), and albumentations elsewhere, where the
# device is the CPU the workers would share anyway.
#
# Both kinds of loader take their batches from training/loader.py's sampler and yield float32 batches normalised on the
# device (data/dataset.py); both have what the training loop uses: len, iteration, `.dataset`, and
# `.batch_sampler.sampler.set_epoch` for set_epoch. Batches travel as uint8 pixels, a quarter of the bytes of
# float32, until they are on the device.

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
    share of each (training/loader.py). Call `set_epoch` before each epoch."""
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
        # Start the DataLoader's iterator now, not at the first batch: engine.py's loader_batches keeps the seed that
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
    train stage's on several processes (training/runtime.py): the loader gives this process its share of each batch."""
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


def save_train_samples(dataset, classes: Sequence[str], path: str | Path, n: int = 32) -> None:
    """A grid of `n` augmented training images (epoch 0's augmentations) with their class names.

    `dataset` is a training loader's: its items are augmented uint8 (3, H, W) images and their labels."""
    n = min(n, len(dataset))
    # Spread over the whole split, so a class-sorted array still shows every class.
    indices = np.linspace(0, len(dataset) - 1, n).round().astype(int)
    samples = [dataset[(int(i), 0)] for i in indices]
    images = torch.stack([image for image, _ in samples]).permute(0, 2, 3, 1).numpy()
    titles = [classes[int(label)] for _, label in samples]
    fig = image_grid(images, titles, title="Augmented training images (as the model sees them, before normalisation)")
    save_figure(path, fig, dpi=100)
