"""The training recipe shared by the lr-find and train stages: a new model, Adam, the One Cycle schedule, the train
step, one epoch, and evaluation. Where and how it runs (device, precision) is training/runtime.py's.

The epoch loop does not sync the host with the device per step: losses and correct counts accumulate on the device
and are read once per epoch (and every few steps by the progress bar, on a terminal only), which keeps a GPU busy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cifar_pipeline.models import build_model
from cifar_pipeline.params import ModelParams
from cifar_pipeline.stage import PipelineError
from cifar_pipeline.training.runtime import Runtime


def prepare_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    memory_format = torch.channels_last if runtime.channels_last else torch.preserve_format
    return model.to(runtime.device, memory_format=memory_format)


def new_model(model: ModelParams, seed: int, runtime: Runtime, num_classes: int) -> nn.Module:
    """A freshly initialised model on the runtime's device: lr-find and train start from the same weights."""
    torch.manual_seed(seed)
    return prepare_model(build_model(model.name, **model.kwargs(num_classes)), runtime)


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile for the train step (`train.compile`), with static shapes: the loader's full_batches keeps them
    static.

    The compiled module shares the model's parameters; evaluation runs the model itself, eagerly: its last batch has
    another shape, and eval-mode batch norm would be another graph to compile.
    """
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, runtime: Runtime) -> torch.optim.Adam:
    # The fused kernel updates all parameters at once instead of several kernels per tensor: on CUDA fewer launches,
    # on the CPU 5 ms instead of 30 ms a step for custom_resnet (benchmarks/RESULTS.md).
    fused = True if runtime.device.type in ("cuda", "cpu") else None
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    max_lr: float,
    epochs: int,
    steps_per_epoch: int,
    peak_epoch: int,
    div_factor: float,
) -> torch.optim.lr_scheduler.OneCycleLR:
    """One Cycle, stepped per batch: linear from max_lr/div_factor up to max_lr at the end of epoch `peak_epoch`,
    then linear back down to the same starting LR at the last step (final_div_factor=1: no annihilation phase).

    Adam's beta1 cycles inversely between 0.95 and 0.85 (PyTorch's default, as in Smith's One Cycle policy).
    """
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=max_lr,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=peak_epoch / epochs,
        anneal_strategy="linear",
        three_phase=False,
        div_factor=div_factor,
        final_div_factor=1.0,
    )


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of `model`'s weights and batch-norm statistics (`train.ema`), updated after
    every optimizer step by `train_epoch`: ema = decay * ema + (1 - decay) * weights, starting from the weights of
    the first update. PyTorch's own AveragedModel; its state_dict holds the average as `module.*`."""
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True
    )


def make_scaler(runtime: Runtime) -> torch.amp.GradScaler:
    """Loss scaling for fp16, which would underflow small gradients; bf16 and fp32 do not need it (a no-op then)."""
    return torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)


def loader_batches(loader: DataLoader) -> Iterator:
    """Iterate `loader` without touching the global torch RNG.

    Starting a loader iterator draws a seed from the global RNG: every epoch, or only on the first with persistent
    workers. Dropout draws from the same RNG, so that draw would make a resumed run's dropout masks differ from an
    uninterrupted run's. Our datasets seed their augmentations themselves and do not need it.
    """
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update; returns the batch's (mean loss, logits), detached and still on the device."""
    with runtime.autocast():
        logits = model(images)
        loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


@dataclass
class EpochStats:
    loss: float  # mean over the epoch's images
    acc: float  # percent
    images: int
    seconds: float
    lrs: list[float] = field(default_factory=list)  # the LR of every step, in order

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.OneCycleLR,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    desc: str = "train",
    *,
    label_smoothing: float = 0.0,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> EpochStats:
    """One pass over `loader`, stepping the scheduler after every batch, and `ema` (make_ema) after every step.

    A loss that turns nan or inf stops the run with the step and LR where it happened (the check is once per
    epoch, on the per-step losses kept on the device).

    On several processes each trains on its share of every batch (runtime.criterion); the returned loss and accuracy
    are the global batches', the same on every process (runtime.epoch_totals).
    """
    model.train()
    criterion = runtime.criterion(loader, label_smoothing)
    step_losses = torch.zeros(len(loader), device=runtime.device)
    correct = torch.zeros((), dtype=torch.int64, device=runtime.device)
    sizes: list[int] = []
    lrs: list[float] = []
    start = time.perf_counter()
    quiet = None if runtime.main else True  # None: a bar on a terminal only; one process draws it
    bar = tqdm(loader_batches(loader), total=len(loader), desc=desc, unit="batch", leave=False, disable=quiet)
    postfix_every = max(1, len(loader) // 20)  # the postfix reads values back from the device: not every step
    for step, (images, labels) in enumerate(bar):
        images, labels = runtime.to_device(images, labels)
        lrs.append(optimizer.param_groups[0]["lr"])
        loss, logits = train_step(model, images, labels, optimizer, partial(criterion, step), scaler, runtime)
        if ema is not None:
            ema.update_parameters(model)
        # The last scheduler step would lie past the schedule's end (and divides by zero when the peak is the last
        # epoch): the LR after the final batch is never used.
        if scheduler.last_epoch + 1 < scheduler.total_steps:
            scheduler.step()
        step_losses[step] = loss
        correct += (logits.argmax(dim=1) == labels).sum()
        sizes.append(len(labels))
        if not bar.disable and step % postfix_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct.item() / sum(sizes):.1f}%")
    bar.close()

    step_losses, correct, sizes = runtime.epoch_totals(loader, step_losses[: len(sizes)], correct, sizes)
    step_losses = step_losses.cpu()
    bad = (~torch.isfinite(step_losses)).nonzero()
    if len(bad):
        runtime.barrier()  # every process stops here alike: none leaves while another still reads from it
        step = int(bad[0])
        raise PipelineError(
            f"the training loss became {step_losses[step].item()} in {desc}, step {step + 1} of {len(sizes)}, "
            f"at learning rate {lrs[step]:.4g}: training diverged. Set a lower train.max_lr in params.yaml (or "
            "train.max_lr: auto to use the lr-find suggestion). Already at the first steps? Then check the inputs "
            "(data/stats.json) for nan or inf"
        )
    images = sum(sizes)
    loss_sum = float((step_losses.double() * torch.tensor(sizes, dtype=torch.float64)).sum())
    acc = 100.0 * correct.item() / images
    return EpochStats(loss_sum / images, acc, images, time.perf_counter() - start, lrs)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, runtime: Runtime) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy in percent) of `model` over `loader`: over every process's share of it
    on several processes."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    correct = torch.zeros((), dtype=torch.int64, device=runtime.device)
    count = 0
    for images, labels in loader_batches(loader):
        images, labels = runtime.to_device(images, labels)
        with runtime.autocast():
            logits = model(images)
        loss_sum += loss_fn(logits.float(), labels)
        correct += (logits.argmax(dim=1) == labels).sum()
        count += len(labels)
    images = torch.tensor(count, dtype=torch.float64, device=runtime.device)
    loss_sum, correct, images = runtime.all_reduce(torch.stack([loss_sum, correct.double(), images]))
    count = int(images.item())
    if count == 0:
        raise PipelineError("nothing to evaluate: the evaluation split is empty")
    return loss_sum.item() / count, 100.0 * correct.item() / count
