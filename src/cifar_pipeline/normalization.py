"""Normalisation with the dataset's statistics, defined once: (pixel / 255 - mean) / std per channel, with mean and
std in 0..1 units as data/stats.json holds them.

Loaders ship uint8 pixels (a quarter of the bytes of float32) and normalise whole batches on the training device;
the report normalises its test images with the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cifar_pipeline.errors import PipelineError


def check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) as tuples of 3 floats, or a PipelineError saying what is wrong with them."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise PipelineError(f"mean and std need one value per RGB channel, got mean={mean}, std={std}")
    if not all(0.0 <= m <= 1.0 for m in mean) or not all(s > 0.0 for s in std):
        raise PipelineError(f"mean must lie in 0..1 and std be > 0 (pixel values scaled to 0..1), got {mean}, {std}")
    return mean, std


def mean_pixel(mean: Sequence[float]) -> tuple[int, ...]:
    """The mean as a uint8 pixel: the fill of the augmentation's hole. Rounded, as a uint8 image cannot hold a
    fraction (and Albumentations would truncate it)."""
    return tuple(round(m * 255) for m in check_stats(mean, (1.0, 1.0, 1.0))[0])


def normalizer(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that normalises (N, 3, H, W) pixels (uint8, or float 0..255) to float32 on `device`.

    The statistics go to the device once, here, not with every batch. The memory format of the pixels is kept.
    """
    mean, std = check_stats(mean, std)
    shift = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    scale = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def normalize(pixels: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = pixels.shape
        if pixels.is_contiguous() or not pixels.is_contiguous(memory_format=torch.channels_last):
            return (pixels.float() - shift) / scale
        # Channels-last memory (the Albumentations loader's batches: HWC images): broadcasting the per-channel
        # statistics over it runs an inner loop of 3 values, 3-5x slower on the CPU than this: each image as one
        # flat row of H*W*C values, against the statistics repeated H*W times. The same numbers either way.
        rows = pixels.permute(0, 2, 3, 1).reshape(n, -1).float()
        out = (rows - shift.view(channels).repeat(height * width)) / scale.view(channels).repeat(height * width)
        return out.view(n, height, width, channels).permute(0, 3, 1, 2)

    return normalize
