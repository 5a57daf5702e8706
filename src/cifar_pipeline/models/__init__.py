"""Model registry: build a model from its name and params."""

from __future__ import annotations

MODELS: dict = {"custom_resnet": None, "dilated_net": None}
