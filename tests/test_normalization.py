"""Normalisation, defined once: exact values, the statistics of a normalised split, bad statistics refused."""

import numpy as np
import pytest
import torch
from conftest import MEAN, STD, random_images

from cifar_pipeline.data.dataset import mean_pixel, normalizer
from cifar_pipeline.stage import PipelineError


def test_uint8_pixels_normalise_to_pixel_over_255_minus_mean_over_std():
    images = random_images()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = normalizer(MEAN, STD, "cpu")(pixels)
    expected = (images / 255.0 - np.array(MEAN)) / np.array(STD)  # float64, channels last
    assert out.dtype == torch.float32 and out.shape == (8, 3, 32, 32)
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), expected, rtol=0, atol=1e-5)
    # Float pixel values (the gpu backend's augmented batches) normalise to exactly the same numbers.
    assert torch.equal(normalizer(MEAN, STD, "cpu")(pixels.float()), out)


def test_the_memory_format_is_kept_and_the_values_do_not_depend_on_it():
    normalize = normalizer(MEAN, STD, "cpu")
    pixels = torch.from_numpy(random_images()).permute(0, 3, 1, 2)  # NHWC memory: channels_last
    channels_last, contiguous = normalize(pixels), normalize(pixels.contiguous())
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and contiguous.is_contiguous()
    assert torch.equal(channels_last, contiguous)


def test_normalised_split_has_zero_mean_and_unit_std():
    rng = np.random.default_rng(1)
    # distinct per-channel statistics, as in real data
    images = np.clip(rng.normal((60, 120, 200), (20, 40, 30), (64, 32, 32, 3)), 0, 255).astype(np.uint8)
    scaled = images / 255.0
    mean, std = scaled.mean(axis=(0, 1, 2)), scaled.std(axis=(0, 1, 2))

    out = normalizer(mean, std, "cpu")(torch.from_numpy(images).permute(0, 3, 1, 2))

    assert out.mean(dim=(0, 2, 3)) == pytest.approx([0.0] * 3, abs=1e-4)
    assert out.std(dim=(0, 2, 3)) == pytest.approx([1.0] * 3, abs=1e-3)


def test_the_mean_pixel_is_rounded():
    assert mean_pixel((0.49, 0.4822, 0.0)) == (125, 123, 0)  # 124.95, 122.96, 0


@pytest.mark.parametrize(
    ("mean", "std"), [((0.5, 0.5), (0.2, 0.2, 0.2)), ((127, 120, 110), STD), (MEAN, (0.2, 0, 0.2))]
)
def test_bad_statistics_are_a_pipeline_error(mean, std):
    with pytest.raises(PipelineError):
        normalizer(mean, std, "cpu")
