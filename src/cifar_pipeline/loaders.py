"""The loaders the stages train and evaluate with, for either `augment.backend`: Albumentations in loader worker
processes (data.py), or whole batches on the training device (gpu_augment.py). `auto` picks gpu on CUDA, where a
few CPU workers cannot feed the GPU (benchmarks/RESULTS.md), and albumentations elsewhere, where the device is the
CPU the workers would share anyway.

Both kinds of loader yield float32 batches normalised on the device (normalization.py), and have what the training
loop uses: len, iteration, `.dataset`, and `.batch_sampler.sampler.set_epoch` for data.set_epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from cifar_pipeline.data import CifarDataset, make_loader
from cifar_pipeline.gpu_augment import DeviceDataset, DeviceLoader
from cifar_pipeline.normalization import normalizer
from cifar_pipeline.params import AugmentParams
from cifar_pipeline.transforms import train_transforms


def resolve_backend(setting: str, device: torch.device) -> str:
    """`augment.backend` as the backend to use on `device`: `auto` is gpu on CUDA, albumentations elsewhere."""
    if setting == "auto":
        return "gpu" if device.type == "cuda" else "albumentations"
    return setting


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
    batch_size: int,
    seed: int,
    num_workers: int,
    device: torch.device,
) -> DeviceBatches | DeviceLoader:
    """The training loader `augment.backend` asks for: Albumentations in worker processes, or on `device`."""
    if resolve_backend(augment.backend, device) == "gpu":
        dataset = DeviceDataset(images, labels, mean, std, seed, device, augment)
        return DeviceLoader(dataset, batch_size, train=True, seed=seed)
    dataset = CifarDataset(images, labels, train_transforms(augment, mean), seed)
    loader = make_loader(dataset, batch_size, True, num_workers, seed, pin_memory=device.type == "cuda")
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
) -> DeviceBatches | DeviceLoader:
    """An ordered, normalised, unaugmented loader; with the gpu backend the split lives on `device` too."""
    if resolve_backend(backend, device) == "gpu":
        return DeviceLoader(DeviceDataset(images, labels, mean, std, seed, device), batch_size, False, seed)
    loader = make_loader(
        CifarDataset(images, labels, None, seed), batch_size, False, num_workers, seed, pin_memory=device.type == "cuda"
    )
    return DeviceBatches(loader, normalizer(mean, std, device), device)
