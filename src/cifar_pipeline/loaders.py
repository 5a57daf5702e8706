"""The loaders the stages train and evaluate with, for either `augment.backend`: Albumentations in loader worker
processes (data.py), or whole batches on the training device (gpu_augment.py). `auto` picks gpu on CUDA, where a
few CPU workers cannot feed the GPU (benchmarks/RESULTS.md), and albumentations elsewhere, where the device is the
CPU the workers would share anyway."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from cifar_pipeline.data import CifarDataset, make_loader
from cifar_pipeline.gpu_augment import DeviceDataset, DeviceLoader
from cifar_pipeline.params import AugmentParams
from cifar_pipeline.transforms import test_transforms, train_transforms


def resolve_backend(setting: str, device: torch.device) -> str:
    """`augment.backend` as the backend to use on `device`: `auto` is gpu on CUDA, albumentations elsewhere."""
    if setting == "auto":
        return "gpu" if device.type == "cuda" else "albumentations"
    return setting


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
) -> DataLoader | DeviceLoader:
    """The training loader `augment.backend` asks for: Albumentations in worker processes, or on `device`."""
    if resolve_backend(augment.backend, device) == "gpu":
        dataset = DeviceDataset(images, labels, mean, std, seed, device, augment)
        return DeviceLoader(dataset, batch_size, train=True, seed=seed)
    dataset = CifarDataset(images, labels, train_transforms(augment, mean, std), seed)
    return make_loader(dataset, batch_size, True, num_workers, seed, pin_memory=device.type == "cuda")


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
) -> DataLoader | DeviceLoader:
    """An ordered, normalised, unaugmented loader; with the gpu backend the split lives on `device` too."""
    if resolve_backend(backend, device) == "gpu":
        return DeviceLoader(DeviceDataset(images, labels, mean, std, seed, device), batch_size, False, seed)
    dataset = CifarDataset(images, labels, test_transforms(mean, std), seed)
    return make_loader(dataset, batch_size, False, num_workers, seed, pin_memory=device.type == "cuda")
