"""Loading what the download stage wrote: the splits, class-balanced subsets and the validation hold-out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_pipeline.errors import PipelineError, require_inputs
from cifar_pipeline.params import DataParams


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
