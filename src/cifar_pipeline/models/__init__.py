"""Model registry: build a model from its name and params.

Importing this module must stay cheap (no torch): params validation uses MODEL_NAMES in every stage.
"""

from __future__ import annotations

MODEL_NAMES = ("custom_resnet", "dilated_net")
