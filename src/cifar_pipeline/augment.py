"""The training augmentations: the Albumentations pipeline (the spec, and the CPU backend), and the record of what
ran in reports/augmentations.yaml.

Images go in and come out as uint8 HWC RGB arrays; the loaders normalise whole batches on the training device
(normalization.py). Evaluation images are not transformed at all. batched_augment.py implements the same
transforms on whole batches for the gpu backend, equal in distribution.
"""

from __future__ import annotations

import json
import os

# Albumentations checks PyPI for a newer version on import unless told not to; stages run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import yaml

from cifar_pipeline.atomic import write_text
from cifar_pipeline.normalization import check_stats, mean_pixel
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


def save_augmentation_record(
    augment: AugmentParams, backend: str, mean: Sequence[float], std: Sequence[float], path: str | Path
) -> None:
    """reports/augmentations.yaml: the backend that ran, the transforms (Albumentations' own serialisation of the
    pipeline, which both backends implement), and the normalisation that follows them on the training device, as
    the usual pipeline's closing Normalize would do it (max_pixel_value 255: (pixel / 255 - mean) / std)."""
    mean, std = check_stats(mean, std)
    implementation = {
        "albumentations": "Albumentations, image by image in loader worker processes (loaders.py)",
        "gpu": "batched_augment.py, whole batches on the training device; equal in distribution to the transforms",
    }[backend]
    record = {
        "backend": backend,
        "implementation": implementation,
        # Through JSON: Albumentations' dict holds tuples, which YAML's safe dumper does not take.
        "transforms": json.loads(json.dumps(A.to_dict(train_transforms(augment, mean)))),
        "normalize": {"mean": list(mean), "std": list(std), "max_pixel_value": 255.0, "where": "training device"},
    }
    write_text(path, yaml.safe_dump(record, sort_keys=False))
