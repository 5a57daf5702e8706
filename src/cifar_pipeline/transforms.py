"""The Albumentations training pipeline, and its serialised form for reports/augmentations.yaml.

Images go in and come out as uint8 HWC RGB arrays; the loaders normalise whole batches on the training device
(normalization.py). Evaluation images are not transformed at all.
"""

from __future__ import annotations

import os

# Albumentations checks PyPI for a newer version on import unless told not to; stages run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2

from cifar_pipeline.atomic import atomic_path
from cifar_pipeline.normalization import mean_pixel
from cifar_pipeline.params import AugmentParams


def train_transforms(augment: AugmentParams, mean: Sequence[float]) -> A.Compose:
    """Flip, shift/scale/rotate and one hole filled with the dataset's `mean` (3 floats in 0..1), in that order."""
    fill = mean_pixel(mean)
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
            # once normalised the hole is ~0, i.e. it carries no signal rather than a black patch.
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(augment.hole_size, augment.hole_size),
                hole_width_range=(augment.hole_size, augment.hole_size),
                fill=fill,
                fill_mask=None,
                p=augment.coarse_dropout_p,
            ),
        ]
    )


def save_augmentations(compose: A.Compose, path: str | Path) -> None:
    """Write Albumentations' own YAML serialisation, which `A.load(path, data_format="yaml")` reads back."""
    with atomic_path(path) as tmp:
        A.save(compose, str(tmp), data_format="yaml")
