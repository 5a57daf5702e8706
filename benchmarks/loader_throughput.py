"""How many augmented training images per second the Albumentations loader delivers, for each worker count.

Runs over random uint8 images (the augmentation cost does not depend on the content), with the augment
settings, batch size and device of params.yaml, through loaders.make_train_loader: the batches come out normalised
on the device, as the training loop gets them. Hold the figures against the training speed of the GPU: a loader
slower than the GPU leaves it waiting.

Besides the steady rate (wall clock, from the first batch on), it prints the CPU time each image cost, the main
process and the workers together, over the loader's whole life (its workers' start and shutdown included): on a
machine whose cores other jobs share, the CPU time varies much less than the wall time.

    python benchmarks/loader_throughput.py --workers 0 1 2
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cifar_pipeline.params import load_params
from cifar_pipeline.training.loader import make_train_loader, set_epoch
from cifar_pipeline.training.runtime import pick_device, resolve_num_workers

# CIFAR-10 train statistics; the exact values do not change the cost.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def loader_throughput(loader: DataLoader, max_batches: int | None = None) -> dict[str, Any]:
    """Images per second of one pass over `loader` (or its first `max_batches` batches).

    The clock starts when the first batch has arrived, so worker start-up is left out: what remains is the
    steady rate a training loop can be fed at.
    """
    images, start, batches = 0, None, 0
    for batch, _ in loader:
        batches += 1
        if start is None:
            start = time.perf_counter()
        else:
            images += len(batch)
        if max_batches is not None and batches >= max_batches:
            break
    seconds = time.perf_counter() - start if start is not None else 0.0
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0}


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have exited (the loader's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000, help="images in the synthetic train set")
    parser.add_argument("--workers", nargs="+", default=["0", "auto"], help="worker counts to measure, or auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size of params.yaml")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the images per worker count")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    batch_size = args.batch_size or params.train.batch_size
    device = pick_device(params.train.device)
    augment = params.augment.model_copy(update={"backend": "albumentations"})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images, dtype=np.int64)

    print(f"{args.images} images, batch {batch_size}, {device}, torch threads {torch.get_num_threads()}")
    for setting in args.workers:
        workers = resolve_num_workers(setting if setting == "auto" else int(setting))
        gc.collect()
        cpu_start = cpu_seconds()
        loader = make_train_loader(
            images, labels, augment, MEAN, STD, backend="albumentations", batch_size=batch_size, seed=params.seed,
            num_workers=workers, device=device,
        )  # fmt: skip
        rates, seen = [], 0
        for epoch in range(args.epochs):
            set_epoch(loader, epoch)
            result = loader_throughput(loader)  # whole epochs: no batch is prepared and then left unused
            rates.append(result["images_per_s"])
            seen += len(loader.dataset)
        del loader  # shuts its persistent workers down (and waits for them) before the next run starts its own
        gc.collect()
        cpu_us = (cpu_seconds() - cpu_start) / seen * 1e6
        print(
            f"workers={workers:2d} ({setting}): {max(rates):9.0f} images/s (best of {args.epochs} epochs), "
            f"{cpu_us:6.1f} us CPU an image",
            flush=True,
        )


if __name__ == "__main__":
    main()
