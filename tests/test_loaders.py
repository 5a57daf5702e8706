"""The loader factories: either backend's loader is a drop-in for the other's."""

import numpy as np
import torch
from conftest import MEAN, STD, epoch_batches, random_images

from cifar_pipeline.params import AugmentParams, TrainParams
from cifar_pipeline.training.loader import DeviceBatches, DeviceLoader, make_eval_loader, make_train_loader
from cifar_pipeline.training.runtime import make_runtime, pick_device, resolve_backend

CPU = torch.device("cpu")


def test_device_loader_is_a_drop_in_for_the_albumentations_loader():
    images, labels = random_images(33), np.arange(33, dtype=np.int64)
    for batch_size in (8, 16):  # 33 = 2 x 16 + 1: the lone last sample is dropped
        loaders = {
            backend: make_train_loader(
                images,
                labels,
                AugmentParams(backend=backend),
                MEAN,
                STD,
                backend=backend,
                batch_size=batch_size,
                seed=5,
                num_workers=0,
                device=CPU,
            )
            for backend in ("albumentations", "gpu")
        }
        assert isinstance(loaders["albumentations"], DeviceBatches) and isinstance(loaders["gpu"], DeviceLoader)
        assert len(loaders["gpu"]) == len(loaders["albumentations"])
        assert len(loaders["gpu"].dataset) == len(loaders["albumentations"].dataset) == 33
        for epoch in (0, 1):
            gpu, albumentations = epoch_batches(loaders["gpu"], epoch), epoch_batches(loaders["albumentations"], epoch)
            assert torch.equal(gpu[1], albumentations[1])  # the same shuffle, and the same images dropped
            assert gpu[0].shape == albumentations[0].shape and gpu[0].dtype == albumentations[0].dtype


def test_eval_loaders_are_ordered_and_complete_in_both_backends():
    images, labels = random_images(21), np.arange(21, dtype=np.int64)
    for backend in ("albumentations", "gpu"):
        loader = make_eval_loader(
            images, labels, MEAN, STD, backend=backend, batch_size=8, seed=0, num_workers=0, device=CPU
        )
        assert len(loader) == 3
        assert torch.equal(torch.cat([b[1] for b in loader]), torch.arange(21))


def test_auto_backend_is_gpu_on_a_cuda_device_and_albumentations_on_the_cpu(monkeypatch):
    assert resolve_backend("auto", pick_device("cpu")) == "albumentations"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what pick_device asks: a CUDA machine
    cuda = pick_device("auto")
    assert cuda == torch.device("cuda")
    assert resolve_backend("auto", cuda) == "gpu"
    for explicit in ("albumentations", "gpu"):  # both stay selectable on either device
        assert resolve_backend(explicit, cuda) == resolve_backend(explicit, CPU) == explicit


def test_auto_backend_builds_the_albumentations_loaders_on_the_cpu():
    """The runtime resolves `auto` once; the loaders build what it resolved to."""
    images, labels = random_images(20), np.arange(20, dtype=np.int64)
    runtime = make_runtime(TrainParams(device="cpu"), "auto")
    assert runtime.backend == "albumentations"
    options = {"batch_size": 8, "seed": 0, "num_workers": 0, "device": CPU, "backend": runtime.backend}
    train = make_train_loader(images, labels, AugmentParams(backend="auto"), MEAN, STD, **options)
    evaluation = make_eval_loader(images, labels, MEAN, STD, **options)
    assert isinstance(train, DeviceBatches) and isinstance(evaluation, DeviceBatches)
    options["backend"] = make_runtime(TrainParams(device="cpu"), "gpu").backend
    gpu = make_train_loader(images, labels, AugmentParams(backend="gpu"), MEAN, STD, **options)
    assert isinstance(gpu, DeviceLoader)
