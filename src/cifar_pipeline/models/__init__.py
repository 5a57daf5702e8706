"""The models, by the name `model.name` gives them in params.yaml (choices.MODEL_NAMES)."""

from __future__ import annotations

from typing import Any

from torch import nn

from cifar_pipeline.models.custom_resnet import CustomResNet
from cifar_pipeline.models.dilated_net import DilatedNet
from cifar_pipeline.params import MODEL_NAMES
from cifar_pipeline.stage import PipelineError

MODELS: dict[str, type[nn.Module]] = {"custom_resnet": CustomResNet, "dilated_net": DilatedNet}
assert tuple(MODELS) == MODEL_NAMES, "every allowed model.name needs its class here"


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A freshly initialised model; every model maps (N, 3, 32, 32) images to (N, num_classes) logits (10 unless
    `num_classes` is given)."""
    if name not in MODELS:
        raise PipelineError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return MODELS[name](**kwargs)
