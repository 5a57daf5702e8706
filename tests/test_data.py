"""Loaders: uint8 batches; per-sample augmentation fixed by (seed, epoch, index), whatever the worker count and
the batch; every image used."""

import collections
import itertools
import os

import albumentations as A
import numpy as np
import pytest
import torch
from conftest import MEAN, epoch_batches, load_benchmark, random_images
from matplotlib.figure import Figure

from cifar_pipeline.data.dataset import image_grid
from cifar_pipeline.params import AugmentParams
from cifar_pipeline.stage import PipelineError
from cifar_pipeline.training.loader import CifarDataset, make_loader, save_train_samples, train_transforms
from cifar_pipeline.training.runtime import resolve_num_workers

# Affine always on: its continuous parameters make two different random draws visibly different images.
ALWAYS = AugmentParams(shift_scale_rotate_p=1.0)


def _train_set(images: np.ndarray, seed: int = 0, augment: AugmentParams = ALWAYS) -> CifarDataset:
    labels = np.arange(len(images), dtype=np.int64)  # label = index, so batches show which image is which
    return CifarDataset(images, labels, train_transforms(augment, MEAN), seed=seed)


def _all_different(images: torch.Tensor) -> bool:
    return all(not torch.equal(a, b) for a, b in itertools.combinations(images, 2))


def test_items_and_batches_are_uint8_chw_tensors_and_int64_labels():
    image, label = _train_set(random_images(4))[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label.dtype == torch.int64 and label.item() == 2
    loader = make_loader(_train_set(random_images(10)), 4, train=False, num_workers=1, seed=0, pin_memory=False)
    images, labels = next(iter(loader))  # from a worker process: a quarter of the bytes of float32
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3]


def test_a_batch_augments_each_image_as_it_would_alone():
    """The batch's seeds are drawn at once, yet each image's augmentation depends on its own (epoch, index) only."""
    dataset = _train_set(random_images(12), augment=AugmentParams())
    keys = [(9, 3), (2, 3), (5, 3), (11, 3)]
    images, labels = dataset.__getitems__(keys)
    assert labels.tolist() == [9, 2, 5, 11]
    for image, key in zip(images, keys, strict=True):
        assert torch.equal(image, dataset[key][0])
    assert not torch.equal(dataset[(9, 4)][0], dataset[(9, 3)][0])  # another epoch, another augmentation


def test_identical_images_get_different_augmentations_across_workers():
    """The same picture at every index: each copy still draws its own augmentation, in either worker."""
    images = np.repeat(random_images(1), 16, axis=0)
    loader = make_loader(_train_set(images), 4, train=True, num_workers=2, seed=0, pin_memory=False)
    augmented, labels = epoch_batches(loader, 0)
    assert sorted(labels.tolist()) == list(range(16))
    assert _all_different(augmented)


def test_worker_count_does_not_change_any_epoch():
    dataset = _train_set(random_images(24), augment=AugmentParams())  # the default recipe, flips and holes included
    serial = make_loader(dataset, 5, train=True, num_workers=0, seed=7, pin_memory=False)
    parallel = make_loader(dataset, 5, train=True, num_workers=2, seed=7, pin_memory=False)
    # Two epochs: with persistent workers the second one must still see the new epoch.
    for epoch in (0, 1):
        images, labels = epoch_batches(serial, epoch)
        parallel_images, parallel_labels = epoch_batches(parallel, epoch)
        assert torch.equal(parallel_labels, labels)
        assert images.dtype == torch.uint8 and torch.equal(parallel_images, images)


def test_transforms_in_a_pipeline_draw_independently():
    """One random stream per sample, not one per transform: two p=0.5 flips must not always agree."""
    image = random_images(1)[0]
    flips = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    dataset = CifarDataset(np.repeat(image[None], 64, axis=0), np.zeros(64, np.int64), flips, seed=0)
    outcomes = collections.Counter()
    for i in range(64):
        out = dataset[i][0].permute(1, 2, 0).numpy()
        horizontal = np.array_equal(out, image[:, ::-1]) or np.array_equal(out, image[::-1, ::-1])
        vertical = np.array_equal(out, image[::-1]) or np.array_equal(out, image[::-1, ::-1])
        outcomes[horizontal, vertical] += 1
    assert len(outcomes) == 4, outcomes  # all four combinations occur


def test_same_seed_gives_the_same_first_batch():
    images = random_images(32)
    first = [next(iter(make_loader(_train_set(images), 8, True, 0, seed=3, pin_memory=False))) for _ in range(2)]
    assert torch.equal(first[0][1], first[1][1])
    assert torch.equal(first[0][0], first[1][0])


def test_epochs_and_seeds_change_order_and_augmentation():
    images = random_images(32)
    loader = make_loader(_train_set(images, seed=1), 8, train=True, num_workers=0, seed=1, pin_memory=False)
    other_seed = make_loader(_train_set(images, seed=2), 8, train=True, num_workers=0, seed=2, pin_memory=False)
    runs = {
        "epoch 0": epoch_batches(loader, 0),
        "epoch 1": epoch_batches(loader, 1),
        "seed 2": epoch_batches(other_seed, 0),
    }

    for (name_a, (images_a, labels_a)), (name_b, (images_b, labels_b)) in itertools.combinations(runs.items(), 2):
        assert not torch.equal(labels_a, labels_b), (name_a, name_b)  # shuffle order differs
        # the same image index is augmented differently
        a, b = images_a[labels_a.argsort()], images_b[labels_b.argsort()]
        assert all(not torch.equal(x, y) for x, y in zip(a, b, strict=True)), (name_a, name_b)
    # and going back to an epoch reproduces it
    assert all(torch.equal(x, y) for x, y in zip(epoch_batches(loader, 0), runs["epoch 0"], strict=True))


def test_every_image_is_used_once_per_epoch():
    loader = make_loader(_train_set(random_images(30)), 8, train=True, num_workers=0, seed=0, pin_memory=False)
    for epoch in range(3):
        _, labels = epoch_batches(loader, epoch)
        assert sorted(labels.tolist()) == list(range(30))


def test_a_lone_last_training_sample_is_dropped_but_never_a_test_sample():
    dataset = _train_set(random_images(17))
    train = make_loader(dataset, 8, train=True, num_workers=0, seed=0, pin_memory=False)
    test = make_loader(dataset, 8, train=False, num_workers=0, seed=0, pin_memory=False)
    assert [len(labels) for _, labels in train] == [8, 8]
    assert [len(labels) for _, labels in test] == [8, 8, 1]
    two_left = make_loader(_train_set(random_images(18)), 8, train=True, num_workers=0, seed=0, pin_memory=False)
    assert [len(labels) for _, labels in two_left] == [8, 8, 2]


def test_test_loader_is_ordered_and_unaugmented():
    images = random_images(20)
    dataset = CifarDataset(images, np.arange(20, dtype=np.int64), None, seed=0)
    loader = make_loader(dataset, 6, train=False, num_workers=2, seed=0, pin_memory=False)
    for epoch in (0, 1):
        batches, labels = epoch_batches(loader, epoch)
        assert labels.tolist() == list(range(20))
        assert torch.equal(batches, torch.from_numpy(images).permute(0, 3, 1, 2))  # the pixels as they are


def test_bad_arrays_are_a_pipeline_error():
    transform = train_transforms(AugmentParams(), MEAN)
    with pytest.raises(PipelineError, match="uint8"):
        CifarDataset(random_images(4).astype(np.float32), np.zeros(4, np.int64), transform, seed=0)
    with pytest.raises(PipelineError, match="labels"):
        CifarDataset(random_images(4), np.zeros(3, np.int64), transform, seed=0)


@pytest.mark.parametrize(("cpus", "expected"), [(1, 0), (2, 1), (3, 2), (64, 8)])
def test_auto_workers_leave_one_cpu_to_training(monkeypatch, cpus, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert resolve_num_workers("auto") == expected


def test_explicit_workers_are_kept_and_nonsense_refused():
    assert resolve_num_workers(0) == 0
    assert resolve_num_workers(3) == 3
    for bad in (-1, "four", 1.5):
        with pytest.raises(PipelineError, match="num_workers"):
            resolve_num_workers(bad)


def test_loader_throughput_counts_images_after_the_first_batch():
    loader = make_loader(_train_set(random_images(20)), 4, train=True, num_workers=0, seed=0, pin_memory=False)
    loader_throughput = load_benchmark("loader_throughput").loader_throughput
    full = loader_throughput(loader)
    assert full["images"] == 16 and full["seconds"] > 0
    assert full["images_per_s"] == pytest.approx(full["images"] / full["seconds"])
    assert loader_throughput(loader, max_batches=3)["images"] == 8


def test_train_samples_figure_is_written(tmp_path):
    path = tmp_path / "reports" / "train_samples.png"
    classes = [f"class {i}" for i in range(10)]
    save_train_samples(_train_set(random_images(10)), classes, path, n=6)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["train_samples.png"]


def test_image_grid_has_one_titled_axis_per_image():
    fig = image_grid(random_images(5), [f"t{i}" for i in range(5)], ncols=3, title="grid")
    assert isinstance(fig, Figure)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == [f"t{i}" for i in range(5)]
    assert len(fig.axes) == 6 and all(not ax.axison for ax in fig.axes)
