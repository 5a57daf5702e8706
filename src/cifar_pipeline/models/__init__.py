"""Model registry: build a model from its name and params.

Importing this module must stay cheap (no torch): params validation uses MODEL_NAMES in every stage,
so the model modules are imported only when a model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cifar_pipeline.errors import PipelineError

if TYPE_CHECKING:
    from torch import nn

    from cifar_pipeline.params import ModelParams

MODEL_NAMES = ("custom_resnet", "dilated_net")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A freshly initialised model; every model maps (N, 3, 32, 32) images to (N, 10) logits."""
    if name == "custom_resnet":
        from cifar_pipeline.models.custom_resnet import CustomResNet

        return CustomResNet(**kwargs)
    if name == "dilated_net":
        from cifar_pipeline.models.dilated_net import DilatedNet

        return DilatedNet(**kwargs)
    raise PipelineError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")


def model_kwargs(model: ModelParams) -> dict[str, Any]:
    """The constructor arguments of the chosen model, taken from the `model` section of params.yaml."""
    if model.name == "dilated_net":
        return {"dropout": model.dropout, "downsample": model.downsample}
    return {"dropout": model.dropout}
