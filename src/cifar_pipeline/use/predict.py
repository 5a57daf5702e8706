"""Classify image files with a trained checkpoint: what `cifar-predict` does.

Each file becomes a model input as data/download.py says (upright, RGB, the largest centred square resized to 32x32 with
a bicubic filter), the way the download stage reads an image-folder archive. Last, the pixels are normalised with the
checkpoint's own mean and std, as the test images were in training.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cifar_pipeline.data.download import to_model_input
from cifar_pipeline.models.checkpoint import Classifier, batch_logits, flip_tta_logits, softmax
from cifar_pipeline.stage import PipelineError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what a folder is searched for; a file named explicitly may be any
PROGRESS_MIN_FILES = 300  # a progress bar for more files than this (on a terminal)
READ_THREADS = min(8, os.cpu_count() or 1)  # Pillow decodes without holding the GIL


class ImageError(PipelineError):
    """One input that cannot be classified; the others still are."""


@dataclass(frozen=True)
class Result:
    file: str
    top: list[tuple[str, float]]  # (class, probability), most probable first; empty when `error` is set
    error: str | None = None


def find_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Result]]:
    """The image files named by `inputs` (files as given; folders searched recursively for PNG/JPEG, sorted), and
    a failed Result for each input that is missing or a folder without images."""
    files: list[Path] = []
    problems: list[Result] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.append(Result(str(name), [], "a folder with no PNG or JPEG files in it"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            problems.append(Result(str(name), [], "no such file or folder"))
    return files, problems


def read_image(path: str | Path) -> np.ndarray:
    """The image as uint8 (32, 32, 3) RGB, made as the module docstring says; ImageError when it cannot be."""
    try:
        with Image.open(path) as image:
            return to_model_input(image)[0]
    except PermissionError as exc:
        raise ImageError(f"cannot be read: {exc.strerror}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (expected PNG or JPEG)") from None
    except Image.DecompressionBombError:
        raise ImageError("too large to decode safely (over Pillow's pixel limit)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for truncated or corrupt files
        raise ImageError(f"a broken or truncated image ({exc})") from None


def top_classes(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The k most probable (class, probability) of one image, most probable first (ties: class order)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[i], float(probabilities[i])) for i in order]


def _read_or_error(path: Path) -> np.ndarray | str:
    try:
        return read_image(path)
    except ImageError as exc:
        return str(exc)


def classify(
    classifier: Classifier,
    files: Sequence[Path],
    device: torch.device,
    top_k: int = 3,
    batch_size: int = 256,
    tta: bool = False,
    progress: bool | None = False,
) -> Iterator[Result]:
    """One Result per file, in order, a batch at a time. `tta` averages the logits of each image and its mirror.

    `progress`: True shows a bar on stderr, None only when stderr is a terminal, False never.
    """
    if batch_size < 1 or top_k < 1:
        raise PipelineError(f"batch size and top-k must be at least 1, got {batch_size} and {top_k}")
    model = classifier.model.to(device)
    bar = tqdm(total=len(files), unit="image", desc="classifying", disable=None if progress is None else not progress)
    with ThreadPoolExecutor(READ_THREADS) as pool, bar:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            read = list(pool.map(_read_or_error, batch))
            good = [image for image in read if not isinstance(image, str)]
            probabilities = iter(_probabilities(classifier, model, good, device, tta) if good else [])
            for path, image in zip(batch, read, strict=True):
                if isinstance(image, str):
                    yield Result(str(path), [], image)
                else:
                    yield Result(str(path), top_classes(next(probabilities), classifier.classes, top_k))
            bar.update(len(batch))


def _probabilities(
    classifier: Classifier, model: torch.nn.Module, images: list[np.ndarray], device: torch.device, tta: bool
) -> np.ndarray:
    batch = np.stack(images)
    logits = batch_logits(model, batch, classifier.mean, classifier.std, device, batch_size=len(batch))
    if tta:
        mirrored = batch_logits(model, batch, classifier.mean, classifier.std, device, len(batch), mirror=True)
        logits = flip_tta_logits(logits, mirrored)
    return softmax(logits)
