"""Throughput of this pipeline against a plain baseline, in one process on whatever device is present.

    python benchmarks/bench.py                                   # params.yaml's model and batch size
    python benchmarks/bench.py --model dilated_net --batches 3 --batch-size 64   # a quick check (CPU: < 1 min)
    python benchmarks/bench.py --variants --repeats 3            # also fp32/bf16 x NCHW/channels_last (+ --compile)

Prints a table and writes it as JSON (--out). Figures are images per second on random uint8 images (the cost does
not depend on the content), with the same model, batch size and device, the best of --repeats timed runs:

  train   an epoch of --batches batches, loader included (its start too, as in a real epoch), after a warm-up one.
          baseline: the usual notebook set-up: fp32, NCHW, no compile, DataLoader(shuffle, 2 workers) over the
          Albumentations pipeline with Normalize and ToTensorV2 at its end (float32 from the workers), plain Adam +
          One Cycle, loss.item() and accuracy .item() every step.
          ours: engine.train_epoch with engine.make_runtime(train params), and the loader of each augment backend.
          The headline is ours (the backend the params' augment.backend picks on this device) / baseline.
  step    the train step alone, on one batch already on the device: the model's cost without any loader.
  loader  the loaders alone: Albumentations at our worker count and at 2, and the device loader (gpu backend).
  eval    evaluation: the notebook's (2 workers, .item() per batch) and engine.evaluate with each backend.
  stage   each `dvc repro` stage's wall time, from the wall_time_s of its outputs beside the params file.
  ceiling the most images/s the device could train at: its measured dense peak (fp32, and bf16 where it has bf16
          hardware; the faster of a large matmul and a large channels_last 3x3 conv, since on some CPUs the conv
          library beats the BLAS) over the model's conv and matmul FLOPs for one train image (forward and backward,
          grouped convs counted per group). A step row near its ceiling has nothing left to gain in that precision.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from cifar_pipeline.models import build_model
from cifar_pipeline.params import Params, load_params
from cifar_pipeline.report.report import STAGE_TIMES
from cifar_pipeline.stage import write_json
from cifar_pipeline.training.engine import (
    evaluate,
    make_optimizer,
    make_scaler,
    make_scheduler,
    new_model,
    train_epoch,
    train_step,
)
from cifar_pipeline.training.loader import make_eval_loader, make_train_loader, set_epoch, train_transforms
from cifar_pipeline.training.runtime import (
    Runtime,
    cpu_has_native_bf16,
    make_runtime,
    resolve_backend,
    resolve_num_workers,
)

# CIFAR-10 train statistics; the exact values do not change the cost.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
LR = 1e-3  # nor does the learning rate
BASELINE = "baseline (notebook, workers=2)"


@dataclass(frozen=True)
class Setup:
    params: Params
    runtime: Runtime  # ours, from the params
    images: np.ndarray
    labels: np.ndarray
    batches: int
    repeats: int
    workers: int  # our Albumentations loader's

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def batch_size(self) -> int:
        return self.params.train.batch_size


def best_time(setup: Setup, run: Callable[..., Any], *args: Any) -> float:
    """The fewest seconds run(*args) takes, to the end of its work on the device, over setup.repeats runs."""
    times = []
    for _ in range(setup.repeats):
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        start = time.perf_counter()
        run(*args)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        times.append(time.perf_counter() - start)
    return min(times)


def row(kind: str, name: str, images: int, seconds: float, note: str = "") -> dict[str, Any]:
    rate = images / seconds if seconds > 0 else 0.0
    return {
        "kind": kind,
        "name": name,
        "images": images,
        "seconds": round(seconds, 5),
        "images_per_s": round(rate, 1),
        "note": note,
    }


def describe(runtime: Runtime, compiled: bool = False) -> str:
    dtype = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[runtime.amp_dtype]
    return f"{dtype} {'channels_last' if runtime.channels_last else 'NCHW'}" + (" compiled" if compiled else "")


def one_cycle(optimizer: torch.optim.Optimizer, setup: Setup) -> torch.optim.lr_scheduler.OneCycleLR:
    epochs = 1 + setup.repeats  # the warm-up and the timed epochs
    return make_scheduler(optimizer, LR, epochs, setup.batches, peak_epoch=1, div_factor=10.0)


# --- the baseline: a training loop as most notebooks write it --------------------------------------------------------


class NotebookDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(image=self.images[i])["image"], self.labels[i]


def notebook_transforms(augment: list[A.BasicTransform]) -> A.Compose:
    """A notebook's pipeline: normalised (Albumentations' Normalize) float32 tensors out of the workers."""
    return A.Compose([*augment, A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0), ToTensorV2()])


def notebook_loader(dataset: Dataset, batch_size: int, shuffle: bool, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size, shuffle=shuffle, num_workers=2, pin_memory=device.type == "cuda")


def notebook_epoch(model, loader, optimizer, scheduler, device) -> float:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        logits = model(images)
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return correct / seen


@torch.no_grad()
def notebook_eval(model, loader, device) -> float:
    model.eval()
    correct, seen = 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        correct += (model(images).argmax(1) == labels).sum().item()
        seen += len(labels)
    return correct / seen


def notebook_steps(steps: int, model, images, labels, optimizer) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        loss.item()


def notebook_model(setup: Setup) -> nn.Module:
    torch.manual_seed(setup.params.seed)
    return build_model(setup.params.model.name, **setup.params.model.kwargs(10)).to(setup.device)


# --- the measurements ------------------------------------------------------------------------------------------------


def train_baseline(setup: Setup) -> dict[str, Any]:
    model = notebook_model(setup)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=setup.params.train.weight_decay)
    scheduler = one_cycle(optimizer, setup)
    compose = notebook_transforms(train_transforms(setup.params.augment, MEAN).transforms)
    loader = notebook_loader(NotebookDataset(setup.images, setup.labels, compose), setup.batch_size, True, setup.device)
    notebook_epoch(model, loader, optimizer, scheduler, setup.device)  # warm-up: first kernels, allocator
    seconds = best_time(setup, notebook_epoch, model, loader, optimizer, scheduler, setup.device)
    return row("train", BASELINE, len(setup.images), seconds, "fp32 NCHW, .item() per step")


def train_ours(setup: Setup, backend: str, runtime: Runtime, compiled: bool = False) -> dict[str, Any]:
    params = setup.params
    model = new_model(params.model, params.seed, runtime, 10)
    optimizer = make_optimizer(model, LR, params.train.weight_decay, runtime)
    scheduler, scaler = one_cycle(optimizer, setup), make_scaler(runtime)
    step_model = torch.compile(model) if compiled else model
    workers = setup.workers if backend == "albumentations" else 0
    loader = make_train_loader(
        setup.images,
        setup.labels,
        params.augment.model_copy(update={"backend": backend}),
        MEAN,
        STD,
        backend=backend,
        batch_size=setup.batch_size,
        seed=params.seed,
        num_workers=workers,
        device=runtime.device,
    )

    def epoch(number: int) -> None:
        set_epoch(loader, number)
        train_epoch(step_model, loader, optimizer, scheduler, scaler, runtime, desc="bench")

    epoch(0)  # warm-up: worker start, first kernels, cudnn.benchmark's search, compilation
    seconds = best_time(setup, epoch, 1)
    name = f"ours, {backend} backend" + (f", workers={workers}" if workers else "")
    return row("train", name, len(setup.images), seconds, describe(runtime, compiled))


def our_steps(steps: int, *args: Any) -> None:
    for _ in range(steps):
        train_step(*args)


def step_rows(setup: Setup, runtimes: list[tuple[Runtime, bool]]) -> list[dict[str, Any]]:
    """The train step alone on one batch resident on the device: the baseline's, then ours in each runtime."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(setup.batch_size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (setup.batch_size,), generator=generator)
    size = setup.batch_size * setup.batches

    model = notebook_model(setup)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = images.to(setup.device), labels.to(setup.device)
    notebook_steps(1, model, x, y, optimizer)
    seconds = best_time(setup, notebook_steps, setup.batches, model, x, y, optimizer)
    rows = [row("step", "baseline step", size, seconds, "fp32 NCHW, .item() per step")]

    for runtime, compiled in runtimes:
        model = new_model(setup.params.model, setup.params.seed, runtime, 10)
        step_model = torch.compile(model) if compiled else model
        optimizer = make_optimizer(model, LR, 0.0, runtime)
        scaler, loss_fn = make_scaler(runtime), nn.CrossEntropyLoss()
        x, y = runtime.to_device(images, labels)
        step = (step_model, x, y, optimizer, loss_fn, scaler, runtime)
        our_steps(1, *step)
        seconds = best_time(setup, our_steps, setup.batches, *step)
        rows.append(row("step", "ours step (engine.train_step)", size, seconds, describe(runtime, compiled)))
    return rows


def loader_rows(setup: Setup) -> list[dict[str, Any]]:
    """Each loader alone: a warm-up epoch (starts the workers, draws the parameters), then timed ones."""
    rows = []
    for backend, workers in [("albumentations", n) for n in dict.fromkeys([setup.workers, 2])] + [("gpu", 0)]:
        loader = make_train_loader(
            setup.images,
            setup.labels,
            setup.params.augment.model_copy(update={"backend": backend}),
            MEAN,
            STD,
            backend=backend,
            batch_size=setup.batch_size,
            seed=setup.params.seed,
            num_workers=workers,
            device=setup.device,
        )
        list(loader)
        set_epoch(loader, 1)
        seconds = best_time(setup, list, loader)
        name = f"albumentations, workers={workers}" if backend == "albumentations" else "device loader (gpu backend)"
        rows.append(row("loader", name, len(setup.images), seconds, "" if workers else "augment + normalise on device"))
        del loader  # stops its persistent workers before the next starts its own
    return rows


def eval_rows(setup: Setup) -> list[dict[str, Any]]:
    model = notebook_model(setup)
    dataset = NotebookDataset(setup.images, setup.labels, notebook_transforms([]))
    loader = notebook_loader(dataset, setup.batch_size, False, setup.device)
    notebook_eval(model, loader, setup.device)
    seconds = best_time(setup, notebook_eval, model, loader, setup.device)
    rows = [row("eval", BASELINE, len(setup.images), seconds, "fp32 NCHW, .item() per batch")]
    model = new_model(setup.params.model, setup.params.seed, setup.runtime, 10)
    for backend in ("albumentations", "gpu"):
        loader = make_eval_loader(
            setup.images,
            setup.labels,
            MEAN,
            STD,
            backend=backend,
            batch_size=setup.batch_size,
            seed=setup.params.seed,
            num_workers=setup.workers,
            device=setup.device,
        )
        evaluate(model, loader, setup.runtime)
        seconds = best_time(setup, evaluate, model, loader, setup.runtime)
        rows.append(row("eval", f"ours, {backend} backend", len(setup.images), seconds, describe(setup.runtime)))
    return rows


def conv_backward_flop(grad_out_shape, x_shape, w_shape, *args, **kwargs) -> int:
    """FLOPs of a conv's backward: each gradient asked for (input, weight) costs what the forward costs.

    torch's own formula (torch 2.14) counts the weight gradient of a grouped conv as if it were dense, `groups` times
    too many: a depthwise conv's backward came out 65x its forward, and dilated_net's train image 0.226 GFLOP
    instead of 0.189. The forward formula reads the groups from the weight's shape, so it is right for any groups."""
    transposed, output_mask = args[4], args[7]
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def train_gflop_per_image(model: nn.Module, batch: int = 8) -> float:
    """Conv and matmul GFLOPs of one train image: forward, and backward as autograd runs it (no input gradient)."""
    images, labels = torch.zeros(batch, 3, 32, 32), torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}) as c:
        nn.functional.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return c.get_total_flops() / batch / 1e9


def dense_gflop_per_s(setup: Setup, dtype: torch.dtype, size: int = 4096, repeats: int = 3) -> float:
    """The device's dense rate in `dtype`: the faster of a size x size matmul (BLAS: MKL, cuBLAS) and a 3x3 conv of
    256 channels at 16x16, channels_last (oneDNN, cuDNN), each the best of `repeats`. Both are needed: on a Zen 4
    CPU MKL's sgemm reached 186 GFLOP/s where oneDNN's convs reached 246, so a matmul peak alone let a measured step
    pass its "ceiling". At least 3 runs each, so that a moment of load on a shared machine does not lower it."""
    timed = dataclasses.replace(setup, repeats=max(setup.repeats, repeats))
    a = torch.randn(size, size, device=setup.device).to(dtype)
    b = torch.randn(size, size, device=setup.device).to(dtype)
    a @ b
    matmul = 2 * size**3 / best_time(timed, torch.matmul, a, b)
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).to(setup.device, dtype, memory_format=torch.channels_last)
    x = torch.randn(64, 256, 16, 16, device=setup.device).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv(x)
        convolution = 2 * 64 * 256 * 256 * 9 * 16 * 16 / best_time(timed, conv, x)
    return max(matmul, convolution) / 1e9


def ceiling_rows(setup: Setup) -> list[dict[str, Any]]:
    """One row per precision the device has hardware for. On CUDA, cuDNN runs fp32 convs as TF32 by default, so a
    fp32 step may pass the fp32 (true fp32 matmul) ceiling there."""
    model = build_model(setup.params.model.name, **setup.params.model.kwargs(10))
    gflop = train_gflop_per_image(model)
    if setup.device.type == "cuda":
        has_bf16 = torch.cuda.is_bf16_supported()
    else:
        has_bf16 = setup.device.type == "cpu" and cpu_has_native_bf16()
    rows = []
    for name, dtype in [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if has_bf16 else []):
        peak = dense_gflop_per_s(setup, dtype)
        seconds = setup.batch_size * gflop / peak
        note = f"{peak:,.0f} GFLOP/s dense peak, {gflop:.3f} GFLOP a train image"
        ceiling = row("ceiling", f"{name} dense peak / model FLOPs", setup.batch_size, seconds, note)
        rows.append({**ceiling, "gflop_per_image": round(gflop, 4), "peak_gflop_per_s": round(peak, 1)})
    return rows


def stage_rows(project: Path) -> list[dict[str, Any]]:
    rows = []
    for stage, path in STAGE_TIMES.items():
        path = project / path
        seconds = json.loads(path.read_text()).get("wall_time_s") if path.is_file() else None
        rows.append({"kind": "stage", "name": stage, "seconds": seconds, "note": "" if seconds else f"no {path}"})
    return rows


def variants(ours: Runtime, compiled: bool) -> list[tuple[Runtime, bool]]:
    """The step's precision and memory format other than ours: fp32 and bf16 autocast, NCHW and channels_last;
    with `compiled`, each of them (ours too) compiled."""
    runtimes = [Runtime(ours.device, dtype, cl) for dtype in (None, torch.bfloat16) for cl in (False, True)]
    return [(r, False) for r in runtimes if r != ours] + ([(r, True) for r in runtimes] if compiled else [])


def ratios(rows: list[dict[str, Any]], backend: str) -> dict[str, float]:
    """Each of our train rows' images/s over the baseline's; the headline (the params' backend) first."""
    train = [r for r in rows if r["kind"] == "train"]
    baseline = [r["images_per_s"] for r in train if r["name"] == BASELINE]
    if not baseline:
        return {}
    ours = sorted(
        (r for r in train if r["name"] != BASELINE), key=lambda r: not r["name"].startswith(f"ours, {backend}")
    )
    return {f"{r['name']} [{r['note']}]": round(r["images_per_s"] / baseline[0], 3) for r in ours}


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n{result['device']}, torch {result['torch']}, {result['threads']} threads, {result['model']}, "
        f"batch {result['batch_size']}, {result['batches']} batches, best of {result['repeats']}, "
        f"load average {result['load_average'][0]} before and {result['load_average'][1]} after"
    )
    print(f"{'kind':7} {'name':40} {'images/s':>10} {'seconds':>9}  note")
    for r in result["rows"]:
        rate = f"{r['images_per_s']:10.1f}" if "images_per_s" in r else " " * 10
        seconds = f"{r['seconds']:9.2f}" if r["seconds"] is not None else f"{'n/a':>9}"
        print(f"{r['kind']:7} {r['name']:40} {rate} {seconds}  {r['note']}")
    for name, ratio in result["ratios"].items():
        print(f"train, {name}: {ratio:.2f}x the baseline")


def random_split(images: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, images, dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default=None, help="default: model.name of the params file")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size of the params file")
    parser.add_argument("--batches", type=int, default=10, help="batches per timed epoch (and per warm-up epoch)")
    parser.add_argument("--loader-batches", type=int, default=20, help="batches per timed loader epoch")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each row; the fastest counts")
    parser.add_argument("--workers", default=None, help="our loader's workers; default: data.num_workers")
    parser.add_argument("--variants", action="store_true", help="also train fp32/bf16 x NCHW/channels_last")
    parser.add_argument("--compile", action="store_true", help="with --variants: each variant compiled too")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["train", "step", "loader", "eval", "stage", "ceiling"]
    )
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()

    params = load_params(args.params)
    params = params.model_copy(
        update={
            "model": params.model.model_copy(update={"name": args.model or params.model.name}),
            "train": params.train.model_copy(update={"batch_size": args.batch_size or params.train.batch_size}),
        }
    )
    setting = args.workers or params.data.num_workers
    workers = resolve_num_workers(setting if setting == "auto" else int(setting))
    runtime = make_runtime(params.train)
    images, labels = random_split(params.train.batch_size * args.batches)
    setup = Setup(params, runtime, images, labels, args.batches, args.repeats, workers)

    load_before = round(os.getloadavg()[0], 2)
    rows: list[dict[str, Any]] = []

    def measured(*new: dict[str, Any]) -> None:
        for r in new:
            print(f"{r['kind']:7} {r['name']:40} {r.get('images_per_s', '')!s:>10}  {r['note']}", flush=True)
        rows.extend(new)

    others = variants(runtime, args.compile) if args.variants else []
    if "train" not in args.skip:
        measured(train_baseline(setup))
        measured(train_ours(setup, "albumentations", runtime))
        measured(train_ours(setup, "gpu", runtime))
        for variant, compiled in others:
            measured(train_ours(setup, "gpu", variant, compiled))
    if "step" not in args.skip:
        measured(*step_rows(setup, [(runtime, False), *others]))
    if "loader" not in args.skip:
        loader_images, loader_labels = random_split(params.train.batch_size * args.loader_batches)
        measured(*loader_rows(Setup(params, runtime, loader_images, loader_labels, 0, args.repeats, workers)))
    if "eval" not in args.skip:
        measured(*eval_rows(setup))
    if "ceiling" not in args.skip:
        measured(*ceiling_rows(setup))
    if "stage" not in args.skip:
        measured(*stage_rows(Path(args.params).resolve().parent))

    device = runtime.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": params.model.name,
        "batch_size": params.train.batch_size,
        "batches": args.batches,
        "repeats": args.repeats,
        "workers": workers,
        # Other work on the machine skews CPU figures: the 1-minute load average says how busy it was.
        "load_average": [load_before, round(os.getloadavg()[0], 2)],
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
        "ratios": ratios(rows, resolve_backend(params.augment.backend, runtime.device)),
    }
    print_table(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
