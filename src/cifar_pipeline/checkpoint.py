"""Checkpoints: a plain dict that `torch.load(weights_only=True)` can read, so loading one never runs code.

{"format": "cifar_pipeline/1", "model_name", "model_kwargs", "state_dict", **extra (epoch, optimizer, ...)}
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_pipeline.atomic import save_torch
from cifar_pipeline.errors import MissingInputError, PipelineError
from cifar_pipeline.models import MODEL_NAMES, build_model

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


def save_checkpoint(path: str | Path, model: nn.Module, model_name: str, model_kwargs: dict, **extra: Any) -> None:
    save_plain(path, make_checkpoint(model_state(model), model_name, model_kwargs, **extra))


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
    for name, values in (("mean", mean), ("std", std)):
        numbers = isinstance(values, (list, tuple)) and all(isinstance(v, (int, float)) for v in values)
        if not numbers or len(values) != 3 or (name == "std" and min(values) <= 0):
            raise PipelineError(f"{path} holds no valid per-channel {name} ({values!r}): rerun the 'train' stage")
    model = model_from_checkpoint(checkpoint)
    with torch.inference_mode():
        outputs = model(torch.zeros(1, 3, 32, 32)).shape[1]
    if outputs != len(classes):
        raise PipelineError(f"{path} names {len(classes)} classes but its model has {outputs} outputs")
    as_floats = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return Classifier(model, tuple(classes), *as_floats, checkpoint["model_name"])
