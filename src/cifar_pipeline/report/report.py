"""The report stage: test accuracy (per class, confusion, flip TTA) of models/model.pt, the misclassified images, the
curves, and reports/summary.md with the model summary (torchinfo) and its receptive field table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cifar_pipeline import paths
from cifar_pipeline.data.dataset import load_test_split, read_classes
from cifar_pipeline.models.checkpoint import (
    batch_logits,
    flip_tta_logits,
    load_checkpoint,
    model_from_checkpoint,
    softmax,
)
from cifar_pipeline.params import Params
from cifar_pipeline.paths import DATA_DIR, LIVE_DIR, LR_FIND, META, MODEL, REPORTS
from cifar_pipeline.report.figures import confusion_matrix, metrics_curves, misclassified_grid
from cifar_pipeline.stage import PipelineError, require_inputs, save_figure, write_json, write_text
from cifar_pipeline.training.runtime import pick_device

# ---------------------------------------- receptive field ----------------------------------------
# Receptive field of every spatial layer, computed from kernel, stride, dilation and padding.
#
# The layers are walked in registration order, which both models keep equal to their forward order. A residual block
# adds its input to its branch's output; the branch has the larger receptive field, so walking the branch gives the
# receptive field of the sum too (the max over the two paths). Only square kernels and inputs are handled.

SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
COLUMNS = ("layer", "type", "kernel", "stride", "dilation", "padding", "jump", "receptive_field", "output_size", "note")


def _first(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value


def _geometry(layer: nn.Module, size: int) -> tuple[int, int, int, int, bool]:
    """(kernel, stride, dilation, padding, ceil_mode) of one layer fed a size x size map."""
    if isinstance(layer, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        out = _first(layer.output_size) or size
        return size // out, size // out, 1, 0, False
    kernel = _first(layer.kernel_size)
    stride = _first(layer.stride) if layer.stride is not None else kernel
    dilation = _first(getattr(layer, "dilation", 1))
    padding = layer.padding
    if padding == "same":
        padding = dilation * (kernel - 1) // 2
    elif padding == "valid":
        padding = 0
    return kernel, stride, dilation, _first(padding), getattr(layer, "ceil_mode", False)


def receptive_field_table(model: nn.Module, input_size: int = 32) -> list[dict]:
    """One row per spatial layer; the walk stops after the first global pooling (output 1x1), which sees it all."""
    residual = tuple(getattr(model, "residual_branches", ()))
    size, jump, field = input_size, 1, 1
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, SPATIAL):
            continue
        kernel, stride, dilation, padding, ceil_mode = _geometry(layer, size)
        span = dilation * (kernel - 1) + 1
        rounding = math.ceil if ceil_mode else math.floor
        out = int(rounding((size + 2 * padding - span) / stride)) + 1
        field += (kernel - 1) * dilation * jump
        jump *= stride
        note = ""
        if out == 1 and size > 1 and not isinstance(layer, nn.Conv2d):
            note = "global pooling: each output sees the whole image"
        elif name.split(".")[0] in residual:
            note = "residual branch: x + branch(x) has the branch's field"
        rows.append(
            {
                "layer": name,
                "type": type(layer).__name__,
                "kernel": kernel,
                "stride": stride,
                "dilation": dilation,
                "padding": padding,
                "jump": jump,
                "receptive_field": field,
                "output_size": out,
                "note": note,
            }
        )
        size = out
        if note.startswith("global"):
            break
    return rows


def receptive_field(model: nn.Module, input_size: int = 32) -> int:
    """Receptive field (pixels) of the last spatial feature map, before global pooling and the classifier."""
    rows = [row for row in receptive_field_table(model, input_size) if not row["note"].startswith("global")]
    return rows[-1]["receptive_field"] if rows else 1


def format_receptive_field_table(rows: list[dict]) -> str:
    """The table as aligned plain text."""
    cells = [list(COLUMNS)] + [[str(row[column]) for column in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ---------------------------------------- model summary ----------------------------------------
# The model summary written to reports/model_summary.txt: torchinfo's layer table, then the receptive fields.


def model_summary_text(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> str:
    from torchinfo import summary

    # torchinfo would move a CPU model to CUDA when one is present: keep it where it is.
    device = next(model.parameters()).device
    table = summary(
        model,
        input_size=input_size,
        depth=2,
        col_names=("input_size", "kernel_size", "output_size", "num_params", "trainable"),
        row_settings=("var_names",),
        device=device,
        verbose=0,
    )
    rows = receptive_field_table(model, input_size[-1])
    return (
        f"{table}\n\n"
        f"Receptive field per spatial layer ({input_size[-1]}x{input_size[-1]} input; jump = input pixels between "
        f"neighbouring outputs)\n"
        f"{format_receptive_field_table(rows)}\n\n"
        f"Receptive field of the last feature map: {receptive_field(model, input_size[-1])} pixels\n"
    )


# ---------------------------------------- report ----------------------------------------
# The report stage: evaluate models/model.pt on the test split and write what a person reads after a run.
#
# Outputs (all under reports/): predictions.csv (one row per test image, DVC's confusion plot), per_class.json
# (DVC metrics), confusion_matrix.png, misclassified.png, metrics_curves.png, model_summary.txt and summary.md, which
# ties them together with the run's numbers and each stage's wall time. With report.tta the test split is also evaluated
# with horizontal-flip test-time augmentation; the headline (test_acc) stays the plain accuracy, test_acc_flip_tta sits
# beside it.

# Every input and the stage that makes it: a fresh clone gets "run the 'train' stage first", not a traceback.
INPUTS = {
    str(META): "download",
    str(MODEL): "train",
    str(LIVE_DIR / "metrics.json"): "train",
    str(LIVE_DIR / "plots/metrics/train/loss.tsv"): "train",
    str(LIVE_DIR / "plots/metrics/test/loss.tsv"): "train",
    str(LIVE_DIR / "plots/metrics/train/acc.tsv"): "train",
    str(LIVE_DIR / "plots/metrics/test/acc.tsv"): "train",
    str(LIVE_DIR / "plots/custom/lr_schedule.json"): "train",
}

# Stage name -> the file whose `wall_time_s` says how long that stage took.
STAGE_TIMES = {
    "download": paths.DOWNLOAD_TIME,
    "compute-mean-std": paths.STATS_TIME,
    "lr-find": paths.LR_FIND_TIME,
    "train": paths.TRAIN_METRICS,
}


def top_class(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class (int64) and its softmax probability (float32) for each row of logits."""
    probs = softmax(logits)
    return probs.argmax(axis=1).astype(np.int64), probs.max(axis=1).astype(np.float32)


def pick_misclassified(labels: np.ndarray, preds: np.ndarray, confidences: np.ndarray, count: int) -> np.ndarray:
    """Test indices of the `count` most confident mistakes, most confident first; ties keep test order."""
    wrong = np.flatnonzero(preds != labels)
    order = np.argsort(-confidences[wrong], kind="stable")
    return wrong[order[:count]]


def per_class_accuracy(
    labels: np.ndarray, preds: np.ndarray, classes: list[str], tta_preds: np.ndarray | None = None
) -> dict[str, Any]:
    """Overall and per-class test accuracy in percent, shaped for `dvc metrics show`; with `tta_preds` (flip TTA's
    predictions) also `test_acc_flip_tta`. The overall accuracies come first: `dvc exp show` keeps the order."""
    correct = preds == labels
    per_class = {}
    for index, name in enumerate(classes):
        mask = labels == index
        per_class[name] = round(100.0 * correct[mask].mean(), 2) if mask.any() else None
    result: dict[str, Any] = {"test_acc": round(100.0 * correct.mean(), 2)}
    if tta_preds is not None:
        result["test_acc_flip_tta"] = round(100.0 * float((tta_preds == labels).mean()), 2)
    return result | {"correct": int(correct.sum()), "total": len(labels), "per_class_acc": per_class}


def confusion_counts(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]: how many test images of each class went to each class."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, preds), 1)
    return counts


def predictions_csv(labels: np.ndarray, preds: np.ndarray, confidences: np.ndarray, classes: list[str]) -> str:
    """index,true,predicted,confidence: one row per test image; index is its position in the test split."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "true", "predicted", "confidence"])
    for index, (label, pred, confidence) in enumerate(zip(labels, preds, confidences, strict=True)):
        writer.writerow([index, classes[label], classes[pred], f"{confidence:.4f}"])
    return buffer.getvalue()


def read_tsv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) from a DVCLive metric file: tab-separated, header `[timestamp] step <name>`."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if len(rows) < 2 or "step" not in rows[0]:
        raise PipelineError(f"{path}: expected a DVCLive metric file (a 'step' column and at least one row)")
    step_col, value_col = rows[0].index("step"), len(rows[0]) - 1
    steps = np.array([float(row[step_col]) for row in rows[1:]])
    values = np.array([float(row[value_col]) for row in rows[1:]])
    return steps, values


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}): rerun the stage that writes it") from None


def metric(metrics: dict, name: str) -> Any:
    """A value from a DVCLive metrics.json by its logged name: 'train/acc' is stored nested, train -> acc."""
    if name in metrics:
        return metrics[name]
    value: Any = metrics
    for key in name.split("/"):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def training_curves(log_dir: Path = LIVE_DIR) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{'loss' | 'acc': {split: (epochs, values)}} for each split the train stage logged."""
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"loss": {}, "acc": {}}
    for name, per_split in curves.items():
        for split in ("train", "val", "test", "ema/val", "ema/test"):  # ema/: the weight average's (train.ema)
            path = log_dir / "plots/metrics" / split / f"{name}.tsv"
            if path.is_file():
                per_split[split] = read_tsv(path)
    return curves


def lr_schedule(log_dir: Path, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """(position in epochs, lr) for every optimizer step of the One Cycle schedule."""
    records = read_json(log_dir / "plots/custom/lr_schedule.json")
    if not isinstance(records, list) or not records or not all("lr" in r and "step" in r for r in records):
        raise PipelineError(f"{log_dir}/plots/custom/lr_schedule.json: expected a list of {{step, lr}} records")
    steps = np.array([float(r["step"]) for r in records])
    lrs = np.array([float(r["lr"]) for r in records])
    steps_per_epoch = len(records) / epochs
    return (steps - steps.min()) / steps_per_epoch, lrs


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    minutes, seconds = divmod(float(value), 60)
    return f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s"


def stage_wall_times(report_seconds: float) -> dict[str, float | None]:
    times: dict[str, float | None] = {}
    for stage, path in STAGE_TIMES.items():
        value = read_json(path).get("wall_time_s") if path.is_file() else None
        times[stage] = float(value) if value is not None else None
    times["report"] = report_seconds
    return times


def _trained_on(ckpt: dict) -> str:
    """What the train stage used, in words, from the checkpoint's record (runtime.Runtime.record)."""
    run = ckpt.get("run")
    if not isinstance(run, dict):  # a checkpoint from before the record
        return str(ckpt.get("device", "n/a"))
    processes = run["processes"]
    workers = run["loader_workers"]
    versions = f"torch {run['torch']}" + "".join(
        f", {name} {run[key]}" for name, key in (("CUDA", "cuda"), ("cuDNN", "cudnn")) if run.get(key)
    )
    return (
        f"{run['hardware']} ({run['device']}), {run['precision']}, {run['augment_backend']} augmentation "
        f"({workers} loader worker{'s' if workers != 1 else ''}), {processes} training "
        f"process{'es' if processes != 1 else ''}, {versions}"
    )


def summary_markdown(
    ckpt: dict,
    accuracy: dict,
    train_metrics: dict,
    lr_find: dict | None,
    num_params: int,
    wall_times: dict[str, float | None],
    eval_device: str,
) -> str:
    """reports/summary.md: the run's numbers in words, readable on its own, with the pictures beside it."""
    epochs = ckpt["epoch"]
    if (best := metric(train_metrics, "best/val_acc")) is not None:
        best_name = "Best validation accuracy (picks models/best.pt; the train stage's evaluation, in its precision)"
    else:
        best_name = "Best test accuracy (over all epochs; the train stage's evaluation, in its precision)"
        best = metric(train_metrics, "best/test_acc")
    best_epoch = metric(train_metrics, "best/epoch")
    train_acc = metric(train_metrics, "train/acc")
    weights = ckpt.get("weights", "trained")
    if weights != "trained":
        best_name = best_name.replace(" (", " of the weight average (", 1)
    if ckpt["max_lr_source"] == "lr-find":
        rule = f", rule `{lr_find['rule']}`" if lr_find and "rule" in lr_find else ""
        lr_source = f"suggested by the LR range test{rule} (lr_find.png)"
    else:
        lr_source = "set in params.yaml (train.max_lr)"

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{float(value):.2f}%"

    def flip_tta(accuracy: dict) -> str:
        if (tta := accuracy.get("test_acc_flip_tta")) is None:
            return "not measured (report.tta: false)"
        return f"{pct(tta)} ({tta - accuracy['test_acc']:+.2f} points)"

    known = [t for t in wall_times.values() if t is not None]
    total = "total" if len(known) == len(wall_times) else "total of the stages with a time"
    rows = [
        f"| Final test accuracy (epoch {epochs}, models/model.pt, evaluated here in fp32) | "
        f"**{pct(accuracy['test_acc'])}** "
        f"({accuracy['correct']:,} of {accuracy['total']:,}) |",
        f"| Final test accuracy with flip TTA (mean logits of each image and its mirror) | {flip_tta(accuracy)} |",
        f"| {best_name} | {pct(best)}" + (f" (epoch {best_epoch})" if best_epoch is not None else "") + " |",
        f"| Train accuracy (epoch {epochs}, on augmented batches) | {pct(train_acc)} |",
        f"| Weights in models/model.pt | {weights} |",
        f"| Epochs | {epochs} |",
        f"| Max learning rate | {ckpt['max_lr']:.4g}, {lr_source} |",
        f"| Model | {ckpt['model_name']}, {num_params:,} parameters (model_summary.txt) |",
        f"| Classes | {_class_list(list(accuracy['per_class_acc']))} |",
        f"| Batch size | {ckpt.get('batch_size', 'n/a')} |",
        f"| Trained on | {_trained_on(ckpt)} (this report evaluated on {eval_device}, fp32) |",
    ]
    wrong = accuracy["total"] - accuracy["correct"]
    mistakes = f"No test image of the {accuracy['total']:,} is misclassified."
    if wrong:
        mistakes = (
            f"{wrong:,} of {accuracy['total']:,} test images are misclassified. The most confident mistakes:\n\n"
            "![misclassified test images](misclassified.png)"
        )
    per_class = "\n".join(f"| {name} | {pct(acc)} |" for name, acc in accuracy["per_class_acc"].items())
    times = "\n".join(f"| {stage} | {_seconds(t)} |" for stage, t in wall_times.items())
    return f"""# Run report

| | |
|---|---|
{chr(10).join(rows)}

## Training curves

Loss and accuracy per epoch, and the One Cycle learning rate per optimizer step:

![metrics curves](metrics_curves.png)

## Where the model goes wrong

{mistakes}

| class | test accuracy |
|---|---|
{per_class}

Which classes are taken for which, true class down, predicted class across:

![confusion matrix](confusion_matrix.png)

Per-image predictions: predictions.csv (`dvc plots show` draws them as an interactive confusion matrix too).

## How the run got there

The LR range test ([lr_find.png](lr_find.png)) and a sample of augmented training images
([train_samples.png](train_samples.png)). Layers, shapes and receptive fields:
[model_summary.txt](model_summary.txt).

| stage | wall time |
|---|---|
{times}
| {total} | {_seconds(sum(known))} |
"""


def _class_list(classes: list[str], shown: int = 10) -> str:
    names = ", ".join(classes[:shown]) + (f" and {len(classes) - shown} more" if len(classes) > shown else "")
    return f"{len(classes)}: {names}"


def run_report(params: Params) -> None:
    """Everything the report stage does, from the files the earlier stages wrote."""
    started = time.perf_counter()
    require_inputs(INPUTS)
    ckpt = load_checkpoint(MODEL)
    test_images, test_labels = load_test_split(DATA_DIR, params.data, params.seed)
    classes = list(ckpt["classes"])
    if list(read_classes(DATA_DIR)) != classes:
        raise PipelineError(
            f"{MODEL} was trained on classes {classes} but {DATA_DIR} has {list(read_classes(DATA_DIR))}: "
            "rerun the train stage"
        )
    model = model_from_checkpoint(ckpt)
    device = pick_device(params.train.device)
    images, labels = test_images, np.asarray(test_labels, dtype=np.int64)
    if not len(labels):
        raise PipelineError("the test split is empty: nothing to evaluate")
    logits = batch_logits(model, images, ckpt["mean"], ckpt["std"], device)
    preds, confidences = top_class(logits)

    tta_preds = None
    if params.report.tta:
        mirrored = batch_logits(model, images, ckpt["mean"], ckpt["std"], device, mirror=True)
        tta_preds = flip_tta_logits(logits, mirrored).argmax(axis=1)
    accuracy = per_class_accuracy(labels, preds, classes, tta_preds)
    write_text(REPORTS / "predictions.csv", predictions_csv(labels, preds, confidences, classes))
    write_json(REPORTS / "per_class.json", accuracy)
    # Also as a picture: DVC's interactive one (dvc plots show) needs a browser and the page.
    counts = confusion_counts(labels, preds, len(classes))
    save_figure(REPORTS / "confusion_matrix.png", confusion_matrix(counts, classes), dpi=100)

    picked = pick_misclassified(labels, preds, confidences, params.report.misclassified)
    titles = [f"true: {classes[labels[i]]}\npred: {classes[preds[i]]} ({100 * confidences[i]:.0f}%)" for i in picked]
    wrong = int((preds != labels).sum())
    save_figure(REPORTS / "misclassified.png", misclassified_grid(images[picked], titles, wrong, len(labels)), dpi=100)

    train_metrics = read_json(LIVE_DIR / "metrics.json")
    schedule = lr_schedule(LIVE_DIR, ckpt["epoch"])
    figure = metrics_curves(training_curves(LIVE_DIR), schedule, ckpt["max_lr"])
    save_figure(REPORTS / "metrics_curves.png", figure, dpi=100)

    model = model.cpu()
    write_text(REPORTS / "model_summary.txt", model_summary_text(model))
    num_params = sum(p.numel() for p in model.parameters())
    lr_find = read_json(LR_FIND) if LR_FIND.is_file() else None
    wall_times = stage_wall_times(time.perf_counter() - started)
    text = summary_markdown(ckpt, accuracy, train_metrics, lr_find, num_params, wall_times, str(device))
    write_text(REPORTS / "summary.md", text)
    tta = accuracy.get("test_acc_flip_tta")
    with_tta = f", {tta:.2f}% with flip TTA" if tta is not None else ""
    print(f"test accuracy {accuracy['test_acc']:.2f}% ({wrong} mistakes){with_tta}; wrote {REPORTS}/summary.md")
