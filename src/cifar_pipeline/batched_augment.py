"""The training augmentations on whole batches on the training device, and a loader over a split held there.

`augment.backend: gpu` selects this path (on any device: the CPU runs it too, as the tests do). The Albumentations
loader tops out around 4-5k images/s per CPU core, which cannot feed a fast GPU; here the uint8 split lives on the
device (CIFAR-10's train split is 150 MB) and each batch is gathered by index, then flipped, warped, cut out and
normalised (normalization.py) there: no DataLoader, no workers.

The transforms and their parameters are those of augment.train_transforms: HorizontalFlip, Affine (integer
translation truncated like Albumentations', independent x and y scales, rotation about the centre, bilinear,
reflect-101 border, output rounded like cv2's uint8 warp), and one CoarseDropout hole filled with the rounded mean
pixel. The two implementations are equal in distribution, not image for image: each draws its parameters its own
way. Sample i's parameters in epoch e depend on (seed, e, i) and the split's size only: a whole epoch's are drawn at
once on the CPU, indexed by sample, and copied to the device once. So they depend neither on the batch size nor on
the device, and nothing syncs the host with the device per batch. The shuffle order is sampling.py's, so both
backends see the same batches of images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cifar_pipeline.normalization import mean_pixel, normalizer
from cifar_pipeline.params import AugmentParams
from cifar_pipeline.sampling import AUGMENT_STREAM, batch_sampler
from cifar_pipeline.splits import check_images


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
        self.fill = torch.tensor(mean_pixel(mean), dtype=torch.float32, device=self.device)  # as augment.py's
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
    """Batches of a DeviceDataset in sampling.py's order: a drop-in for the Albumentations loader
    (loaders.DeviceBatches: len, iteration, `.dataset`, `.batch_sampler.sampler.set_epoch` for sampling.set_epoch)."""

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
