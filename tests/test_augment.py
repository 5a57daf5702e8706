"""The augmentation pipeline: order and arguments from params, the exact hole, uint8 in and out, YAML round trip."""

import json
import random

import albumentations as A
import numpy as np
import pytest
import yaml
from conftest import MEAN, STD, random_images

from cifar_pipeline.params import AugmentParams
from cifar_pipeline.stage import PipelineError
from cifar_pipeline.training.loader import save_augmentation_record, train_transforms

ONLY_DROPOUT = AugmentParams(hflip_p=0.0, shift_scale_rotate_p=0.0, coarse_dropout_p=1.0)


def _seeded(compose: A.Compose, seed: int) -> A.Compose:
    rng = np.random.default_rng(seed)
    compose.set_random_state(rng, random.Random(seed))
    return compose


def test_train_pipeline_has_the_specified_order_and_arguments():
    augment = AugmentParams(
        hflip_p=0.3, shift_limit=0.05, scale_limit=0.2, rotate_limit=10, shift_scale_rotate_p=0.4, coarse_dropout_p=0.6
    )
    steps = A.to_dict(train_transforms(augment, MEAN))["transform"]["transforms"]

    # No Normalize: the loaders normalise whole batches on the device (tests/test_normalization.py).
    assert [s["__class_fullname__"] for s in steps] == ["HorizontalFlip", "Affine", "CoarseDropout"]
    flip, affine, dropout = steps
    assert flip["p"] == 0.3
    assert affine["p"] == 0.4
    assert affine["translate_percent"] == {"x": (-0.05, 0.05), "y": (-0.05, 0.05)}
    assert affine["scale"] == {"x": pytest.approx((0.8, 1.2)), "y": pytest.approx((0.8, 1.2))}
    assert affine["rotate"] == (-10.0, 10.0)
    assert affine["shear"] == {"x": (0.0, 0.0), "y": (0.0, 0.0)}
    assert dropout["p"] == 0.6
    assert dropout["num_holes_range"] == (1, 1)
    assert dropout["hole_height_range"] == (16, 16)
    assert dropout["hole_width_range"] == (16, 16)
    assert dropout["fill"] == tuple(round(m * 255) for m in MEAN)
    assert dropout["fill_mask"] is None


def test_images_stay_uint8_hwc():
    compose = train_transforms(AugmentParams(shift_scale_rotate_p=1.0, coarse_dropout_p=1.0), MEAN)
    out = _seeded(compose, 0)(image=random_images(1)[0])["image"]
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)


@pytest.mark.parametrize("hole_size", [16, 5])
def test_hole_is_one_exact_square_filled_with_the_mean(hole_size):
    compose = train_transforms(ONLY_DROPOUT.model_copy(update={"hole_size": hole_size}), MEAN)
    image = np.full((32, 32, 3), 7, dtype=np.uint8)  # no channel's mean pixel is 7
    for seed in range(5):
        out = _seeded(compose, seed)(image=image)["image"]
        for channel, m in enumerate(MEAN):
            filled = out[..., channel] == round(m * 255)
            assert filled.sum() == hole_size * hole_size
            rows, cols = np.nonzero(filled)
            assert rows.max() - rows.min() + 1 == hole_size
            assert cols.max() - cols.min() + 1 == hole_size
            assert (out[..., channel][~filled] == 7).all()


@pytest.mark.parametrize("backend", ["albumentations", "gpu"])
def test_the_record_says_what_ran_and_reloads_to_a_pipeline_with_identical_outputs(tmp_path, backend):
    augment = AugmentParams(coarse_dropout_p=0.9, shift_scale_rotate_p=0.9)
    compose = train_transforms(augment, MEAN)
    path = tmp_path / "reports" / "augmentations.yaml"
    save_augmentation_record(augment, backend, MEAN, STD, path)

    assert [p.name for p in path.parent.iterdir()] == ["augmentations.yaml"]  # no temporary left behind
    record = yaml.safe_load(path.read_text())
    assert record["backend"] == backend
    assert ("augment_batch" in record["implementation"]) == (backend == "gpu")
    # The seed's pipeline ends with Normalize: here it runs on the device, and the record shows it with its numbers.
    assert record["normalize"] == {
        "mean": list(MEAN),
        "std": list(STD),
        "max_pixel_value": 255.0,
        "where": "training device",
    }
    assert record["transforms"] == json.loads(json.dumps(A.to_dict(compose)))
    loaded = A.from_dict(record["transforms"])
    for seed, image in enumerate(random_images()):
        expected = _seeded(compose, seed)(image=image)["image"]
        assert np.array_equal(_seeded(loaded, seed)(image=image)["image"], expected)


def test_augmentation_is_random_but_seedable():
    compose = train_transforms(AugmentParams(shift_scale_rotate_p=1.0), MEAN)
    image = random_images(1)[0]
    first = _seeded(compose, 3)(image=image)["image"]
    assert np.array_equal(_seeded(compose, 3)(image=image)["image"], first)
    assert not np.array_equal(_seeded(compose, 4)(image=image)["image"], first)


@pytest.mark.parametrize("mean", [(0.5, 0.5), (127, 120, 110)])
def test_a_bad_mean_is_a_pipeline_error(mean):
    with pytest.raises(PipelineError, match="mean"):
        train_transforms(AugmentParams(), mean)
