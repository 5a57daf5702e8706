"""Image grids, and the train stage's grid of augmented samples. Matplotlib runs on the Agg backend: files only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch

from cifar_pipeline.atomic import save_figure

matplotlib.use("Agg")  # before pyplot is imported, or pyplot picks an interactive backend where a display exists

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


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
