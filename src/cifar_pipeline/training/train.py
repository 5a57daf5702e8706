"""The train stage: One Cycle training with DVCLive logging and checkpoints, resumable after a kill (resume.py).

Outputs: models/model.pt (last epoch), models/best.pt (best test accuracy, or best validation accuracy when
data.val_size > 0), reports/train_samples.png, reports/augmentations.yaml, and DVCLive's reports/train/{metrics.json,
plots/metrics/**.tsv, plots/custom/lr_schedule.json}.

The resume state and the best epoch's model are written by a background thread (training/resume.py), both under
.resume/ (DVC may delete or replace models/best.pt before a rerun) until the last epoch, when the best model moves to
models/best.pt. The training thread copies the tensors into buffers reused every epoch and goes on; it waits only
if the last epoch's files are still being written. A kill during a write leaves the previous files in place (each
is renamed into place whole), so the rerun resumes from the epoch before, with the same result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvclive import Live
from torch import nn
from torch.utils.data import DataLoader

from cifar_pipeline import paths
from cifar_pipeline.models.checkpoint import make_checkpoint, model_state, save_plain
from cifar_pipeline.params import Params, TrainParams
from cifar_pipeline.stage import PipelineError, require_inputs
from cifar_pipeline.training.engine import (
    compile_model,
    evaluate,
    make_ema,
    make_optimizer,
    make_scaler,
    make_scheduler,
    new_model,
    train_epoch,
)
from cifar_pipeline.training.loader import (
    make_eval_loader,
    prepare_training,
    save_augmentation_record,
    save_train_samples,
    set_epoch,
)
from cifar_pipeline.training.resume import (
    CheckpointWriter,
    fingerprint,
    load_resume_state,
    restore_rng_states,
    rng_states,
)
from cifar_pipeline.training.runtime import Runtime, close, finish


def resolve_max_lr(setting: float | str, lr_find_path: str | Path = paths.LR_FIND) -> tuple[float, str]:
    """(max LR, where it came from): `auto` reads the lr-find suggestion, a number is used as it is."""
    if setting != "auto":
        return float(setting), "params"
    require_inputs({str(lr_find_path): "lr-find"})
    try:
        suggested = json.loads(Path(lr_find_path).read_text()).get("suggested_lr")
    except (json.JSONDecodeError, AttributeError):
        suggested = None
    if isinstance(suggested, bool) or not isinstance(suggested, (int, float)) or not suggested > 0:
        raise PipelineError(
            f"{lr_find_path} holds no usable suggested_lr ({suggested!r}): rerun the lr-find stage "
            "(dvc repro lr-find), or set train.max_lr to a number in params.yaml"
        )
    return float(suggested), "lr-find"


def train(params: Params) -> dict[str, Any] | None:
    """Everything the train stage does: its outputs on disk, and DVCLive's summary of the run returned (by rank 0
    of several processes; None by the others, which write nothing)."""
    try:
        summary = _train(params)
        finish()
        return summary
    finally:
        close()


def _train(params: Params) -> dict[str, Any] | None:
    full_batches = bool(params.train.compile)
    runtime, splits, mean, std, train_loader = prepare_training(params, full_batches)
    max_lr, max_lr_source = resolve_max_lr(params.train.max_lr)
    loading = {"batch_size": params.train.batch_size, "seed": params.seed, "num_workers": runtime.num_workers}
    loading.update(device=runtime.device, rank=runtime.rank, world_size=runtime.world_size)
    eval_loaders = {
        split: make_eval_loader(images, labels, mean, std, backend=runtime.backend, **loading)
        for split, images, labels in (
            ("val", splits.val_images, splits.val_labels),
            ("test", splits.test_images, splits.test_labels),
        )
        if len(labels)  # no val split unless data.val_size > 0
    }
    backend = runtime.backend
    if runtime.main:
        save_train_samples(train_loader.dataset, splits.classes, paths.TRAIN_SAMPLES)
        save_augmentation_record(params.augment, backend, mean, std, paths.AUGMENTATIONS)
        print(
            f"training {params.model.name} on {len(splits.train_labels)} images for {params.train.epochs} epochs on "
            f"{runtime.where()} (max LR {max_lr:.4g} from {max_lr_source}, {backend} augment backend)",
            flush=True,
        )
    inputs = [paths.STATS, paths.META] + ([paths.LR_FIND] if max_lr_source == "lr-find" else [])
    return fit(
        new_model(params.model, params.seed, runtime, len(splits.classes)),
        train_loader,
        eval_loaders,
        params.train,
        runtime,
        max_lr=max_lr,
        max_lr_source=max_lr_source,
        run_fingerprint=fingerprint(params, max_lr, inputs),
        checkpoint_extra={
            "model_name": params.model.name,
            "model_kwargs": params.model.kwargs(len(splits.classes)),
            "batch_size": params.train.batch_size,
            "mean": list(mean),
            "std": list(std),
            "classes": list(splits.classes),
        },
    )


@dataclass
class Progress:
    """The epochs a run has completed: what the resume state carries besides the tensors."""

    best_split: str  # "val" when there is a validation split, else "test"
    weights: str = ""  # whose accuracy picks the best epoch: "" the trained weights', "ema/" their average's
    history: list[dict[str, float]] = field(default_factory=list)  # one record per epoch
    lr_history: list[float] = field(default_factory=list)  # the LR of every optimizer step
    best: dict[str, Any] = field(default_factory=dict)  # split, acc and epoch of the best epoch so far
    elapsed_s: float = 0.0  # wall time before a resume

    def __post_init__(self) -> None:
        self.best = self.best or {"split": self.best_split, "acc": -1.0, "epoch": 0}

    @property
    def epoch(self) -> int:
        return len(self.history)

    def add(self, record: dict[str, float], lrs: list[float]) -> bool:
        """Record a finished epoch; whether it is the best so far."""
        self.history.append(record)
        self.lr_history.extend(lrs)
        acc = record[f"{self.weights}{self.best_split}/acc"]
        improved = acc > self.best["acc"]
        if improved:
            self.best = {"split": self.best_split, "acc": acc, "epoch": record["epoch"]}
        return improved


@dataclass(frozen=True)
class RunFiles:
    """What every file a run writes shares: the max LR and where it came from, the resume fingerprint, what goes into
    both checkpoints as it is, and the folder the paths.py places are under."""

    max_lr: float
    max_lr_source: str
    fingerprint: str
    checkpoint_extra: dict[str, Any]
    root: Path


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    eval_loaders: dict[str, DataLoader],
    train: TrainParams,
    runtime: Runtime,
    *,
    max_lr: float,
    max_lr_source: str,
    run_fingerprint: str,
    checkpoint_extra: dict[str, Any],
    root: Path = Path("."),
) -> dict[str, Any] | None:
    """Train `model` (already on the runtime's device) for train.epochs epochs; return the DVCLive summary.

    `eval_loaders` holds "test" and, when there is a validation split, "val": the best checkpoint follows "val"
    if present, so the test set never picks a model. `checkpoint_extra` (model_name, model_kwargs, classes, mean,
    std, ...) goes into both checkpoints as it is. The outputs go to their paths.py places under `root`.

    On several processes (runtime.distributed) the model trains through DDP with synchronised batch norm
    (training/runtime.py); rank 0 alone reads and writes the files and returns the summary, the others return None.
    """
    started = time.perf_counter()
    model, step_model, parts = _train_parts(model, train, runtime, max_lr, train_loader)
    # The weights' names and shapes join the fingerprint: a state saved by an edited model is not loadable. So does
    # the process count: each process's RNG state is in it.
    shapes = [(name, tuple(value.shape)) for name, value in model.state_dict().items()]
    fingerprint = hashlib.sha256(f"{run_fingerprint}{shapes}{runtime.world_size}".encode()).hexdigest()
    files = RunFiles(max_lr, max_lr_source, fingerprint, checkpoint_extra, root)
    progress = Progress("val" if "val" in eval_loaders else "test", "ema/" if train.ema else "")
    progress, rngs = _resume(parts, progress, files, runtime, train.epochs)
    live = _open_live(root / paths.LIVE_DIR, max_lr, max_lr_source, progress, runtime) if runtime.main else None
    if rngs is not None:
        restore_rng_states(rngs[runtime.rank])  # last: building the model and loaders drew from the RNGs
    writer = CheckpointWriter()
    try:
        for epoch in range(progress.epoch + 1, train.epochs + 1):
            record, lrs, loss = _one_epoch(epoch, step_model, model, train_loader, eval_loaders, parts, runtime, train)
            improved = progress.add(record, lrs)
            if epoch < train.epochs:
                # Every process's RNG states, in rank order (dropout draws differ between processes).
                rngs = runtime.gather(rng_states())
            if runtime.main:
                _log_epoch(live, record, progress.best)
                _log_lr_schedule(live, progress.lr_history)
                print(_epoch_line(record, train.epochs), flush=True)
                wall_time_s = progress.elapsed_s + time.perf_counter() - started
                _save_epoch(writer, parts, progress, (record, loss, improved), rngs, wall_time_s, train, runtime, files)
                if epoch == train.epochs:
                    live.log_metric("wall_time_s", round(wall_time_s, 3), plot=False)
    finally:
        writer.close()  # on an error too: the files already handed over are written
    if not runtime.main:
        return None
    live.end()
    (root / paths.RESUME).unlink(missing_ok=True)
    return live.summary


def _train_parts(
    model: nn.Module, train: TrainParams, runtime: Runtime, max_lr: float, train_loader: DataLoader
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(the model, the module the train step calls, the parts a resume state holds: model, optimizer, scheduler,
    scaler, and with train.ema the weight average, evaluated beside the trained weights and saved in their place).
    On several processes the model gets synchronised batch norm and the train step DDP; train.compile compiles it."""
    if len(train_loader) == 0:
        raise PipelineError(
            f"the {len(train_loader.dataset)} training images make no batch to train on: with train.compile every "
            f"batch must be full (train.batch_size {train.batch_size}); lower train.batch_size or set "
            "train.compile: false"
        )
    steps_per_epoch = len(train_loader)
    model, step_model = runtime.parallel(model)
    step_model = compile_model(step_model, train.compile) if train.compile else step_model
    optimizer = make_optimizer(model, max_lr / train.div_factor, train.weight_decay, runtime)
    scheduler = make_scheduler(optimizer, max_lr, train.epochs, steps_per_epoch, train.peak_epoch, train.div_factor)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": make_scaler(runtime)}
    if train.ema:
        parts["ema"] = make_ema(model, train.ema)
    return model, step_model, parts


def _resume(
    parts: dict[str, Any], progress: Progress, files: RunFiles, runtime: Runtime, epochs: int
) -> tuple[Progress, list[dict[str, Any]] | None]:
    """Load the resume state that fits this run (rank 0 reads it, the others get it) into `parts`: the progress it
    holds and every process's RNG states, or `progress` as it is and None when there is none."""
    state = None
    if runtime.main:
        state = load_resume_state(files.root / paths.RESUME, files.fingerprint, files.root / paths.RESUME_BEST)
    state = runtime.broadcast(state)
    if state is None:
        return progress, None
    for name, part in parts.items():
        part.load_state_dict(state[name])
    resumed = Progress(progress.best_split, progress.weights, state["history"], state["lr_history"], state["best"])
    resumed.elapsed_s = state["wall_time_s"]
    if runtime.main:
        print(f"resuming after epoch {state['epoch']} of {epochs} from {files.root / paths.RESUME}")
    return resumed, state["rng"]


def _tensors(parts: dict[str, Any]) -> dict[str, Any]:
    return {name: model_state(part) if name == "model" else part.state_dict() for name, part in parts.items()}


def _model_file(
    tensors: dict[str, Any],
    record: dict[str, float],
    loss: float,
    train: TrainParams,
    runtime: Runtime,
    files: RunFiles,
) -> dict[str, Any]:
    """A model file: the weights (their average with train.ema) and the optimizer's state, with what the epoch
    measured of those weights."""
    weights = "ema/" if train.ema else ""
    extra = dict(files.checkpoint_extra)
    measured = {f"{s}_acc": record[f"{weights}{s}/acc"] for s in ("test", "val") if f"{weights}{s}/acc" in record}
    state_dict = tensors["model"]
    if train.ema:
        state_dict = {key: tensors["ema"][f"module.{key}"] for key in state_dict}
    return make_checkpoint(
        state_dict,
        extra.pop("model_name"),
        extra.pop("model_kwargs"),
        epoch=int(record["epoch"]),
        optimizer=tensors["optimizer"],
        scheduler=tensors["scheduler"],
        loss=loss,
        train_acc=record["train/acc"],
        weights=f"EMA of the trained weights, decay {train.ema}" if train.ema else "trained",
        max_lr=files.max_lr,
        max_lr_source=files.max_lr_source,
        **measured,
        device=str(runtime.device),
        run=runtime.record(),
        **extra,
    )


def _save_epoch(
    writer: CheckpointWriter,
    parts: dict[str, Any],
    progress: Progress,
    epoch_result: tuple[dict[str, float], float, bool],
    rngs: list[dict[str, Any]],
    wall_time_s: float,
    train: TrainParams,
    runtime: Runtime,
    files: RunFiles,
) -> None:
    """After an epoch but the last: the resume state (and the best model, when the epoch improved it) to .resume/,
    written off the training thread. After the last: models/model.pt and models/best.pt."""
    record, loss, improved = epoch_result
    root = files.root
    if record["epoch"] < train.epochs:
        snapshot = writer.snapshot(_tensors(parts))
        resume_state = {
            "fingerprint": files.fingerprint,
            "epoch": record["epoch"],
            **snapshot,
            "history": list(progress.history),
            "lr_history": list(progress.lr_history),
            "best": progress.best,
            "wall_time_s": wall_time_s,
            "rng": rngs,
        }
        # The best model first: a resume state on disk never names a best epoch that it does not hold yet.
        best = (
            [(root / paths.RESUME_BEST, _model_file(snapshot, record, loss, train, runtime, files))] if improved else []
        )
        writer.write([*best, (root / paths.RESUME, resume_state)])
        return
    writer.wait()
    final = _model_file(_tensors(parts), record, loss, train, runtime, files)
    if improved:
        save_plain(root / paths.BEST, final)
        (root / paths.RESUME_BEST).unlink(missing_ok=True)
    else:
        (root / paths.BEST).parent.mkdir(parents=True, exist_ok=True)
        os.replace(root / paths.RESUME_BEST, root / paths.BEST)  # same file system: atomic
    save_plain(root / paths.MODEL, final)


def _one_epoch(
    epoch: int,
    step_model: nn.Module,
    model: nn.Module,
    train_loader: DataLoader,
    eval_loaders: dict[str, DataLoader],
    parts: dict[str, Any],
    runtime: Runtime,
    train: TrainParams,
) -> tuple[dict[str, float], list[float], float]:
    """Train one epoch (through `step_model`, compiled or not) and evaluate `model`, and the average of its weights
    (parts["ema"], with train.ema) as "ema/<split>", on every eval split.
    Returns the epoch's record, the LR of each of its steps, and its mean training loss."""
    start = time.perf_counter()
    set_epoch(train_loader, epoch - 1)
    optimizer, scheduler, scaler = parts["optimizer"], parts["scheduler"], parts["scaler"]
    ema = parts.get("ema")
    stats = train_epoch(
        step_model,
        train_loader,
        optimizer,
        scheduler,
        scaler,
        runtime,
        desc=f"epoch {epoch}",
        label_smoothing=train.label_smoothing,
        ema=ema,
    )
    record: dict[str, float] = {"epoch": epoch, "train/loss": stats.loss, "train/acc": stats.acc}
    for split, loader in eval_loaders.items():
        record[f"{split}/loss"], record[f"{split}/acc"] = evaluate(model, loader, runtime)
        if ema is not None:
            record[f"ema/{split}/loss"], record[f"ema/{split}/acc"] = evaluate(ema.module, loader, runtime)
    record["lr"] = stats.lrs[-1]  # the LR of the epoch's last step: max_lr at the end of train.peak_epoch
    record["epoch_time_s"] = round(time.perf_counter() - start, 3)  # training and evaluation
    record["images_per_s"] = round(stats.images_per_s, 1)
    return record, stats.lrs, stats.loss


def _log_epoch(live: Live, record: dict[str, float], best: dict[str, Any]) -> None:
    """One epoch's metrics as DVCLive step `epoch`, and the best-so-far in the summary only."""
    live.step = record["epoch"]
    for name, value in record.items():
        if name != "epoch":
            live.log_metric(name, value)
    live.log_metric(f"best/{best['split']}_acc", best["acc"], plot=False)
    live.log_metric("best/epoch", best["epoch"], plot=False)
    live.next_step()


def _log_lr_schedule(live: Live, lrs: list[float]) -> None:
    points = [{"step": step, "lr": lr} for step, lr in enumerate(lrs)]
    live.log_plot(
        "lr_schedule",
        points,
        x="step",
        y="lr",
        template="linear",
        title="One Cycle learning rate per optimizer step",
        x_label="optimizer step",
        y_label="learning rate",
    )


def _open_live(live_dir: Path, max_lr: float, max_lr_source: str, progress: Progress, runtime: Runtime) -> Live:
    """A fresh DVCLive run holding the epochs before a resume, written as an uninterrupted run would.

    Not Live(resume=True): that keeps whatever the killed run wrote after its last saved epoch, so an epoch logged
    but not yet saved would appear twice. Logging the saved history again makes the same files in every case.
    dvcyaml=None: DVCLive would otherwise rewrite the project's dvc.yaml. What the run used (Runtime.record: the
    hardware, precision, backend...) goes to DVCLive's params.yaml, which `dvc exp show` lists (dvc.yaml's params).
    """
    shutil.rmtree(live_dir, ignore_errors=True)
    live = Live(dir=str(live_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
    live.log_params({"run": runtime.record()})
    live.log_metric("max_lr", max_lr, plot=False)
    live.log_metric("max_lr_source", max_lr_source, plot=False)
    for record in progress.history:
        _log_epoch(live, record, progress.best)  # only the last best stays in the summary: the saved one
    if progress.lr_history:
        _log_lr_schedule(live, progress.lr_history)
    return live


def _epoch_line(record: dict[str, float], epochs: int) -> str:
    splits = "  ".join(
        f"{split} loss {record[f'{split}/loss']:.4f} acc {record[f'{split}/acc']:.2f}%"
        for split in ("train", "val", "test", "ema/val", "ema/test")
        if f"{split}/loss" in record
    )
    return (
        f"epoch {record['epoch']}/{epochs}  {splits}  lr {record['lr']:.4g}  "
        f"{record['epoch_time_s']:.1f} s  {record['images_per_s']:.0f} img/s"
    )
