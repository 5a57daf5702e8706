"""The report stage's figures: the training curves, the confusion matrix and the most confident mistakes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from cifar_pipeline.data.dataset import image_grid, plt


def metrics_curves(
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], schedule: tuple[np.ndarray, np.ndarray], max_lr: float
) -> Figure:
    """Loss and accuracy per epoch for each split, and the learning rate per optimizer step, side by side.

    `curves` is {"loss" | "acc": {split: (epochs, values)}}; `schedule` is (position in epochs, lr) per step.
    """
    from matplotlib.ticker import MaxNLocator

    # 13 x 4 inches at the report's 100 dpi: 1,300 pixels, whole in a browser window (dvc plots show) and on a laptop.
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
    styles = {"train": "-o", "val": "-^", "test": "-s", "ema/val": "--^", "ema/test": "--s"}
    for ax, name, title, ylabel in (
        (axes[0], "loss", "Loss", "cross-entropy loss"),
        (axes[1], "acc", "Accuracy", "accuracy (%)"),
    ):
        for split, (epochs, values) in curves[name].items():
            ax.plot(epochs, values, styles.get(split, "-"), markersize=3, label=split)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    positions, lrs = schedule
    axes[2].plot(positions, lrs, color="tab:purple", label="learning rate")
    axes[2].axhline(max_lr, color="gray", linestyle=":", label=f"max LR {max_lr:.3g}")
    axes[2].set(title="Learning rate (One Cycle, per step)", xlabel="epoch", ylabel="learning rate")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[2].grid(alpha=0.3)
    axes[2].legend()
    return fig


ANNOTATED_CLASSES = 20  # up to this many classes each cell shows its count; beyond, the colour alone does


def confusion_matrix(counts: np.ndarray, classes: Sequence[str]) -> Figure:
    """counts[true, predicted] as a grid of cells, true classes down, predicted across. Up to ANNOTATED_CLASSES
    classes each cell carries its count; with more (CIFAR-100) the figure grows with the class count, the names
    shrink and a colour bar gives the scale, so that every class name stays legible."""
    n = len(classes)
    annotated = n <= ANNOTATED_CLASSES
    side = 7.5 if annotated else 2.5 + 0.15 * n  # inches: 100 classes get 0.15 in a row
    fig, ax = plt.subplots(figsize=(side, side - 1.0 if annotated else side), layout="constrained")
    # With many classes a square-root scale keeps the few confusions of each cell visible beside the diagonal.
    norm = None if annotated else PowerNorm(0.5, vmin=0)
    image = ax.imshow(counts, cmap="Blues", vmin=None if norm else 0, norm=norm)
    names = 10 if annotated else 6
    ax.set_xticks(
        range(n), classes, rotation=45 if annotated else 90, ha="right", rotation_mode="anchor", fontsize=names
    )
    ax.set_yticks(range(n), classes, fontsize=names)
    total, correct = int(counts.sum()), int(np.trace(counts))
    accuracy = f", {100 * correct / total:.2f}% on the diagonal" if total else ""
    ax.set(xlabel="predicted class", ylabel="true class", title=f"Confusion matrix: {total:,} test images{accuracy}")
    if not annotated:
        fig.colorbar(image, ax=ax, shrink=0.5, label="test images (square-root scale)")
        return fig
    dark = counts.max() / 2  # white text on the darker half of the colour scale
    for (true, predicted), count in np.ndenumerate(counts):
        colour = "white" if count > dark else "black"
        ax.text(predicted, true, f"{count:,}", ha="center", va="center", color=colour, fontsize=8)
    return fig


def misclassified_grid(images: np.ndarray, titles: Sequence[str], mistakes: int, total: int) -> Figure:
    """The chosen mistakes (uint8 NHWC, most confident first), each titled with its true and predicted class."""
    if not len(images):
        title = f"No mistakes on the {total:,} test images"
    else:
        which = f"All {mistakes:,}" if len(images) == mistakes else f"The {len(images)} most confident of {mistakes:,}"
        title = f"{which} mistakes on {total:,} test images\ntrue class / predicted class (softmax probability)"
    ncols = min(5, max(1, len(images)))
    fig = image_grid(images, titles, ncols=ncols, title=title)
    # Two-line titles with long class names need more room per image than the grid's default size leaves.
    nrows = max(1, math.ceil(len(images) / ncols))
    fig.set_size_inches(max(2.0 * ncols, 6.0), fig.get_figheight() + 0.3 * nrows + 0.3)  # 6: room for the title
    fig.tight_layout()
    return fig
