"""A checkpoint trained for a few steps on a tiny synthetic set whose classes differ by colour: its answers are known.

It is written by the pipeline's own save_checkpoint, with the extras the train stage saves (mean, std, classes).
"""

from pathlib import Path

import numpy as np
import torch
from archives import CLASSES
from conftest import save_model
from PIL import Image

from cifar_pipeline.models import build_model
from cifar_pipeline.training.engine import make_optimizer, make_scaler, train_step
from cifar_pipeline.training.runtime import Runtime

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)
# One colour per class, far apart from each other.
PALETTE = np.array(
    [
        [230, 30, 30],
        [30, 230, 30],
        [30, 30, 230],
        [230, 230, 30],
        [230, 30, 230],
        [30, 230, 230],
        [130, 130, 130],
        [240, 150, 60],
        [60, 150, 240],
        [20, 20, 20],
    ]
)


def colour_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3), labels int64): each image its class colour plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    noise = rng.normal(0, 20, size=(len(labels), 32, 32, 3))
    images = np.clip(PALETTE[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def train_tiny_model(
    path: Path, per_class: int = 5, steps: int = 40, lr: float = 3e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Train dilated_net on 50 colour images with the pipeline's train step; write its checkpoint to `path`.

    Returns the training images and labels, which the model then classifies correctly.
    """
    images, labels = colour_images(per_class, seed=0)
    torch.manual_seed(0)
    model = build_model("dilated_net")
    runtime = Runtime(torch.device("cpu"))
    optimizer = make_optimizer(model, lr=lr, weight_decay=0.0, runtime=runtime)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.from_numpy(labels)
    model.train()
    for _ in range(steps):
        train_step(model, x, y, optimizer, torch.nn.CrossEntropyLoss(), make_scaler(runtime), runtime)
    extra = {"epoch": 1, "mean": list(MEAN), "std": list(STD), "classes": list(CLASSES), "batch_size": len(y)}
    save_model(path, model, "dilated_net", {"dropout": 0.0, "downsample": "stride"}, **extra)
    return images, labels


def write_images(folder: Path, images: np.ndarray, labels: np.ndarray, suffix: str = ".png") -> list[Path]:
    """One file per image, named <index>_<class><suffix>."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / f"{index:03d}_{CLASSES[label]}{suffix}"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths
