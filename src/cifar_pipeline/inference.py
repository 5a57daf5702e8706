"""Batched inference on uint8 images, shared by the report stage and `cifar-predict`.

Images are normalised as the loaders normalise them (normalization.py), a whole batch at a time on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cifar_pipeline.errors import PipelineError
from cifar_pipeline.normalization import normalizer


@torch.inference_mode()
def batch_logits(
    model: nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 500,
    mirror: bool = False,
) -> np.ndarray:
    """(N, classes) float32 logits of uint8 (N, H, W, 3) RGB images; with `mirror`, of their horizontal mirrors."""
    if len(images) == 0:
        raise PipelineError("no images to evaluate")
    model = model.to(device).eval()
    normalize = normalizer(mean, std, device)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2)
        if mirror:
            batch = batch.flip(dims=[3])  # NCHW: dim 3 is the width
        outputs.append(model(normalize(batch)).float().cpu())
    return torch.cat(outputs).numpy()


def flip_tta_logits(logits: np.ndarray, mirrored_logits: np.ndarray) -> np.ndarray:
    """Horizontal-flip test-time augmentation: the mean of the logits of each image and of its mirror."""
    return (logits + mirrored_logits) / 2


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities per row, in float32."""
    return torch.from_numpy(np.asarray(logits, dtype=np.float32)).softmax(dim=1).numpy()
