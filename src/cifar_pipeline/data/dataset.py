"""The downloaded dataset as the later stages read it: the splits, class-balanced subsets and the validation hold-out;
the per-channel mean and std (the compute-mean-std stage) and the normalisation that uses them; and image grids.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from cifar_pipeline import stage
from cifar_pipeline.params import DataParams
from cifar_pipeline.paths import STATS
from cifar_pipeline.stage import PipelineError, require_inputs

matplotlib.use("Agg")  # before pyplot is imported, or pyplot picks an interactive backend where a display exists

import matplotlib.pyplot as plt  # noqa: E402

# ---------------------------------------- normalization ----------------------------------------
# Normalisation with the dataset's statistics, defined once: (pixel / 255 - mean) / std per channel, with mean and
# std in 0..1 units as data/stats.json holds them.
#
# Loaders ship uint8 pixels (a quarter of the bytes of float32) and normalise whole batches on the training device;
# the report normalises its test images with the same function.


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


# ---------------------------------------- splits ----------------------------------------
# Loading what the download stage wrote: the splits, class-balanced subsets and the validation hold-out.


def check_images(images: np.ndarray, labels: np.ndarray) -> None:
    """What every loader takes: uint8 (N, H, W, 3) RGB images and one label each."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise PipelineError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise PipelineError(f"labels must have shape ({len(images)},), got {labels.shape}")


@dataclass(frozen=True)
class Splits:
    train_images: np.ndarray  # (N, 32, 32, 3) uint8 RGB
    train_labels: np.ndarray  # (N,) int64
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]  # label i is classes[i], as the download stage wrote them in meta.json


def _require(data_dir: Path, name: str) -> Path:
    path = Path(data_dir) / name
    require_inputs({str(Path(data_dir)): "download", str(path): "download"})
    return path


def load_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of the 'train' or 'test' split."""
    path = _require(Path(data_dir), f"{split}.npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise PipelineError(f"{path} is unreadable ({exc}): rerun the download stage (dvc repro -f download)") from None
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or labels.shape != (len(images),):
        raise PipelineError(
            f"{path} does not hold (N, 32, 32, 3) images and N labels: rerun the download stage (dvc repro -f download)"
        )
    return images, labels.astype(np.int64, copy=False)


def read_classes(data_dir: str | Path) -> tuple[str, ...]:
    """The class names, in label order, from the download stage's meta.json."""
    path = _require(Path(data_dir), "meta.json")
    try:
        classes = json.loads(path.read_text())["classes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path} holds no list of classes ({exc!r}): rerun the download stage") from None
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise PipelineError(f"{path}: classes must be a list of at least 2 names, got {classes!r}")
    return tuple(classes)


def balanced_subset(labels: np.ndarray, size: int, seed: int | Sequence[int]) -> np.ndarray:
    """Sorted indices of `size` items with the classes as equal as possible, drawn reproducibly from `seed`.

    Each class present gets size // k items; the remainder goes one each to the lowest labels.
    """
    classes = np.unique(labels)
    quota = np.full(len(classes), size // len(classes))
    quota[: size % len(classes)] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for cls, n in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == cls)
        if n > len(members):
            raise PipelineError(
                f"cannot draw a class-balanced subset of {size}: class {cls} has {len(members)} images, {n} needed"
            )
        chosen.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(chosen))


def _subset(images: np.ndarray, labels: np.ndarray, size: int | None, key: str, split: str, seed: Sequence[int]):
    if size is None:
        return images, labels
    if size > len(labels):
        raise PipelineError(f"{key} = {size} is larger than the {split} split ({len(labels)} images)")
    index = balanced_subset(labels, size, seed)
    return images[index], labels[index]


def load_test_split(data_dir: str | Path, data: DataParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test arrays a run uses (data.test_subset applied), without reading the train split."""
    images, labels = load_split(data_dir, "test")
    return _subset(images, labels, data.test_subset, "data.test_subset", "test", (seed, 1))


def load_splits(data_dir: str | Path, data: DataParams, seed: int) -> Splits:
    """The train/val/test arrays a run uses: subsets per data.train_subset / data.test_subset, then data.val_size
    class-balanced train images held out for validation. Every choice keeps the original order."""
    train_images, train_labels = load_split(data_dir, "train")
    # One random stream per choice, so changing one setting does not reshuffle the others.
    train_images, train_labels = _subset(
        train_images, train_labels, data.train_subset, "data.train_subset", "train", (seed, 0)
    )
    test_images, test_labels = load_test_split(data_dir, data, seed)
    if data.val_size >= len(train_labels):
        raise PipelineError(
            f"data.val_size = {data.val_size} leaves no training images ({len(train_labels)} in the train split)"
        )
    if data.val_size:
        val = np.zeros(len(train_labels), dtype=bool)
        val[balanced_subset(train_labels, data.val_size, (seed, 2))] = True
        val_images, val_labels = train_images[val], train_labels[val]
        train_images, train_labels = train_images[~val], train_labels[~val]
    else:  # no hold-out: no copy of the train arrays either
        val_images, val_labels = train_images[:0], train_labels[:0]
    classes = read_classes(data_dir)
    return Splits(train_images, train_labels, val_images, val_labels, test_images, test_labels, classes)


# ---------------------------------------- stats ----------------------------------------
# Per-channel mean and std of the training images, exact and in bounded memory.


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
    stage.write_json(path, stats)
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


# ---------------------------------------- pictures ----------------------------------------
# Image grids: the train stage's augmented samples and the report's mistakes. Matplotlib runs on the Agg backend:
# files only.


def image_grid(images: np.ndarray, titles: Sequence[str], ncols: int = 8, title: str | None = None) -> Figure:
    """uint8 (N, H, W, 3) images in a grid, each above its title, without axes."""
    if len(titles) != len(images):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    ncols = max(1, min(ncols, len(images)))
    nrows = max(1, math.ceil(len(images) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.8 * nrows + (0.4 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, titles, strict=False):  # the last row may have spare axes
        # nearest: 32x32 pixels blown up stay sharp squares instead of a blur
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig
