"""A trained model ready to classify raw images, for `cifar-predict` and `cifar-export` (no stage uses it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cifar_pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.normalization import check_stats


@dataclass(frozen=True)
class Classifier:
    """A trained model with what it needs to classify raw images: its classes and its normalisation."""

    model: nn.Module  # in eval mode, on the CPU
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_name: str


def load_classifier(path: str | Path) -> Classifier:
    """The model in a checkpoint written by the train stage, with its own class names, mean and std."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in ("classes", "mean", "std") if key not in checkpoint]
    if missing:
        raise PipelineError(
            f"{path} has no {', '.join(missing)}: it was not written by the train stage, which saves them; "
            "rerun the 'train' stage (dvc repro train)"
        )
    classes, mean, std = checkpoint["classes"], checkpoint["mean"], checkpoint["std"]
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        raise PipelineError(f"{path} holds no list of class names (classes = {classes!r}): rerun the 'train' stage")
    try:
        mean, std = check_stats(mean, std)
    except (TypeError, ValueError, PipelineError) as exc:
        reason = exc if isinstance(exc, PipelineError) else f"mean {mean!r}, std {std!r}"
        raise PipelineError(f"{path} holds no valid per-channel mean and std ({reason}): rerun 'train'") from None
    model = model_from_checkpoint(checkpoint)
    with torch.inference_mode():
        outputs = model(torch.zeros(1, 3, 32, 32)).shape[1]
    if outputs != len(classes):
        raise PipelineError(f"{path} names {len(classes)} classes but its model has {outputs} outputs")
    return Classifier(model, tuple(classes), mean, std, checkpoint["model_name"])
