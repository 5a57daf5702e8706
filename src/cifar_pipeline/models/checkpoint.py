"""A trained model's file and its use: the checkpoint format every models/*.pt has, the Classifier a checkpoint
loads into (network, mean/std, classes), and batched, normalised inference with flip TTA (report and cifar-predict).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_pipeline.data.dataset import check_stats, normalizer
from cifar_pipeline.models import build_model
from cifar_pipeline.params import MODEL_NAMES
from cifar_pipeline.stage import MissingInputError, PipelineError, save_torch

# ---------------------------------------- checkpoint ----------------------------------------
# Checkpoints: a plain dict that `torch.load(weights_only=True)` can read, so loading one never runs code.
#
# {"format": "cifar_pipeline/1", "model_name", "model_kwargs", "state_dict", **extra (epoch, optimizer, ...)}

FORMAT = "cifar_pipeline/1"
COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps the model and prefixes every state_dict key with this


def _plain(value: Any, where: str) -> Any:
    """`value` with tensors moved to the CPU and numpy scalars made Python numbers; anything else is refused."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items  # a namedtuple becomes a plain tuple
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # before float: np.float64 is a float
        return torch.from_numpy(value) if getattr(value, "ndim", 0) else value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    # A bug in the caller, not a user error: weights_only loading would refuse this object later.
    raise TypeError(f"checkpoint entry {where} is a {type(value).__name__}: torch.load(weights_only=True) refuses it")


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict, without the prefix torch.compile's wrapper adds."""
    state = getattr(model, "_orig_mod", model).state_dict()
    return {key.removeprefix(COMPILED_PREFIX): value for key, value in state.items()}


def make_checkpoint(state_dict: dict, model_name: str, model_kwargs: dict, **extra: Any) -> dict[str, Any]:
    checkpoint = {"format": FORMAT, "model_name": model_name, "model_kwargs": model_kwargs, "state_dict": state_dict}
    checkpoint.update(extra)
    return checkpoint


def save_plain(path: str | Path, obj: dict[str, Any]) -> None:
    """Save `obj` atomically with its tensors on the CPU; refuse anything torch.load(weights_only=True) would."""
    save_torch(path, _plain(obj, "checkpoint"))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"{path} does not exist: run the 'train' stage first (dvc repro train), or the whole pipeline (dvc repro)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError... for bad files
        imported = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and imported:
            raise PipelineError(
                f"{path} was refused and nothing in it was run: it would import {imported.group(1)}. A checkpoint "
                "written by this pipeline holds only tensors and plain data, so this file comes from elsewhere or "
                "has been tampered with"
            ) from None
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise PipelineError(
            f"{path} is not a readable checkpoint (corrupt, truncated or not written by torch.save): {detail}"
        ) from None

    if not isinstance(checkpoint, dict):
        raise PipelineError(
            f"{path} is not a cifar_pipeline checkpoint: it holds a {type(checkpoint).__name__}, not a dict; "
            "rerun the 'train' stage"
        )
    if checkpoint.get("format") != FORMAT:
        bare = checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values())
        raise PipelineError(
            f"{path} is not a cifar_pipeline checkpoint (format {checkpoint.get('format')!r}, expected {FORMAT!r})"
            + ("; it looks like a bare state_dict" if bare else "")
            + ": rerun the 'train' stage"
        )
    if checkpoint.get("model_name") not in MODEL_NAMES:
        raise PipelineError(
            f"{path} names an unknown model {checkpoint.get('model_name')!r}; known models: {', '.join(MODEL_NAMES)}"
        )
    for key in ("model_kwargs", "state_dict"):
        if not isinstance(checkpoint.get(key), dict):
            raise PipelineError(f"{path} has no valid {key!r} entry: rerun the 'train' stage")
    return checkpoint


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """The checkpoint's model with its weights, in eval mode."""
    name, kwargs = checkpoint["model_name"], checkpoint["model_kwargs"]
    try:
        model = build_model(name, **kwargs)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:500]  # load_state_dict lists every key: keep the start
        raise PipelineError(f"the checkpoint's weights do not fit model {name!r} with {kwargs}: {detail}") from None
    return model.eval()


# ---------------------------------------- classifier ----------------------------------------
# A trained model ready to classify raw images, for `cifar-predict` and `cifar-export` (no stage uses it).


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


# ---------------------------------------- inference ----------------------------------------
# Batched inference on uint8 images, shared by the report stage and `cifar-predict`.
#
# Images are normalised as the loaders normalise them (data/dataset.py), a whole batch at a time on the device.


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
