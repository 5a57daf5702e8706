"""Albumentations pipelines for training and evaluation, and their serialised form for reports/augmentations.yaml.

Images go in as uint8 HWC RGB arrays and come out as float32 CHW tensors normalised with the dataset's
mean and std (3 floats each, in 0..1 units).
"""

from __future__ import annotations

import os

# Albumentations checks PyPI for a newer version on import unless told not to; stages run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from cifar_pipeline.atomic import atomic_path
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.params import AugmentParams


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise PipelineError(f"mean and std need one value per RGB channel, got mean={mean}, std={std}")
    if not all(0.0 <= m <= 1.0 for m in mean) or not all(s > 0.0 for s in std):
        raise PipelineError(f"mean must lie in 0..1 and std be > 0 (pixel values scaled to 0..1), got {mean}, {std}")
    return mean, std


def _normalize(mean: tuple[float, ...], std: tuple[float, ...]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


def train_transforms(augment: AugmentParams, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    mean, std = _check_stats(mean, std)
    # uint8 images cannot hold a fractional fill, and Albumentations would truncate it: round it here.
    mean_pixel = tuple(round(m * 255) for m in mean)
    return A.Compose(
        [
            A.HorizontalFlip(p=augment.hflip_p),
            # ShiftScaleRotate warns in Albumentations 2.x ("a special case of Affine"); this is the same transform
            # with the same ranges, spelled the way ShiftScaleRotate itself builds its Affine.
            # Reflect (101) border: the uncovered corners get plausible image content instead of black wedges,
            # whose sharp artificial edges the network would otherwise learn to look at.
            A.Affine(
                scale=(1.0 - augment.scale_limit, 1.0 + augment.scale_limit),
                translate_percent=(-augment.shift_limit, augment.shift_limit),
                rotate=(-augment.rotate_limit, augment.rotate_limit),
                shear=0.0,
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_REFLECT_101,
                p=augment.shift_scale_rotate_p,
            ),
            # Exactly one hole of hole_size x hole_size, always fully inside the image, filled with the mean:
            # after Normalize the hole is ~0, i.e. it carries no signal rather than a black patch.
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(augment.hole_size, augment.hole_size),
                hole_width_range=(augment.hole_size, augment.hole_size),
                fill=mean_pixel,
                fill_mask=None,
                p=augment.coarse_dropout_p,
            ),
            *_normalize(mean, std),
        ]
    )


def test_transforms(mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    return A.Compose(_normalize(*_check_stats(mean, std)))


test_transforms.__test__ = False  # its name would make pytest collect it as a test wherever it is imported


def save_augmentations(compose: A.Compose, path: str | Path) -> None:
    """Write Albumentations' own YAML serialisation, which `A.load(path, data_format="yaml")` reads back."""
    with atomic_path(path) as tmp:
        A.save(compose, str(tmp), data_format="yaml")
