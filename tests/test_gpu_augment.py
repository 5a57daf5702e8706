"""The batched (gpu backend) augmentations against the Albumentations ones, and the device loader as a drop-in.

Each statistical test runs the same images through both paths with one transform switched on, and holds the
estimated parameters of each path to the configured ranges and to each other.
"""

import math

import numpy as np
import pytest
import torch
from albumentations.augmentations.geometric import functional as fgeometric
from conftest import MEAN, STD, epoch_batches

from cifar_pipeline.models import build_model
from cifar_pipeline.params import AugmentParams
from cifar_pipeline.training.engine import evaluate, make_optimizer, make_scaler, make_scheduler, train_epoch
from cifar_pipeline.training.loader import (
    CifarDataset,
    DeviceDataset,
    DeviceLoader,
    Draw,
    affine_theta,
    augment_batch,
    make_eval_loader,
    make_train_loader,
    set_epoch,
    train_transforms,
)
from cifar_pipeline.training.runtime import Runtime

NOTHING = AugmentParams(hflip_p=0.0, shift_scale_rotate_p=0.0, coarse_dropout_p=0.0)
SAMPLES = 2000  # per path: frequencies to about +-0.01 (one standard error)
CPU = torch.device("cpu")


def _random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _albumentations(images: np.ndarray, augment: AugmentParams, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) images as the Albumentations backend augments them in epoch 0."""
    labels = np.zeros(len(images), dtype=np.int64)
    dataset = CifarDataset(images, labels, train_transforms(augment, MEAN), seed)
    batch, _ = dataset.__getitems__([(i, 0) for i in range(len(images))])
    return batch.permute(0, 2, 3, 1).numpy()


def _batched(images: np.ndarray, augment: AugmentParams, seed: int = 0) -> np.ndarray:
    """The same through the gpu backend, one batch, before normalisation (whole pixel values, so uint8 is exact)."""
    dataset = DeviceDataset(images, np.zeros(len(images), dtype=np.int64), MEAN, STD, seed, CPU, augment)
    pixels = dataset.pixels(torch.arange(len(images)))
    assert torch.equal(pixels, pixels.round())
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


BOTH = {"albumentations": _albumentations, "gpu": _batched}


def _identity_draw(n: int = 1, **changes) -> Draw:
    no = torch.zeros(n, dtype=torch.bool)
    theta = torch.eye(2, 3).expand(n, 2, 3)
    zero = torch.zeros(n, dtype=torch.int64)
    return Draw(no, no, theta, no, zero, zero)._replace(**changes)


@pytest.mark.parametrize(
    ("tx", "ty", "sx", "sy", "degrees"),
    [
        (3, -2, 1.0, 1.0, 0.0),
        (0, 0, 1.1, 0.9, 0.0),
        (0, 0, 1.0, 1.0, 15.0),
        (-3, 1, 0.9, 1.1, -12.0),
        (2, 3, 1.05, 0.95, 7.3),
    ],
)
def test_warp_matches_the_albumentations_affine_pixel_for_pixel(tx, ty, sx, sy, degrees):
    """Same matrix, interpolation and reflect-101 border: within one grey level (rounding) everywhere."""
    image = _random_images(1)[0]
    affine = train_transforms(AugmentParams(), MEAN).transforms[1]  # as configured, border mode and all
    matrix = fgeometric.create_affine_transformation_matrix(
        {"x": tx, "y": ty}, {"x": 0.0, "y": 0.0}, {"x": sx, "y": sy}, degrees, fgeometric.center((32, 32))
    )
    expected = affine.apply(image, matrix=matrix, output_shape=(32, 32)).astype(np.float32)

    params = [torch.tensor([float(v)]) for v in (tx, ty, sx, sy, degrees)]
    draw = _identity_draw(warp=torch.tensor([True]), theta=affine_theta(*params, 32, 32))
    out = augment_batch(torch.from_numpy(image).permute(2, 0, 1)[None], draw, 16, torch.zeros(3))

    diff = np.abs(out[0].permute(1, 2, 0).numpy() - expected)
    assert diff.max() <= 1.0
    assert diff.mean() < 0.02


@pytest.mark.parametrize("which", ["hflip_p", "shift_scale_rotate_p", "coarse_dropout_p"])
def test_each_transform_fires_at_its_probability_in_both_paths(which):
    images = _random_images(SAMPLES)  # random pixels: any flip, warp or hole changes the image
    augment = NOTHING.model_copy(update={which: 0.3})
    rates = {}
    for name, run in BOTH.items():
        changed = (run(images, augment) != images).any(axis=(1, 2, 3))
        rates[name] = changed.mean()
    for rate in rates.values():
        assert rate == pytest.approx(0.3, abs=0.035)  # 4 standard errors
    assert rates["gpu"] == pytest.approx(rates["albumentations"], abs=0.045)


def test_flip_mirrors_the_whole_image():
    images = _random_images(200)
    out = _batched(images, NOTHING.model_copy(update={"hflip_p": 0.5}))
    flipped = (out == images[:, :, ::-1]).all(axis=(1, 2, 3))
    kept = (out == images).all(axis=(1, 2, 3))
    assert (flipped ^ kept).all()
    assert 0 < flipped.sum() < len(images)


@pytest.mark.parametrize("hole_size", [16, 5])
def test_hole_is_one_exact_square_of_the_mean_pixel_placed_alike(hole_size):
    images = np.full((SAMPLES, 32, 32, 3), 7, dtype=np.uint8)  # no channel's mean pixel is 7
    augment = NOTHING.model_copy(update={"coarse_dropout_p": 1.0, "hole_size": hole_size})
    corners = {}
    for name, run in BOTH.items():
        out = run(images, augment)
        fill = np.array([round(m * 255) for m in MEAN])
        filled = (out == fill).all(axis=-1)
        assert ((out == 7).all(axis=-1) | filled).all()
        assert (filled.sum(axis=(1, 2)) == hole_size * hole_size).all()
        rows, cols = filled.any(axis=2), filled.any(axis=1)
        assert (rows.sum(axis=1) == hole_size).all() and (cols.sum(axis=1) == hole_size).all()  # a square
        corners[name] = np.stack([rows.argmax(axis=1), cols.argmax(axis=1)], axis=1)
    top = 32 - hole_size
    for corner in corners.values():  # uniform over every position that keeps the hole inside
        assert (corner.min(axis=0) == 0).all() and (corner.max(axis=0) == top).all()
        assert corner.mean(axis=0) == pytest.approx([top / 2] * 2, abs=0.5)
        assert corner.std(axis=0) == pytest.approx([math.sqrt(((top + 1) ** 2 - 1) / 12)] * 2, rel=0.1)


def test_hole_normalises_to_the_same_values_as_albumentations():
    """The fill is the rounded mean pixel, so once normalised the hole is close to 0 but not exactly 0."""
    image = np.full((1, 32, 32, 3), 7, dtype=np.uint8)
    options = {"batch_size": 1, "seed": 0, "num_workers": 0, "device": CPU}
    batches = {}
    for backend in ("albumentations", "gpu"):
        augment = NOTHING.model_copy(update={"coarse_dropout_p": 1.0, "backend": backend})
        loader = make_train_loader(image, np.zeros(1, np.int64), augment, MEAN, STD, backend=backend, **options)
        [(batches[backend], _)] = list(loader)
    for channel, (m, s) in enumerate(zip(MEAN, STD, strict=True)):
        expected = torch.tensor([(7 / 255 - m) / s, (round(m * 255) / 255 - m) / s])  # the image, the hole
        values = batches["albumentations"][0, channel].unique()
        torch.testing.assert_close(values.sort().values, expected.sort().values, atol=1e-5, rtol=0)
        assert 0 < values.abs().min() < 0.01
        torch.testing.assert_close(batches["gpu"][0, channel].unique(), values, atol=1e-6, rtol=0)


# Four single bright pixels around the centre (15.5, 15.5), as (row, col); each stays near its own spot under the
# configured warps, far from the others and from the border.
DOTS = np.array([(15, 8), (15, 23), (8, 15), (23, 15)], dtype=np.float64)


def _warp_estimates(out: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: translation (pixels), x and y scale, rotation (degrees), from a least-squares affine fit of the
    dots' intensity-weighted centroids."""
    grey = out.astype(np.float64).mean(axis=-1)
    rows, cols = np.mgrid[:32, :32]
    found = []
    for row, col in DOTS:
        near = (rows - row) ** 2 + (cols - col) ** 2 <= 4.5**2
        weight = grey * near
        total = weight.sum(axis=(1, 2))
        found.append(np.stack([(weight * cols).sum(axis=(1, 2)) / total, (weight * rows).sum(axis=(1, 2)) / total], 1))
    found = np.stack(found, axis=1)  # (N, dots, xy)
    source = np.c_[DOTS[:, ::-1], np.ones(len(DOTS))]  # (dots, x y 1)
    fit = np.linalg.lstsq(source, found.transpose(1, 0, 2).reshape(len(DOTS), -1), rcond=None)[0]
    fit = fit.reshape(3, len(out), 2).transpose(1, 2, 0)  # (N, 2, 3): q = A p + b
    linear, offset = fit[:, :, :2], fit[:, :, 2]
    centre = np.array([15.5, 15.5])
    return {
        "shift": offset - centre + linear @ centre,  # q = A (p - c) + c + t
        "sx": np.linalg.norm(linear[:, :, 0], axis=1),
        "sy": np.linalg.norm(linear[:, :, 1], axis=1),
        "degrees": np.degrees(np.arctan2(-linear[:, 1, 0], linear[:, 0, 0])),  # A = R S, R = [[c, s], [-s, c]]
    }


def _dots(n: int) -> np.ndarray:
    images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    images[:, DOTS[:, 0].astype(int), DOTS[:, 1].astype(int)] = 255
    return images


def _affine_only(**limits) -> AugmentParams:
    settings = {"shift_limit": 0.0, "scale_limit": 0.0, "rotate_limit": 0.0, **limits}
    return NOTHING.model_copy(update={"shift_scale_rotate_p": 1.0, **settings})


def test_shift_is_whole_pixels_distributed_alike():
    augment = _affine_only(shift_limit=0.1)  # +-3.2 pixels, truncated toward 0: -3..3, and 0 twice as likely
    expected = {k: (2.0 if k == 0 else min(abs(k) + 1, 3.2) - abs(k)) / 6.4 for k in range(-3, 4)}
    for run in BOTH.values():
        estimates = _warp_estimates(run(_dots(SAMPLES), augment))
        shift = estimates["shift"]
        assert np.abs(shift - shift.round()).max() < 0.05
        assert estimates["sx"] == pytest.approx(1.0, abs=0.01) and estimates["degrees"] == pytest.approx(0, abs=0.2)
        for axis in range(2):
            counts = {k: np.mean(shift[:, axis].round() == k) for k in range(-3, 4)}
            assert counts == pytest.approx(expected, abs=0.035)


def test_scales_are_independent_and_spread_alike():
    augment = _affine_only(scale_limit=0.1)
    spread = {}
    for name, run in BOTH.items():
        estimates = _warp_estimates(run(_dots(SAMPLES), augment))
        sx, sy = estimates["sx"], estimates["sy"]
        for scale in (sx, sy):
            assert 0.89 < scale.min() < 0.91 and 1.09 < scale.max() < 1.11
            assert scale.mean() == pytest.approx(1.0, abs=0.005)
            assert scale.std() == pytest.approx(0.2 / math.sqrt(12), rel=0.08)
        assert abs(np.corrcoef(sx, sy)[0, 1]) < 0.1  # keep_ratio=False: x and y scale drawn apart
        assert np.abs(estimates["shift"]).max() < 0.1 and np.abs(estimates["degrees"]).max() < 0.3
        spread[name] = sx.std()
    assert spread["gpu"] == pytest.approx(spread["albumentations"], rel=0.1)


def test_rotation_covers_the_range_alike():
    augment = _affine_only(rotate_limit=15.0)
    spread = {}
    for name, run in BOTH.items():
        estimates = _warp_estimates(run(_dots(SAMPLES), augment))
        degrees = estimates["degrees"]
        assert -15.5 < degrees.min() < -14.0 and 14.0 < degrees.max() < 15.5
        assert degrees.mean() == pytest.approx(0.0, abs=0.6)
        assert degrees.std() == pytest.approx(30 / math.sqrt(12), rel=0.08)
        assert estimates["sx"] == pytest.approx(1.0, abs=0.02)
        spread[name] = degrees.std()
    assert spread["gpu"] == pytest.approx(spread["albumentations"], rel=0.1)


def test_normalisation_matches_the_albumentations_eval_loader():
    images = _random_images(20)
    labels = np.arange(20, dtype=np.int64)
    options = {"batch_size": 8, "seed": 0, "num_workers": 0, "device": CPU}
    expected = torch.cat(
        [batch for batch, _ in make_eval_loader(images, labels, MEAN, STD, backend="albumentations", **options)]
    )
    reference = (
        torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(expected, reference.float(), atol=1e-5, rtol=0)
    eval_loader = make_eval_loader(images, labels, MEAN, STD, backend="gpu", **options)
    unaugmented = DeviceLoader(DeviceDataset(images, labels, MEAN, STD, 0, CPU, NOTHING), 8, train=False, seed=0)
    for loader in (eval_loader, unaugmented):
        out = torch.cat([batch for batch, _ in loader])
        assert out.dtype == torch.float32 and out.shape == (20, 3, 32, 32)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)  # one normalisation for both backends


def _loader(n: int = 24, batch_size: int = 8, seed: int = 0, augment: AugmentParams | None = None) -> DeviceLoader:
    images = _random_images(n)
    labels = np.arange(n, dtype=np.int64)  # label = index, so a batch says which images it holds
    dataset = DeviceDataset(images, labels, MEAN, STD, seed, CPU, augment or AugmentParams(shift_scale_rotate_p=1.0))
    return DeviceLoader(dataset, batch_size, train=True, seed=seed)


def test_same_seed_and_epoch_give_identical_batches_and_others_differ():
    first = epoch_batches(_loader(), 3)
    again = epoch_batches(_loader(), 3)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    for other in (epoch_batches(_loader(), 4), epoch_batches(_loader(seed=1), 3)):
        assert not torch.equal(other[1], first[1])  # another shuffle
        order = other[1].argsort()
        assert not torch.equal(other[0][order], first[0][first[1].argsort()])  # other augmentations


def test_a_sample_is_augmented_the_same_whatever_the_batch():
    small, large = epoch_batches(_loader(batch_size=5), 2), epoch_batches(_loader(batch_size=24), 2)
    torch.testing.assert_close(small[0][small[1].argsort()], large[0][large[1].argsort()], rtol=0, atol=0)
    dataset = _loader().dataset
    image = dataset[(7, 2)][0]  # an item: the augmented uint8 image
    assert image.dtype == torch.uint8
    torch.testing.assert_close(dataset.normalize(image[None])[0], small[0][small[1] == 7][0], rtol=0, atol=0)


def test_engine_trains_and_evaluates_from_the_device_loader():
    torch.manual_seed(0)
    images, labels = _random_images(32), np.arange(32, dtype=np.int64) % 10
    loader = DeviceLoader(DeviceDataset(images, labels, MEAN, STD, 0, CPU, AugmentParams()), 16, train=True, seed=0)
    model = build_model("dilated_net")
    runtime = Runtime(CPU)
    optimizer = make_optimizer(model, 1e-3, 1e-4, runtime)
    scheduler = make_scheduler(optimizer, 1e-2, 2, len(loader), 1, 10.0)
    set_epoch(loader, 0)
    stats = train_epoch(model, loader, optimizer, scheduler, make_scaler(runtime), runtime)
    assert stats.images == 32 and len(stats.lrs) == 2 and math.isfinite(stats.loss)
    eval_loader = DeviceLoader(DeviceDataset(_random_images(10), np.arange(10) % 10, MEAN, STD, 0, CPU), 4, False, 0)
    loss, acc = evaluate(model, eval_loader, runtime)
    assert math.isfinite(loss) and 0.0 <= acc <= 100.0
