"""The LR range test (Smith 2015, as popularised by fastai): train with an exponentially rising learning rate,
record the smoothed loss, and suggest a max LR for One Cycle.

A small loop of our own rather than torch-lr-finder, the usual library: it sees little maintenance (0.2.2 is its
only release since 0.2.1 of 2020) and subclasses torch's private `_LRScheduler`, which torch 2.14 still has but
need not keep. Nor does it do what this stage needs: its smoothing has no bias correction (the first ~1/smooth
points lag the real loss), it offers only the steepest-gradient rule, and it would not run our exact train step
(autocast dtype, channels_last, GradScaler). The loop below is that train step plus a few lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from cifar_pipeline.params import LrFindParams, Params
from cifar_pipeline.stage import PipelineError, save_figure, write_json
from cifar_pipeline.training.engine import loader_batches, make_optimizer, make_scaler, new_model, train_step
from cifar_pipeline.training.loader import prepare_training, set_epoch
from cifar_pipeline.training.runtime import Runtime

# The bias-corrected average still follows single batches over its first points (about 1/smooth of them): their
# slope is noise, so the steepest rule skips them, and a suggestion there means the range starts too late.
SKIP_START = 0.10
# The last points run into the divergence (or the end of the range): skipped alike.
SKIP_END = 0.05
# A curve whose smoothed loss never falls this far below its starting value "never descends".
MIN_DROP = 0.05
SEE = "see reports/lr_find.png"


def _cycle(loader: DataLoader, epoch: int) -> Iterator:
    """Batches of `loader` from its pass `epoch` on, forever: a fresh shuffle and augmentation each pass (the range
    may outlast one epoch)."""
    while True:
        set_epoch(loader, epoch)
        yield from loader_batches(loader)
        epoch += 1


def range_test(
    model: nn.Module,
    loader: DataLoader,
    runtime: Runtime,
    *,
    start_lr: float,
    end_lr: float,
    num_iter: int,
    smooth: float,
    diverge_threshold: float,
    weight_decay: float,
    label_smoothing: float = 0.0,
    first_epoch: int = 0,
) -> dict[str, Any]:
    """Run the test on `model` (which it trains: pass a fresh one), on the batches of `loader`'s passes from
    `first_epoch` on. Returns lr, loss (smoothed), raw_loss, diverged.

    The LR of step i is start_lr * (end_lr / start_lr) ** (i / (num_iter - 1)). The loss is an exponential moving
    average with weight `smooth` on the newest batch, bias-corrected like Adam's moments so it starts at the first
    batch's loss instead of at 0. The test stops early once that average exceeds `diverge_threshold` times its
    lowest value, or a loss is nan/inf.
    """
    model.train()
    optimizer = make_optimizer(model, start_lr, weight_decay, runtime)
    scaler = make_scaler(runtime)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)  # the loss training will minimise
    lrs: list[float] = []
    losses: list[float] = []
    raw_losses: list[float] = []
    best, diverged = math.inf, False
    batches = _cycle(loader, first_epoch)
    for i in range(num_iter):
        images, labels = runtime.to_device(*next(batches))
        lr = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, _ = train_step(model, images, labels, optimizer, loss_fn, scaler, runtime)
        raw = loss.item()  # one sync per step: the early stop needs the value now
        if not math.isfinite(raw):
            diverged = True
            break
        raw_losses.append(raw)
        smoothed = debiased_average(raw_losses, smooth)[-1]  # 200 steps: recomputing it costs microseconds
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge_threshold * best:
            diverged = True
            break
    return {"lr": lrs, "loss": losses, "raw_loss": raw_losses, "diverged": diverged}


def debiased_average(raw_losses: list[float], smooth: float) -> list[float]:
    """The moving average range_test records as "loss" (weight `smooth` on the newest point, bias-corrected)."""
    average, out = 0.0, []
    for i, raw in enumerate(raw_losses):
        average = (1 - smooth) * average + smooth * raw
        out.append(average / (1 - (1 - smooth) ** (i + 1)))
    return out


def mean_curve(results: list[dict[str, Any]], smooth: float) -> dict[str, Any]:
    """Range tests of the same LRs averaged step by step, up to where the first of them stopped: the raw losses are
    averaged, then smoothed as one test's are. Diverged if that shortest test diverged."""
    shortest = min(results, key=lambda result: len(result["lr"]))
    steps = len(shortest["lr"])
    raw = np.mean([result["raw_loss"][:steps] for result in results], axis=0).tolist()
    return {
        "lr": shortest["lr"],
        "loss": debiased_average(raw, smooth),
        "raw_loss": raw,
        "diverged": shortest["diverged"],
    }


def run_range_test(params: Params) -> dict[str, Any]:
    """The lr-find stage's test: a fresh model, trained on the same batches as the train stage will see.

    With lr_find.repeats > 1 the test runs that many times, each from a fresh model (seeds seed, seed + 1, ...) on
    batches of its own (the loader's next passes), and the curves are averaged step by step (mean_curve): one test's
    pick moves several-fold with the seed (docs/pipeline.md: the LR range test). The first test is the single test's.
    """
    start = prepare_training(params)
    runtime, splits, loader = start.runtime, start.splits, start.loader
    cfg = params.lr_find
    passes = math.ceil(cfg.num_iter / len(loader))  # of the loader, per test
    steps = f"{cfg.num_iter} steps from {cfg.start_lr:g} to {cfg.end_lr:g}"
    results = []
    for i in range(cfg.repeats):
        of = f" ({i + 1} of {cfg.repeats})" if cfg.repeats > 1 else ""
        print(f"LR range test{of}: {steps} on {runtime.device}", flush=True)
        results.append(
            range_test(
                new_model(params.model, params.seed + i, runtime, len(splits.classes)),
                loader,
                runtime,
                start_lr=cfg.start_lr,
                end_lr=cfg.end_lr,
                num_iter=cfg.num_iter,
                smooth=cfg.smooth,
                diverge_threshold=cfg.diverge_threshold,
                weight_decay=params.train.weight_decay,
                label_smoothing=params.train.label_smoothing,
                first_epoch=i * passes,
            )
        )
    return mean_curve(results, cfg.smooth)  # of one test: that test


def _longest_descent(losses: list[float]) -> tuple[int, int]:
    """(length, last index) of the longest strictly decreasing subsequence of `losses` (O(n^2); n is small)."""
    length = [1] * len(losses)  # of the longest decreasing subsequence ending at i
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[j] > losses[i] and length[j] + 1 > length[i]:
                length[i] = length[j] + 1
    last = max(range(len(losses)), key=length.__getitem__)  # the first of equals
    return length[last], last


def centred_average(raw_losses: list[float], smooth: float) -> np.ndarray:
    """Each raw loss replaced by the mean of those within round(1 / (2 * smooth)) points either side (fewer at the
    ends of the curve, and at most a tenth of the curve either side, so that a short range test keeps its shape).

    It averages about as many points as the moving average (weight `smooth`) does, but centred: that average lags
    the loss by (1 - smooth) / smooth points (19 at 0.05: 0.75 decades of LR at the default 25 points a decade),
    which moves its lowest point to a higher LR. A median would be more robust to single bad batches, but it
    flattens the bottom of a V into a plateau whose first point lies half a window below the true lowest point.
    """
    raw = np.asarray(raw_losses, dtype=float)
    half = max(1, min(round(1 / (2 * smooth)), len(raw) // 10))
    return np.array([raw[max(0, i - half) : i + half + 1].mean() for i in range(len(raw))])


@dataclass(frozen=True)
class Curve:
    """A range test's curve as the rules read it, and the part of it (lo..hi-1) a suggestion may come from."""

    lrs: list[float]
    losses: list[float]  # the bias-corrected moving average
    raw: list[float]  # the loss of each batch
    lo: int
    hi: int
    diverged: bool
    cfg: LrFindParams

    def lowest(self, losses: list[float] | np.ndarray) -> int:
        """Index of the lowest of `losses`, refused where the range test was too short at either end."""
        lowest = int(np.argmin(losses))
        if lowest <= self.lo:
            raise PipelineError(
                f"the loss was lowest at the low end of the LR range test (lr {self.lrs[lowest]:.3g}) and rose after: "
                f"set a lower lr_find.start_lr (now {self.cfg.start_lr:g}) in params.yaml ({SEE})"
            )
        if lowest >= self.hi - 1 and not self.diverged:
            raise PipelineError(
                f"the loss was still falling at the end of the LR range test (lowest at lr {self.lrs[lowest]:.3g}): "
                f"set a higher lr_find.end_lr (now {self.cfg.end_lr:g}) in params.yaml ({SEE})"
            )
        return lowest

    def lr_at(self, index: int) -> float:
        """The LR at `index`, refused at either end of the range: there the curve says the range was too short."""
        rule, lr = self.cfg.rule, self.lrs[index]
        if index <= self.lo:
            raise PipelineError(
                f"the {rule} point of the LR range test is at the low end of the range (lr {lr:.3g}): the loss "
                f"was already falling fast at the first LRs. Set a lower lr_find.start_lr (now {self.cfg.start_lr:g}) "
                f"in params.yaml ({SEE})"
            )
        if index >= self.hi - 1 and not self.diverged:
            raise PipelineError(
                f"the {rule} point of the LR range test is at the high end of the range (lr {lr:.3g}): the loss "
                f"was still falling at the last LRs. Set a higher lr_find.end_lr (now {self.cfg.end_lr:g}) in "
                f"params.yaml ({SEE})"
            )
        return float(lr)


def descent_end(curve: Curve) -> float:
    """Smith's rule for cyclical schedules: the max LR is where the loss stops falling, divided by lr_find.divisor.
    Read off the centred curve: the lagging moving average would put that point most of a decade too high."""
    return curve.lr_at(curve.lowest(centred_average(curve.raw, curve.cfg.smooth))) / curve.cfg.divisor


def minimum(curve: Curve) -> float:
    """fastai's "minimum": a tenth of the LR of the lowest loss, a step back from where training turns unstable."""
    lr = curve.lrs[curve.lowest(curve.losses)]
    if lr / 10 < curve.cfg.start_lr:
        raise PipelineError(
            f"a tenth of the LR of the lowest loss ({lr:.3g}) is below the range test's start: set a lower "
            f"lr_find.start_lr (now {curve.cfg.start_lr:g}) in params.yaml ({SEE})"
        )
    return float(lr) / 10


def steepest(curve: Curve) -> float:
    """The most negative slope of the smoothed loss against log10(lr), on the descent only: past the lowest loss,
    a dip in the noisy climb is no place to train at."""
    end = min(curve.hi, curve.lowest(curve.losses) + 1)
    slope = np.gradient(np.asarray(curve.losses), np.log10(np.asarray(curve.lrs)))
    return curve.lr_at(curve.lo + int(np.argmin(slope[curve.lo : end])))


def valley(curve: Curve) -> float:
    """fastai's rule: about halfway along the longest stretch over which the loss keeps falling. As fastai, the
    valley starts as many points before its end as the subsequence is long, so noise picked up in the flat start
    of the curve does not drag the valley's start back to the first LRs."""
    curve.lowest(curve.losses)  # the same refusals as the other rules
    length, last = _longest_descent(curve.losses)
    first = max(0, last - length)
    third = (last - first) / 3
    return curve.lr_at(first + int(third) + int(third / 2))


# lr_find.rule -> the function that turns the curve into a max LR (choices.LR_RULES names them).
RULES: dict[str, Callable[[Curve], float]] = {
    "descent_end": descent_end,
    "steepest": steepest,
    "valley": valley,
    "minimum": minimum,
}


def suggest_lr(result: dict[str, Any], cfg: LrFindParams) -> float:
    """The suggested max LR by `cfg.rule`, or a PipelineError saying which end of the range to widen."""
    lrs, losses, diverged = result["lr"], result["loss"], result["diverged"]
    # The points a suggestion may come from, counted on the planned range so a diverged run keeps the same margins.
    lo, hi = math.ceil(SKIP_START * cfg.num_iter), len(lrs) - math.ceil(SKIP_END * cfg.num_iter)
    if hi - lo < 5:
        where = f" at lr {lrs[-1]:.3g}" if lrs else ""
        raise PipelineError(
            f"the LR range test diverged after {len(lrs)} of {cfg.num_iter} iterations{where}, before the loss could "
            f"fall: set a lower lr_find.start_lr (now {cfg.start_lr:g}) in params.yaml ({SEE})"
        )
    start = float(np.mean(losses[: max(1, lo)]))
    if min(losses) > (1 - MIN_DROP) * start:
        if diverged:
            fix = f"set a lower lr_find.start_lr (now {cfg.start_lr:g}) in params.yaml"
        else:
            fix = f"set a higher lr_find.end_lr (now {cfg.end_lr:g}) in params.yaml, or check that the labels are "
            fix += "learnable"
        raise PipelineError(
            f"the smoothed loss never fell by {MIN_DROP:.0%} between lr {lrs[0]:.3g} and {lrs[-1]:.3g}"
            f"{' before it diverged' if diverged else ''}: {fix} ({SEE})"
        )
    return RULES[cfg.rule](Curve(lrs, losses, result["raw_loss"], lo, hi, diverged, cfg))


def save_results(
    path: str | Path, result: dict[str, Any], suggested: float | None, rule: str, num_iter: int, repeats: int = 1
) -> None:
    """reports/lr_find.json: the curve (the mean of `repeats` tests) as a list of records under "curve" (the shape
    `dvc plots` draws), and the suggestion beside it.

    No wall time in it: the train stage depends on this file, and a time that differs on every rerun would make DVC
    rerun training even when the curve and the suggestion are the same (the stage writes its time to a file of its
    own, reports/lr_find_time.json).
    """
    curve = [
        {"lr": lr, "loss": loss, "raw_loss": raw}
        for lr, loss, raw in zip(result["lr"], result["loss"], result["raw_loss"], strict=True)
    ]
    write_json(
        path,
        {
            "suggested_lr": suggested,
            "rule": rule,
            "num_iter": num_iter,
            "num_iter_run": len(curve),
            "repeats": repeats,
            "diverged": result["diverged"],
            "curve": curve,
        },
    )


def save_plot(path: str | Path, result: dict[str, Any], suggested: float | None, cfg: LrFindParams) -> None:
    """Loss against LR on a log axis: per batch, the moving average, the centred average (what descent_end reads),
    and the suggestion marked by a vertical line and its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    per_batch = "loss per batch" + (f" (mean of {cfg.repeats} tests)" if cfg.repeats > 1 else "")
    ax.plot(result["lr"], result["raw_loss"], color="tab:blue", alpha=0.25, linewidth=0.8, label=per_batch)
    ax.plot(result["lr"], result["loss"], color="tab:blue", linewidth=2, label="moving average (lags)")
    centred = centred_average(result["raw_loss"], cfg.smooth) if result["raw_loss"] else np.array([])
    if len(centred):
        ax.plot(result["lr"], centred, color="tab:green", linewidth=1.5, label="centred average (no lag)")
    if suggested is not None:
        rule = cfg.rule + (f", divisor {cfg.divisor:g}" if cfg.rule == "descent_end" and cfg.divisor != 1 else "")
        ax.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested max LR {suggested:.3g} ({rule})")
        ax.annotate(
            f"{suggested:.3g}",
            xy=(suggested, 0.97),
            xycoords=("data", "axes fraction"),
            xytext=(4, 0),
            textcoords="offset points",
            color="tab:red",
            va="top",
        )
    if result["loss"]:
        # Keep the divergence from squashing the interesting part of the curve.
        low = min(min(result["loss"]), float(centred.min()))
        start = max(result["loss"][: max(1, len(result["loss"]) // 10)])
        ax.set_ylim(low - 0.1 * (start - low + 1e-3), max(start, low) + 0.5 * (start - low + 1e-3))
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss (cross-entropy)")
    title = "LR range test" + (" (stopped early: the loss diverged)" if result["diverged"] else "")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.grid(alpha=0.1, which="minor")
    ax.legend(loc="best")
    save_figure(path, fig, dpi=120)
