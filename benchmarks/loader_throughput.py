"""How many augmented training images per second the loader delivers, for each worker count.

Runs over random uint8 images (the augmentation cost does not depend on the content), with the augment
settings and batch size of params.yaml. Hold the figures against the training speed of the GPU: a loader
slower than the GPU leaves it waiting.

    python benchmarks/loader_throughput.py --workers 0 1 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cifar_pipeline.data import CifarDataset, loader_throughput, make_loader, resolve_num_workers
from cifar_pipeline.params import load_params
from cifar_pipeline.transforms import train_transforms

# CIFAR-10 train statistics; the exact values do not change the cost.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000, help="images in the synthetic train set")
    parser.add_argument("--workers", nargs="+", default=["0", "auto"], help="worker counts to measure, or auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size of params.yaml")
    parser.add_argument("--max-batches", type=int, default=None, help="stop each run early after this many batches")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    batch_size = args.batch_size or params.train.batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images, dtype=np.int64)
    dataset = CifarDataset(images, labels, train_transforms(params.augment, MEAN, STD), seed=params.seed)

    print(f"{args.images} images, batch {batch_size}, torch threads {torch.get_num_threads()}")
    for setting in args.workers:
        workers = resolve_num_workers(setting if setting == "auto" else int(setting))
        loader = make_loader(
            dataset, batch_size, train=True, num_workers=workers, seed=params.seed, pin_memory=torch.cuda.is_available()
        )
        result = loader_throughput(loader, args.max_batches)
        print(
            f"workers={workers:2d} ({setting}): {result['images_per_s']:9.0f} images/s "
            f"({result['images']} images in {result['seconds']:.2f} s)",
            flush=True,
        )
        del loader  # shuts its persistent workers down before the next run starts its own


if __name__ == "__main__":
    main()
