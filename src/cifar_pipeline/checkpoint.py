"""Checkpoints: a plain dict that `torch.load(weights_only=True)` can read, so loading one never runs code.

{"format": "cifar_pipeline/1", "model_name", "model_kwargs", "state_dict", **extra (epoch, optimizer, ...)}
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_pipeline.atomic import save_torch
from cifar_pipeline.choices import MODEL_NAMES
from cifar_pipeline.errors import MissingInputError, PipelineError
from cifar_pipeline.models import build_model

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
