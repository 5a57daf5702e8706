"""Export a trained checkpoint to ONNX, for runtimes without PyTorch (onnxruntime, browsers, phones).

The exported graph includes the normalisation, so it takes what an image decoder gives: float32 RGB in 0..1, shape
(N, 3, 32, 32) with any N, input name `images`; it returns logits (N, classes), output name `logits`. The class
names, mean and std travel in the model's metadata (`classes` as JSON, `mean`, `std`, `model_name`).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from cifar_pipeline.models.checkpoint import Classifier
from cifar_pipeline.stage import atomic_path

INPUT_NAME, OUTPUT_NAME = "images", "logits"


class Normalised(nn.Module):
    """The classifier's model behind its own normalisation: 0..1 RGB in, logits out."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.model = classifier.model
        self.register_buffer("mean", torch.tensor(classifier.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(classifier.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def export_onnx(classifier: Classifier, path: str | Path) -> None:
    """Write the classifier as one self-contained ONNX file (weights inside), atomically."""
    import onnx

    module = Normalised(classifier).eval()
    example = torch.rand(2, 3, 32, 32)
    batch = torch.export.Dim("batch")
    # The exporter's registry of ONNX functions logs "torchvision is not installed. Skipping torchvision::nms" and the
    # like for torchvision's ops, which our models never use: not the user's concern, and neither are its notes on
    # its own internals (warnings).
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"images": {0: batch}},
                verbose=False,
                report=False,
            )
        finally:
            registry.setLevel(level)
    proto = program.model_proto
    metadata = {
        "classes": json.dumps(list(classifier.classes)),
        "mean": json.dumps(list(classifier.mean)),
        "std": json.dumps(list(classifier.std)),
        "model_name": classifier.model_name,
        "input": "float32 RGB in 0..1, shape (N, 3, 32, 32); normalisation is part of the graph",
    }
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
