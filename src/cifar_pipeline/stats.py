"""Per-channel mean and std of the training images, exact and in bounded memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cifar_pipeline import atomic
from cifar_pipeline.errors import PipelineError, require_inputs
from cifar_pipeline.normalization import check_stats
from cifar_pipeline.params import DataParams
from cifar_pipeline.paths import STATS
from cifar_pipeline.splits import load_splits


def mean_std(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of (N, H, W, C) uint8 images, pixel values scaled to 0..1; population std.

    Exact and in bounded memory: a histogram of the 256 values per channel, counted chunk by chunk, gives the
    sums and sums of squares as integers, so there is no float copy of the dataset and no rounding error.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
        raise PipelineError(f"expected a non-empty (N, H, W, C) uint8 image array, got {images.dtype} {images.shape}")
    channels = images.shape[-1]
    counts = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        pixels = images[start : start + chunk].reshape(-1, channels)
        for c in range(channels):
            counts[c] += np.bincount(pixels[:, c], minlength=256)
    values = np.arange(256, dtype=np.int64)
    n = int(counts[0].sum())
    mean, std = [], []
    for hist in counts:
        total, squares = int(hist @ values), int(hist @ values**2)
        mean.append(total / n / 255)
        # Population variance (n * sum(x^2) - sum(x)^2) / n^2 in Python's unbounded integers: no cancellation.
        std.append(math.sqrt((n * squares - total**2) / n**2) / 255)
    return tuple(mean), tuple(std)


def compute_stats(data_dir: str | Path, data: DataParams, seed: int, path: str | Path = STATS) -> dict:
    """Write `path` with the mean and std of the images the model trains on; return what was written.

    That is the train split after data.train_subset and the data.val_size hold-out: normalising with held-out
    pixels would leak them into training.
    """
    images = load_splits(data_dir, data, seed).train_images
    mean, std = mean_std(images)
    stats = {"mean": list(mean), "std": list(std), "count": len(images)}
    atomic.write_json(path, stats)
    return stats


def load_stats(path: str | Path = STATS) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) as written by the compute-mean-std stage."""
    path = Path(path)
    require_inputs({str(path): "compute-mean-std"})
    try:
        stats = json.loads(path.read_text())
        return check_stats(stats["mean"], stats["std"])
    except (ValueError, KeyError, TypeError, PipelineError) as exc:
        reason = exc if isinstance(exc, PipelineError) else repr(exc)
        raise PipelineError(f"{path} is not a valid stats file ({reason}): rerun compute-mean-std") from None
