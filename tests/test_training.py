"""The training recipe (training/engine.py) and the train run (training/train.py), in process, tiny model, CPU."""

from __future__ import annotations

import copy
import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dvc_plot_values
from torch import nn

from cifar_pipeline.data.dataset import normalizer
from cifar_pipeline.params import AugmentParams, ModelParams, TrainParams, parse_params
from cifar_pipeline.stage import MissingInputError, PipelineError
from cifar_pipeline.training import engine, resume
from cifar_pipeline.training import train as training
from cifar_pipeline.training.loader import (
    CifarDataset,
    DeviceBatches,
    make_eval_loader,
    make_loader,
    make_train_loader,
    set_epoch,
)
from cifar_pipeline.training.runtime import Runtime, make_runtime, pick_device, seed_everything

CPU = Runtime(torch.device("cpu"))
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
TIMING = ("epoch_time_s", "images_per_s", "wall_time_s")


def colour_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy data: each class is a distinct colour plus pixel noise."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    palette = np.array([[(c * 53) % 176 + 40, (c * 97) % 176 + 40, (c * 29) % 176 + 40] for c in range(10)])
    images = palette[labels][:, None, None, :] + rng.normal(0, 30, size=(n, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def loader(
    n: int,
    batch_size: int,
    train: bool,
    seed: int = 0,
    workers: int = 0,
    backend: str = "albumentations",
    full_batches: bool = False,
):
    """Unaugmented batches of colour_images; the gpu backend's (augmented when training) on the CPU."""
    images, labels = colour_images(n, seed)
    if backend == "gpu":
        options = {"batch_size": batch_size, "seed": 0, "num_workers": 0, "device": CPU.device}
        if train:
            augment = AugmentParams(backend="gpu")
            return make_train_loader(
                images, labels, augment, MEAN, STD, backend="gpu", full_batches=full_batches, **options
            )
        return make_eval_loader(images, labels, MEAN, STD, backend="gpu", **options)
    dataset = CifarDataset(images, labels, None, 0)
    uint8_batches = make_loader(dataset, batch_size, train, workers, 0, False, full_batches)
    return DeviceBatches(uint8_batches, normalizer(MEAN, STD, CPU.device), CPU.device)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),  # draws from the global RNG: resuming must restore it
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def run_fit(
    tmp_path: Path, train: TrainParams, *, val=False, fingerprint="f", model=None, loading=None, images=40, **kwargs
):
    loading = loading or {}  # loader() options: workers, backend
    eval_loaders = {"val": loader(20, 10, False, seed=2, **loading)} if val else {}
    eval_loaders["test"] = loader(20, 10, False, seed=1, **loading)
    full_batches = bool(train.compile)
    return training.fit(
        model or tiny_model(),
        loader(images, 10, True, full_batches=full_batches, **loading),
        eval_loaders,
        train,
        CPU,
        max_lr=kwargs.pop("max_lr", 0.05),
        max_lr_source="params",
        run_fingerprint=fingerprint,
        checkpoint_extra={
            "model_name": "tiny",
            "model_kwargs": {},
            "batch_size": 10,
            "mean": list(MEAN),
            "std": list(STD),
            "classes": [str(i) for i in range(10)],
        },
        root=tmp_path,
        **kwargs,
    )


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def outputs(root: Path) -> dict:
    """Everything a run leaves behind that must not depend on timing: metrics, curves, weights."""
    metrics = json.loads((root / "reports/train/metrics.json").read_text())
    for key in TIMING:
        metrics.pop(key, None)
    curves = {
        str(p.relative_to(root)): p.read_text()
        for p in sorted((root / "reports/train/plots").rglob("*.*"))
        if p.stem not in TIMING
    }
    weights = {
        name: torch.load(root / "models" / name, weights_only=True)["state_dict"] for name in ("model.pt", "best.pt")
    }
    return {"metrics": metrics, "curves": curves, "weights": weights}


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    assert a["curves"] == b["curves"]
    for name in a["weights"]:
        assert a["weights"][name].keys() == b["weights"][name].keys()
        for key, tensor in a["weights"][name].items():
            assert torch.equal(tensor, b["weights"][name][key]), f"{name}: {key} differs"


# --- engine -------------------------------------------------------------------------------------------------------


def test_pick_device_auto_and_explicit():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pick_device_refuses_a_missing_device():
    with pytest.raises(PipelineError, match="train.device"):
        pick_device("cuda")


@pytest.mark.parametrize("hardware", [True, False])
def test_auto_precision_on_a_cpu_is_bf16_with_bf16_hardware_and_fp32_without(monkeypatch, hardware):
    monkeypatch.setattr("cifar_pipeline.training.runtime.cpu_has_native_bf16", lambda: hardware)
    runtime = make_runtime(TrainParams(device="cpu"))
    assert runtime == Runtime(torch.device("cpu"), torch.bfloat16 if hardware else None, True)


def test_cpu_runtime_precision_as_asked():
    runtime = make_runtime(TrainParams(device="cpu", precision="fp32", channels_last=False))
    assert runtime == Runtime(torch.device("cpu"), None, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CI machine may lack bf16 hardware: that is only a warning
        runtime = make_runtime(TrainParams(device="cpu", precision="bf16"))
    assert runtime.amp_dtype == torch.bfloat16


def test_cpu_bf16_without_hardware_support_warns(monkeypatch):
    monkeypatch.setattr("cifar_pipeline.training.runtime.cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 hardware"):
        make_runtime(TrainParams(device="cpu", precision="bf16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fp16_off_cuda_is_refused_with_the_key():
    with pytest.raises(PipelineError, match="train.precision fp16 needs CUDA"):
        make_runtime(TrainParams(device="cpu", precision="fp16"))


def test_cpu_bf16_step_matches_fp32_closely_and_leaves_fp32_weights():
    """bf16 autocast on the CPU trains the same model: fp32 weights and grads, a loss close to fp32's."""
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    losses = {}
    for dtype in (None, torch.bfloat16):
        runtime = Runtime(torch.device("cpu"), dtype, True)
        model = engine.new_model(ModelParams(name="dilated_net"), 0, runtime, 10)
        optimizer = engine.make_optimizer(model, 1e-3, 0.0, runtime)
        loss, logits = engine.train_step(
            model,
            *runtime.to_device(images, labels),
            optimizer,
            nn.CrossEntropyLoss(),
            engine.make_scaler(runtime),
            runtime,
        )
        losses[dtype] = loss.item()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert logits.dtype == (dtype or torch.float32)
    assert losses[torch.bfloat16] == pytest.approx(losses[None], rel=0.02)


@pytest.mark.parametrize(("epochs", "peak_epoch", "steps"), [(4, 2, 5), (3, 3, 4), (1, 1, 6)])
def test_one_cycle_peaks_at_the_end_of_peak_epoch_and_returns_to_the_start(epochs, peak_epoch, steps):
    model = nn.Linear(2, 2)
    optimizer = engine.make_optimizer(model, 0.01, 0.0, CPU)
    scheduler = engine.make_scheduler(optimizer, 1.0, epochs, steps, peak_epoch, div_factor=100.0)
    lrs = []
    for _ in range(epochs * steps):  # what train_epoch does per batch, including not stepping past the end
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler.last_epoch + 1 < scheduler.total_steps:
            scheduler.step()
    assert int(np.argmax(lrs)) == peak_epoch * steps - 1
    assert max(lrs) == pytest.approx(1.0, rel=1e-12)
    assert lrs[0] == pytest.approx(0.01, rel=1e-12)
    if peak_epoch < epochs:
        assert lrs[-1] == pytest.approx(0.01, rel=1e-9)  # back to the start, no lower
    assert min(lrs) == pytest.approx(0.01, rel=1e-9)


def test_train_epoch_is_deterministic_on_the_cpu_and_learns():
    def run():
        seed_everything(0)
        model = tiny_model()
        optimizer = engine.make_optimizer(model, 0.05, 1e-4, CPU)
        scheduler = engine.make_scheduler(optimizer, 0.05, 3, 4, 1, 10.0)
        data = loader(40, 10, True)
        stats = []
        for epoch in range(3):
            set_epoch(data, epoch)
            stats.append(engine.train_epoch(model, data, optimizer, scheduler, engine.make_scaler(CPU), CPU))
        return model, stats

    (model_a, stats_a), (model_b, stats_b) = run(), run()
    assert [(s.loss, s.acc, s.lrs) for s in stats_a] == [(s.loss, s.acc, s.lrs) for s in stats_b]
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert stats_a[-1].loss < stats_a[0].loss
    assert stats_a[0].images == 40 and len(stats_a[0].lrs) == 4


def test_the_weight_average_is_the_hand_computed_ema_of_the_weights_after_each_step():
    """train.ema: after step 1 the average is the weights; after step 2, decay * step 1's + (1 - decay) * step 2's.
    Batch norm's running statistics are averaged alike."""
    model = tiny_model()
    optimizer = engine.make_optimizer(model, 0.05, 0.0, CPU)
    scheduler = engine.make_scheduler(optimizer, 0.05, 1, 2, 1, 10.0)
    after_step = []
    optimizer.register_step_post_hook(lambda *_: after_step.append(copy.deepcopy(model.state_dict())))
    ema = engine.make_ema(model, 0.9)
    engine.train_epoch(model, loader(20, 10, True), optimizer, scheduler, engine.make_scaler(CPU), CPU, ema=ema)
    assert len(after_step) == 2
    first, second = after_step
    for key in ("0.weight", "1.bias", "6.weight", "1.running_mean", "1.running_var"):
        expected = 0.9 * first[key] + 0.1 * second[key]
        assert torch.allclose(ema.module.state_dict()[key], expected, rtol=1e-6, atol=1e-7), key
        assert not torch.allclose(expected, second[key]), key  # the average is not the last weights
    assert int(ema.n_averaged) == 2


def test_label_smoothing_is_the_training_loss():
    """train.label_smoothing: the loss of a one-batch epoch is CrossEntropyLoss(label_smoothing) of the weights
    before the step."""
    data = loader(10, 10, True)
    images, labels = next(iter(data))
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))  # no dropout: the loss is a plain function
    with torch.no_grad():
        smoothed = nn.functional.cross_entropy(linear(images), labels, label_smoothing=0.3).item()
        plain = nn.functional.cross_entropy(linear(images), labels).item()
    optimizer = engine.make_optimizer(linear, 0.01, 0.0, CPU)
    scheduler = engine.make_scheduler(optimizer, 0.01, 3, 1, 2, 10.0)  # One Cycle's shortest
    stats = engine.train_epoch(linear, data, optimizer, scheduler, engine.make_scaler(CPU), CPU, label_smoothing=0.3)
    assert stats.loss == pytest.approx(smoothed, rel=1e-6) and abs(smoothed - plain) > 0.01


def test_fit_trains_with_label_smoothing_and_evaluates_the_plain_loss(tmp_path):
    """fit hands train.label_smoothing to the training loss; the test loss stays plain cross-entropy."""

    def linear() -> nn.Module:  # no dropout: the loss is a plain function of the weights
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

    train = TrainParams(epochs=3, peak_epoch=2, device="cpu", label_smoothing=0.3)  # One Cycle's shortest
    summary = run_fit(tmp_path, train, images=10, max_lr=1e-6, model=linear())
    images, labels = next(iter(loader(10, 10, True)))  # the one batch, in some order
    with torch.no_grad():
        expected = nn.functional.cross_entropy(linear()(images), labels, label_smoothing=0.3).item()
    first_epoch = read_tsv(tmp_path / "reports/train/plots/metrics/train/loss.tsv")[0]
    assert float(first_epoch["loss"]) == pytest.approx(expected, rel=1e-5)
    test_images, test_labels = (torch.cat(parts) for parts in zip(*loader(20, 10, False, seed=1), strict=True))
    trained = linear()
    trained.load_state_dict(torch.load(tmp_path / "models/model.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        plain = nn.functional.cross_entropy(trained(test_images), test_labels).item()
    assert summary["test"]["loss"] == pytest.approx(plain, rel=1e-5)


def test_fit_with_ema_evaluates_both_weights_and_saves_the_average(tmp_path, capsys):
    train = TrainParams(epochs=3, peak_epoch=1, device="cpu", ema=0.5)
    summary = run_fit(tmp_path, train)
    assert set(summary["ema"]["test"]) == {"loss", "acc"} and set(summary["test"]) == {"loss", "acc"}
    tsv = tmp_path / "reports/train/plots/metrics"
    ema_accs = [float(r["acc"]) for r in read_tsv(tsv / "ema/test/acc.tsv")]
    assert len(ema_accs) == 3 and len(read_tsv(tsv / "test/acc.tsv")) == 3
    assert summary["best"]["test_acc"] == max(ema_accs)  # the average's accuracy picks the best epoch
    final = torch.load(tmp_path / "models/model.pt", weights_only=True)
    assert final["weights"] == "EMA of the trained weights, decay 0.5"
    assert final["test_acc"] == ema_accs[-1] and final["train_acc"] == summary["train"]["acc"]
    # The saved weights are the average's: evaluating them gives the average's logged accuracy.
    model = tiny_model()
    model.load_state_dict(final["state_dict"])
    assert engine.evaluate(model, loader(20, 10, False, seed=1), CPU) == pytest.approx(
        (summary["ema"]["test"]["loss"], summary["ema"]["test"]["acc"])
    )
    assert "ema/test loss" in capsys.readouterr().out


def test_evaluate_matches_a_plain_computation():
    model = tiny_model().eval()
    data = loader(20, 8, False)
    loss, acc = engine.evaluate(model, data, CPU)
    images = torch.cat([x for x, _ in data])
    labels = torch.cat([y for _, y in data])
    with torch.no_grad():
        logits = model(images)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert acc == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())


def test_a_nan_loss_stops_with_the_step_and_learning_rate_in_the_message():
    images, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    images[25] = float("nan")  # poisons the third batch of 10
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=10)
    model = tiny_model()
    optimizer = engine.make_optimizer(model, 0.001, 0.0, CPU)
    scheduler = engine.make_scheduler(optimizer, 0.01, 1, 4, 1, 10.0)
    lrs = [0.001 + i * 0.003 for i in range(4)]  # the linear warm-up over 4 steps
    with pytest.raises(PipelineError) as error:
        engine.train_epoch(model, data, optimizer, scheduler, engine.make_scaler(CPU), CPU, desc="epoch 1")
    message = str(error.value)
    assert "nan" in message and "epoch 1, step 3 of 4" in message
    assert f"learning rate {lrs[2]:.4g}" in message and "train.max_lr" in message


# --- the train run ------------------------------------------------------------------------------------------------


def test_resolve_max_lr(tmp_path):
    path = tmp_path / "lr_find.json"
    assert training.resolve_max_lr(0.3, path) == (0.3, "params")
    with pytest.raises(MissingInputError, match="lr-find"):
        training.resolve_max_lr("auto", path)
    path.write_text(json.dumps({"suggested_lr": 0.0123, "curve": []}))
    assert training.resolve_max_lr("auto", path) == (0.0123, "lr-find")
    path.write_text(json.dumps({"suggested_lr": None}))
    with pytest.raises(PipelineError, match="suggested_lr"):
        training.resolve_max_lr("auto", path)


def test_fingerprint_follows_params_and_inputs_but_not_workers(tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text('{"mean": [0.5]}')
    base = parse_params({})
    same = resume.fingerprint(base, 0.1, [stats])
    assert resume.fingerprint(parse_params({"data": {"num_workers": 3}}), 0.1, [stats]) == same
    assert resume.fingerprint(parse_params({"train": {"epochs": 5}}), 0.1, [stats]) != same
    assert resume.fingerprint(base, 0.2, [stats]) != same
    stats.write_text('{"mean": [0.6]}')
    assert resume.fingerprint(base, 0.1, [stats]) != same


def test_fingerprint_follows_the_package_source_but_not_where_it_lies(tmp_path):
    """A run killed under old code must not be resumed by new code; a clone moved elsewhere may resume."""
    base = parse_params({})
    code = tmp_path / "moved" / "cifar_pipeline"
    shutil.copytree(resume.PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__"))
    same = resume.fingerprint(base, 0.1, [])
    assert resume.fingerprint(base, 0.1, [], code_dir=code) == same
    model_file = code / "models" / "__init__.py"
    model_file.write_text(model_file.read_text() + "\n# an edit\n")
    assert resume.fingerprint(base, 0.1, [], code_dir=code) != same


@pytest.mark.parametrize(
    ("edited", "voids"),
    [
        ("report/report.py", False),
        ("use/cli.py", False),
        ("stage.py", False),
        ("training/engine.py", True),
        ("training/train.py", True),
        ("training/loader.py", True),
        ("data/download.py", True),
    ],
)
def test_the_fingerprint_covers_exactly_the_train_stages_code(tmp_path, edited, voids):
    """An edit of code the train stage does not run (the report's, the commands') keeps a killed run's resume state;
    an edit of the code it runs voids it."""
    base = parse_params({})
    code = tmp_path / "cifar_pipeline"
    shutil.copytree(resume.PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__"))
    same = resume.fingerprint(base, 0.1, [], code_dir=code)
    (code / edited).write_text((code / edited).read_text() + "\n# an edit\n")
    assert (resume.fingerprint(base, 0.1, [], code_dir=code) != same) is voids


def test_fit_logs_every_metric_and_the_one_cycle_schedule(tmp_path, capsys):
    train = TrainParams(epochs=3, peak_epoch=2, div_factor=10.0, device="cpu")
    summary = run_fit(tmp_path, train, max_lr=0.05)
    steps_per_epoch = 4  # 40 images, batch 10

    metrics = json.loads((tmp_path / "reports/train/metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    assert metrics["step"] == 3
    assert metrics["max_lr"] == 0.05 and metrics["max_lr_source"] == "params"
    assert set(metrics["best"]) == {"test_acc", "epoch"}
    assert metrics["wall_time_s"] > 0
    tsv = tmp_path / "reports/train/plots/metrics"
    for name in ("train/loss", "train/acc", "test/loss", "test/acc", "lr", "epoch_time_s", "images_per_s"):
        rows = read_tsv(tsv / f"{name}.tsv")
        assert [int(r["step"]) for r in rows] == [1, 2, 3], name
        summary_value = metrics
        for key in name.split("/"):  # DVCLive nests 'train/loss' as train -> loss
            summary_value = summary_value[key]
        assert float(rows[-1][key]) == pytest.approx(summary_value), name  # the summary holds the last epoch
    assert not (tsv / "val").exists()
    accs = [float(r["acc"]) for r in read_tsv(tsv / "test/acc.tsv")]
    assert metrics["best"]["test_acc"] == max(accs) and metrics["best"]["epoch"] == accs.index(max(accs)) + 1
    assert 0 <= metrics["test"]["acc"] <= 100

    records = json.loads((tmp_path / "reports/train/plots/custom/lr_schedule.json").read_text())
    assert [r["step"] for r in records] == list(range(3 * steps_per_epoch))
    lrs = [r["lr"] for r in records]
    assert int(np.argmax(lrs)) == 2 * steps_per_epoch - 1
    assert max(lrs) == pytest.approx(0.05)
    assert lrs[0] == pytest.approx(0.005) and lrs[-1] == pytest.approx(0.005)
    epoch_lrs = [float(r["lr"]) for r in read_tsv(tsv / "lr.tsv")]
    assert epoch_lrs == [lrs[steps_per_epoch - 1], lrs[2 * steps_per_epoch - 1], lrs[-1]]

    out = capsys.readouterr().out
    assert "epoch 1/3" in out and "epoch 3/3" in out and "test loss" in out
    assert not (tmp_path / ".resume/train.pt").exists()

    for name in ("model.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "models" / name, weights_only=True)
        assert ckpt["max_lr"] == 0.05 and ckpt["max_lr_source"] == "params"
        assert ckpt["device"] == "cpu" and ckpt["batch_size"] == 10 and ckpt["classes"][0] == "0"
        assert {"optimizer", "scheduler", "loss", "mean", "std", "train_acc", "test_acc"} <= ckpt.keys()
    assert torch.load(tmp_path / "models/model.pt", weights_only=True)["epoch"] == 3
    assert torch.load(tmp_path / "models/best.pt", weights_only=True)["epoch"] == metrics["best"]["epoch"]


def test_fit_with_a_validation_split_picks_the_best_by_validation(tmp_path):
    summary = run_fit(tmp_path, TrainParams(epochs=2, peak_epoch=1, device="cpu"), val=True)
    assert set(summary["best"]) == {"val_acc", "epoch"}
    assert set(summary["val"]) == {"loss", "acc"}
    rows = read_tsv(tmp_path / "reports/train/plots/metrics/val/acc.tsv")
    assert max(float(r["acc"]) for r in rows) == summary["best"]["val_acc"]
    best = torch.load(tmp_path / "models/best.pt", weights_only=True)
    assert best["val_acc"] == summary["best"]["val_acc"] and best["epoch"] == summary["best"]["epoch"]


class Interrupt(Exception):
    pass


def interrupt_in_epoch(monkeypatch, epoch: int) -> None:
    """Make fit stop during `epoch`'s evaluation, after the previous epoch's resume state was saved."""
    calls = {"n": 0}
    evaluate = engine.evaluate

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise Interrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", failing)


# With workers, the loaders' iterators are made once (persistent workers): in the uninterrupted run in epoch 1,
# in the resumed one in epoch 2. Their seed draw must not shift the dropout masks.
@pytest.mark.parametrize("loading", [{"workers": 0}, {"workers": 1}, {"backend": "gpu"}])
def test_an_interrupted_fit_resumes_to_the_same_result(tmp_path, monkeypatch, capsys, loading):
    train = TrainParams(epochs=3, peak_epoch=1, device="cpu")
    seed_everything(0)
    run_fit(tmp_path / "whole", train, loading=loading)

    seed_everything(0)
    interrupt_in_epoch(monkeypatch, 2)
    with pytest.raises(Interrupt):
        run_fit(tmp_path / "cut", train, loading=loading)
    assert torch.load(tmp_path / "cut/.resume/train.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()

    seed_everything(0)
    # Other initial weights and RNG state: both must come from the resume state.
    run_fit(tmp_path / "cut", train, model=tiny_model(seed=123), loading=loading)
    assert "resuming after epoch 1 of 3" in capsys.readouterr().out
    assert not (tmp_path / "cut/.resume/train.pt").exists()
    assert_same_outputs(outputs(tmp_path / "whole"), outputs(tmp_path / "cut"))


def test_an_interrupted_fit_with_ema_resumes_to_the_same_result(tmp_path, monkeypatch, capsys):
    """The resume state carries the weight average: a killed run ends with the same average as an uninterrupted one."""
    train = TrainParams(epochs=3, peak_epoch=1, device="cpu", ema=0.7)
    seed_everything(0)
    run_fit(tmp_path / "whole", train)

    seed_everything(0)
    interrupt_in_epoch(monkeypatch, 3)  # two evaluations an epoch (trained weights, average): epoch 2's first
    with pytest.raises(Interrupt):
        run_fit(tmp_path / "cut", train)
    assert torch.load(tmp_path / "cut/.resume/train.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()

    seed_everything(0)
    run_fit(tmp_path / "cut", train, model=tiny_model(seed=123))
    assert "resuming after epoch 1 of 3" in capsys.readouterr().out
    whole, cut = outputs(tmp_path / "whole"), outputs(tmp_path / "cut")
    assert "ema" in whole["metrics"]
    assert_same_outputs(whole, cut)


def test_a_kill_while_an_epochs_files_are_written_resumes_from_the_epoch_before(tmp_path, monkeypatch, capsys):
    """The files go out on a background thread: a run killed while epoch 2's are written has epoch 1's resume state
    on disk, and best.pt may already be epoch 2's (it is written first). It still ends as an uninterrupted run."""
    train = TrainParams(epochs=4, peak_epoch=1, device="cpu")
    seed_everything(0)
    run_fit(tmp_path / "whole", train, max_lr=0.01)  # the test accuracy improves in epochs 1, 2 and 3

    save = resume.save_plain

    def killed_at_epoch_2(path, obj):
        if path.name == "train.pt" and obj["epoch"] == 2:
            raise Interrupt  # dies before the resume state is renamed into place
        save(path, obj)

    monkeypatch.setattr(resume, "save_plain", killed_at_epoch_2)
    seed_everything(0)
    with pytest.raises(Interrupt):  # raised on the training thread at the next epoch's snapshot
        run_fit(tmp_path / "cut", train, max_lr=0.01)
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut/.resume/train.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "cut/.resume/best.pt", weights_only=True)["epoch"] == 2  # newer than the state
    assert not (tmp_path / "cut/models/model.pt").exists()
    capsys.readouterr()

    seed_everything(0)
    run_fit(tmp_path / "cut", train, model=tiny_model(seed=123), max_lr=0.01)
    assert "resuming after epoch 1 of 4" in capsys.readouterr().out
    assert not (tmp_path / "cut/.resume/train.pt").exists()
    assert_same_outputs(outputs(tmp_path / "whole"), outputs(tmp_path / "cut"))


class ShapeRecorder(nn.Module):
    """Stands in for torch.compile's module: records the shape of every batch the train step gives it."""

    def __init__(self, model: nn.Module, shapes: list) -> None:
        super().__init__()
        self.model, self.shapes = model, shapes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(images.shape))
        return self.model(images)


def test_compiled_training_uses_full_batches_and_a_schedule_of_that_many_steps(tmp_path, monkeypatch):
    shapes: list[tuple[int, ...]] = []
    modes: list[str] = []

    def fake_compile(model, mode):
        modes.append(mode)
        return ShapeRecorder(model, shapes)

    monkeypatch.setattr(training, "compile_model", fake_compile)
    train = TrainParams(epochs=3, peak_epoch=2, div_factor=10.0, device="cpu", compile="max-autotune")
    run_fit(tmp_path, train, images=45, max_lr=0.05)  # 4 full batches of 10 and one of 5 an epoch
    assert modes == ["max-autotune"]
    assert shapes == [(10, 3, 32, 32)] * (3 * 4)  # the batch of 5 never reaches the compiled model

    lrs = [r["lr"] for r in json.loads((tmp_path / "reports/train/plots/custom/lr_schedule.json").read_text())]
    assert len(lrs) == 3 * 4
    assert int(np.argmax(lrs)) == 2 * 4 - 1 and max(lrs) == pytest.approx(0.05)
    assert lrs[0] == pytest.approx(0.005) and lrs[-1] == pytest.approx(0.005)
    ckpt = torch.load(tmp_path / "models/model.pt", weights_only=True)
    assert not any(key.startswith("model.") for key in ckpt["state_dict"])  # the model's own keys, not the wrapper's


def test_compiling_needs_one_full_batch(tmp_path):
    train = TrainParams(epochs=1, peak_epoch=1, device="cpu", compile="default")
    with pytest.raises(PipelineError, match="the 8 training images make no batch to train on: with train.compile"):
        run_fit(tmp_path, train, images=8)


def test_a_resume_state_from_other_params_is_discarded(tmp_path, monkeypatch, capsys):
    train = TrainParams(epochs=2, peak_epoch=1, device="cpu")
    seed_everything(0)
    interrupt_in_epoch(monkeypatch, 2)
    with pytest.raises(Interrupt):
        run_fit(tmp_path, train, fingerprint="old")
    monkeypatch.undo()

    seed_everything(0)
    run_fit(tmp_path, train, fingerprint="new")
    out = capsys.readouterr().out
    assert "other params, inputs or code" in out and "resuming" not in out
    rows = read_tsv(tmp_path / "reports/train/plots/metrics/train/loss.tsv")
    assert [int(r["step"]) for r in rows] == [1, 2]  # trained from epoch 1, not continued
    assert not (tmp_path / ".resume/train.pt").exists()


@pytest.mark.parametrize("dvc_did", ["delete", "restore"])
def test_a_resume_does_not_read_models_best_which_dvc_deletes_or_restores(tmp_path, monkeypatch, capsys, dvc_did):
    """Before a rerun `dvc repro` deletes models/best.pt, and `dvc exp run` checks out the one dvc.lock records,
    another run's: the resumed run must keep its own best epoch (kept in .resume/) and end as an uninterrupted one."""
    train = TrainParams(epochs=3, peak_epoch=1, device="cpu")
    seed_everything(0)
    run_fit(tmp_path / "whole", train)
    seed_everything(0)
    run_fit(tmp_path / "other", TrainParams(epochs=1, peak_epoch=1, device="cpu"), max_lr=0.5)

    seed_everything(0)
    interrupt_in_epoch(monkeypatch, 3)
    with pytest.raises(Interrupt):
        run_fit(tmp_path / "cut", train)
    monkeypatch.undo()
    best = tmp_path / "cut/models/best.pt"
    assert not best.exists()  # only the last epoch writes models/
    if dvc_did == "restore":
        best.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "other/models/best.pt", best)
    capsys.readouterr()

    seed_everything(0)
    run_fit(tmp_path / "cut", train, model=tiny_model(seed=123))
    assert "resuming after epoch 2 of 3" in capsys.readouterr().out
    assert list((tmp_path / "cut/.resume").iterdir()) == []  # the state and the best model are gone
    assert_same_outputs(outputs(tmp_path / "whole"), outputs(tmp_path / "cut"))


def test_a_resume_state_without_its_best_checkpoint_is_discarded(tmp_path, monkeypatch, capsys):
    train = TrainParams(epochs=2, peak_epoch=1, device="cpu")
    interrupt_in_epoch(monkeypatch, 2)
    with pytest.raises(Interrupt):
        run_fit(tmp_path, train)
    monkeypatch.undo()
    (tmp_path / ".resume/best.pt").unlink()

    run_fit(tmp_path, train)
    out = capsys.readouterr().out
    assert ".resume/best.pt of the interrupted run is gone; starting afresh" in out and "resuming" not in out
    assert (tmp_path / "models/best.pt").is_file()


def test_dvc_renders_the_lr_schedule_plot(tmp_path):
    run_fit(tmp_path, TrainParams(epochs=1, peak_epoch=1, device="cpu"))
    values = dvc_plot_values(tmp_path, "lr_schedule", "step", "reports/train/plots/custom/lr_schedule.json", "lr")
    points = [(p["step"], p["lr"]) for p in values]
    records = json.loads((tmp_path / "reports/train/plots/custom/lr_schedule.json").read_text())
    assert points == [(r["step"], r["lr"]) for r in records] and len(points) == 4
