"""The train stage's run: One Cycle training with DVCLive logging, checkpoints, and resuming after a kill.

Outputs: models/model.pt (last epoch), models/best.pt (best test accuracy, or best validation accuracy when
data.val_size > 0), and DVCLive's reports/train/{metrics.json, plots/metrics/**.tsv, plots/custom/lr_schedule.json}.

After a completed epoch the whole state of the run (weights, optimizer, scheduler, grad scaler, history, RNG
states) goes atomically to .resume/train.pt with a fingerprint of the params, inputs and package source. A rerun
with the same fingerprint continues after the last saved epoch and ends with the same weights and metrics as an
uninterrupted run; with another fingerprint it starts afresh. The file is removed when the run finishes.

The resume state and models/best.pt are written by a background thread (checkpoint_writer.py): the training
thread copies the tensors into buffers reused every epoch and goes on; it waits only if the last epoch's files are
still being written. A kill during a write leaves the previous files in place (each is renamed into place whole), so
the rerun resumes from the epoch before, with the same result.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from torch import nn
from torch.utils.data import DataLoader

from cifar_pipeline.checkpoint import make_checkpoint, model_state, save_plain
from cifar_pipeline.checkpoint_writer import CheckpointWriter
from cifar_pipeline.data import set_epoch
from cifar_pipeline.engine import (
    FullBatches,
    Runtime,
    compile_model,
    evaluate,
    make_optimizer,
    make_scaler,
    make_scheduler,
    train_epoch,
)
from cifar_pipeline.errors import PipelineError, require_inputs
from cifar_pipeline.params import Params, TrainParams

LIVE_DIR = Path("reports/train")
MODEL_PATH = Path("models/model.pt")
BEST_PATH = Path("models/best.pt")
RESUME_PATH = Path(".resume/train.pt")
LR_FIND_PATH = Path("reports/lr_find.json")


def resolve_max_lr(setting: float | str, lr_find_path: str | Path = LR_FIND_PATH) -> tuple[float, str]:
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


PACKAGE_DIR = Path(__file__).resolve().parent


def fingerprint(params: Params, max_lr: float, files: Iterable[str | Path], code_dir: str | Path = PACKAGE_DIR) -> str:
    """A hash of everything the train stage's result depends on: a resume state is only valid under the same one.

    data.num_workers is left out: the augmentations do not depend on it, so a resumed run may use other workers.
    The package's source is in: DVC reruns the stage after a code change, and a run killed under the old code must
    not be continued by the new one (the half-trained weights would pass for the new code's result).
    """
    digest = hashlib.sha256()
    settings = params.model_dump(
        include={"seed", "data", "model", "augment", "train"}, exclude={"data": {"num_workers"}}, mode="json"
    )
    digest.update(json.dumps({"params": settings, "max_lr": max_lr}, sort_keys=True).encode())
    for path in files:
        path = Path(path)
        digest.update(str(path).encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    code_dir = Path(code_dir)
    for path in sorted(code_dir.rglob("*.py")):  # by package-relative name, so a moved clone can still resume
        digest.update(path.relative_to(code_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _rng_states() -> dict[str, Any]:
    """Every RNG state, as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_resume_state(path: str | Path, expected_fingerprint: str, best_path: str | Path) -> dict[str, Any] | None:
    """The saved state of an interrupted run, or None when there is none or it cannot be continued: made with
    other inputs, or its models/best.pt is gone (dvc.yaml must declare it `persist: true`, or `dvc repro` deletes
    it before the rerun, and a best epoch from before the kill would never be written again)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        stale = state.get("fingerprint") != expected_fingerprint
        reason = "it was made with other params, inputs or code" if stale else ""
    except Exception as exc:  # written atomically, so only a foreign or damaged file gets here
        reason = f"not a readable resume state ({exc})"
    if not reason and not Path(best_path).is_file():
        reason = f"{best_path} of the interrupted run is gone"
    if reason:
        print(f"ignoring {path}: {reason}; starting afresh")
        path.unlink()
        return None
    return state


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


def _open_live(live_dir: str | Path, max_lr: float, max_lr_source: str, history: list[dict], best: dict) -> Live:
    """A fresh DVCLive run holding `history` (the epochs before a resume), written as an uninterrupted run would.

    Not Live(resume=True): that keeps whatever the killed run wrote after its last saved epoch, so an epoch logged
    but not yet saved would appear twice. Logging the saved history again makes the same files in every case.
    """
    shutil.rmtree(live_dir, ignore_errors=True)
    live = Live(dir=str(live_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
    live.log_metric("max_lr", max_lr, plot=False)
    live.log_metric("max_lr_source", max_lr_source, plot=False)
    for record in history:
        _log_epoch(live, record, best)  # only the last best stays in the summary: the saved one
    return live


def _epoch_line(record: dict[str, float], epochs: int) -> str:
    splits = "  ".join(
        f"{split} loss {record[f'{split}/loss']:.4f} acc {record[f'{split}/acc']:.2f}%"
        for split in ("train", "val", "test")
        if f"{split}/loss" in record
    )
    return (
        f"epoch {record['epoch']}/{epochs}  {splits}  lr {record['lr']:.4g}  "
        f"{record['epoch_time_s']:.1f} s  {record['images_per_s']:.0f} img/s"
    )


def fit(
    model: nn.Module,
    model_name: str,
    model_kwargs: dict[str, Any],
    train_loader: DataLoader,
    eval_loaders: dict[str, DataLoader],
    train: TrainParams,
    runtime: Runtime,
    *,
    max_lr: float,
    max_lr_source: str,
    run_fingerprint: str,
    checkpoint_extra: dict[str, Any],
    live_dir: str | Path = LIVE_DIR,
    model_path: str | Path = MODEL_PATH,
    best_path: str | Path = BEST_PATH,
    resume_path: str | Path = RESUME_PATH,
) -> dict[str, Any]:
    """Train `model` (already on the runtime's device) for train.epochs epochs; return the DVCLive summary.

    `eval_loaders` holds "test" and, when there is a validation split, "val": the best checkpoint follows "val"
    if present, so the test set never picks a model. `checkpoint_extra` (batch_size, mean, std, classes, ...) goes
    into both checkpoints as it is.
    """
    started = time.perf_counter()
    step_model, train_batches = model, train_loader
    if train.compile:
        train_batches = FullBatches(train_loader)
        if len(train_batches) == 0:
            raise PipelineError(
                f"train.compile trains on full batches only, and the {len(train_loader.dataset)} training images "
                f"make no full batch of train.batch_size {train.batch_size}: lower train.batch_size or set "
                "train.compile: false"
            )
        step_model = compile_model(model, train.compile)
    optimizer = make_optimizer(model, max_lr / train.div_factor, train.weight_decay, runtime)
    # One Cycle's length in steps: with train.compile, the full batches an epoch.
    scheduler = make_scheduler(optimizer, max_lr, train.epochs, len(train_batches), train.peak_epoch, train.div_factor)
    scaler = make_scaler(runtime)
    best_split = "val" if "val" in eval_loaders else "test"
    history: list[dict[str, float]] = []
    lr_history: list[float] = []
    best: dict[str, Any] = {"split": best_split, "acc": -1.0, "epoch": 0}
    elapsed_before = 0.0
    first_epoch = 1

    # The weights' names and shapes join the fingerprint: a state saved by an edited model is not loadable.
    shapes = [(name, tuple(value.shape)) for name, value in model.state_dict().items()]
    run_fingerprint = hashlib.sha256(f"{run_fingerprint}{shapes}".encode()).hexdigest()
    state = load_resume_state(resume_path, run_fingerprint, best_path)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, lr_history, best = state["history"], state["lr_history"], state["best"]
        elapsed_before = state["wall_time_s"]
        first_epoch = state["epoch"] + 1
        print(f"resuming after epoch {state['epoch']} of {train.epochs} from {resume_path}")
    live = _open_live(live_dir, max_lr, max_lr_source, history, best)
    if lr_history:
        _log_lr_schedule(live, lr_history)
    if state is not None:
        _restore_rng_states(state["rng"])  # last: building the model and loaders drew from the RNGs

    def checkpoint(state: dict[str, Any], record: dict[str, float], loss: float) -> dict[str, Any]:
        return make_checkpoint(
            state["model"],
            model_name,
            model_kwargs,
            epoch=int(record["epoch"]),
            optimizer=state["optimizer"],
            scheduler=state["scheduler"],
            loss=loss,
            max_lr=max_lr,
            max_lr_source=max_lr_source,
            train_acc=record["train/acc"],
            test_acc=record["test/acc"],
            **({"val_acc": record["val/acc"]} if "val/acc" in record else {}),
            device=str(runtime.device),
            **checkpoint_extra,
        )

    def training_state() -> dict[str, Any]:
        return {
            "model": model_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        }

    writer = CheckpointWriter()
    try:
        for epoch in range(first_epoch, train.epochs + 1):
            epoch_start = time.perf_counter()
            set_epoch(train_loader, epoch - 1)
            stats = train_epoch(step_model, train_batches, optimizer, scheduler, scaler, runtime, desc=f"epoch {epoch}")
            record: dict[str, float] = {"epoch": epoch, "train/loss": stats.loss, "train/acc": stats.acc}
            for split, loader in eval_loaders.items():
                record[f"{split}/loss"], record[f"{split}/acc"] = evaluate(model, loader, runtime)
            record["lr"] = stats.lrs[-1]  # the LR of the epoch's last step: max_lr at the end of train.peak_epoch
            record["epoch_time_s"] = round(time.perf_counter() - epoch_start, 3)  # training and evaluation
            record["images_per_s"] = round(stats.images_per_s, 1)
            history.append(record)
            lr_history.extend(stats.lrs)

            improved = record[f"{best_split}/acc"] > best["acc"]
            if improved:
                best = {"split": best_split, "acc": record[f"{best_split}/acc"], "epoch": epoch}
            _log_epoch(live, record, best)
            _log_lr_schedule(live, lr_history)
            print(_epoch_line(record, train.epochs), flush=True)

            wall_time_s = elapsed_before + time.perf_counter() - started
            if epoch < train.epochs:
                state = writer.snapshot(training_state())
                resume_state = {
                    "fingerprint": run_fingerprint,
                    "epoch": epoch,
                    **state,
                    "history": list(history),
                    "lr_history": list(lr_history),
                    "best": best,
                    "wall_time_s": wall_time_s,
                    "rng": _rng_states(),
                }
                # best.pt first: a resume state on disk never names a best epoch that best.pt does not hold yet.
                best_file = [(best_path, checkpoint(state, record, stats.loss))] if improved else []
                writer.write([*best_file, (resume_path, resume_state)])
            else:
                writer.wait()
                state = training_state()
                if improved:
                    save_plain(best_path, checkpoint(state, record, stats.loss))
                save_plain(model_path, checkpoint(state, record, stats.loss))
                live.log_metric("wall_time_s", round(wall_time_s, 3), plot=False)
    finally:
        writer.close()  # on an error too: the files already handed over are written
    live.end()
    Path(resume_path).unlink(missing_ok=True)
    return live.summary
