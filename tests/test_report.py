"""The report stage on a tiny project: every output agrees with the model; `dvc plots show` draws them all, offline
too, and `dvc exp show` puts the test accuracy first."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import MEAN, ROOT, STD, save_model
from doc_pages import exp_show_command

from cifar_pipeline.data.download import CLASSES
from cifar_pipeline.models import build_model
from cifar_pipeline.models.checkpoint import model_from_checkpoint
from cifar_pipeline.report.report import confusion_counts, per_class_accuracy, pick_misclassified, read_tsv
from cifar_pipeline.training.loader import make_eval_loader
from cifar_pipeline.training.lr_find import save_results

PYTHON = Path(sys.executable)
N_TEST, N_TRAIN, EPOCHS, STEPS_PER_EPOCH, MISCLASSIFIED = 60, 20, 3, 4, 8
MAX_LR = 0.0123
WALL_TIMES = {"download": 12.5, "compute-mean-std": 3.25, "lr-find": 95.0, "train": 1234.0}


def _images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % len(CLASSES)
    # A class-dependent tint, so the model's outputs vary from image to image.
    base = rng.integers(0, 256, (n, 32, 32, 3))
    tint = (labels[:, None, None, None] * 23) % 256
    return ((base + tint) % 256).astype(np.uint8), labels.astype(np.int64)


def eval_batch(images: np.ndarray, mean, std) -> torch.Tensor:
    """The images as the training code's evaluation loader (albumentations backend, on the CPU) normalises them."""
    labels = np.zeros(len(images), dtype=np.int64)
    options = {"batch_size": len(images), "seed": 0, "num_workers": 0, "device": torch.device("cpu")}
    [(batch, _)] = list(make_eval_loader(images, labels, mean, std, backend="albumentations", **options))
    return batch


def write_train_log(log_dir: Path) -> dict:
    """What the train stage's DVCLive writes, by DVCLive itself: TSVs, lr_schedule.json and nested metrics.json."""
    from dvclive import Live

    logged = {}
    cwd = Path.cwd()
    os.chdir(log_dir.parent)  # outside any Git/DVC repo: DVCLive then touches nothing but its own folder
    try:
        # The calls the train stage makes (cifar_pipeline.training.train.fit), with made-up numbers.
        live = Live(dir=log_dir.name, resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
        record = {"device": "cpu", "hardware": "2 cores of a CPU", "precision": "fp32", "augment_backend": "gpu"}
        live.log_params({"run": record | {"loader_workers": 0, "processes": 1, "torch": "2", "cuda": None}})
        live.log_metric("max_lr", MAX_LR, plot=False)
        live.log_metric("max_lr_source", "lr-find", plot=False)
        schedule = [MAX_LR * min(1.0, (step + 1) / 6) for step in range(EPOCHS * STEPS_PER_EPOCH)]
        for epoch in range(1, EPOCHS + 1):
            logged[epoch] = {
                "train/loss": 2.0 / epoch,
                "train/acc": 30.0 + 10 * epoch,
                "test/loss": 2.2 / epoch,
                "test/acc": 25.0 + 9 * epoch,
                "lr": schedule[epoch * STEPS_PER_EPOCH - 1],
                "epoch_time_s": 400.0,
                "images_per_s": 125.0,
            }
            live.step = epoch
            for name, value in logged[epoch].items():
                live.log_metric(name, value)
            live.log_metric("best/test_acc", logged[epoch]["test/acc"], plot=False)
            live.log_metric("best/epoch", epoch, plot=False)
            live.next_step()
            points = [{"step": step, "lr": lr} for step, lr in enumerate(schedule[: epoch * STEPS_PER_EPOCH])]
            live.log_plot("lr_schedule", points, x="step", y="lr", template="linear")
        live.log_metric("wall_time_s", WALL_TIMES["train"], plot=False)
        live.end()
    finally:
        os.chdir(cwd)
    return logged


def make_project(root: Path) -> dict:
    """A project folder holding every input of the report stage, small enough to evaluate in a second."""
    rng = np.random.default_rng(0)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["report"]["misclassified"] = MISCLASSIFIED
    params["train"]["device"] = "cpu"
    params["model"]["name"] = "dilated_net"
    (root / "params.yaml").write_text(yaml.safe_dump(params))

    data = root / "data/cifar10"
    data.mkdir(parents=True)
    splits = {"train": _images(N_TRAIN, rng), "test": _images(N_TEST, rng)}
    for split, (images, labels) in splits.items():
        np.savez(data / f"{split}.npz", images=images, labels=labels)
    meta = {"classes": list(CLASSES), "counts": {"train": N_TRAIN, "test": N_TEST}}
    (data / "meta.json").write_text(json.dumps(meta))
    (root / "data/stats.json").write_text(json.dumps({"mean": MEAN, "std": STD}))

    torch.manual_seed(0)
    model = build_model("dilated_net")
    # BatchNorm statistics of the test images themselves: untrained, but its predictions vary as a trained model's do.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches seen
    with torch.no_grad():
        model.train()(eval_batch(splits["test"][0], MEAN, STD))
    extra = {
        "epoch": EPOCHS,
        "batch_size": 8,
        "mean": list(MEAN),
        "std": list(STD),
        "classes": list(CLASSES),
        "max_lr": MAX_LR,
        "max_lr_source": "lr-find",
        "test_acc": 51.0,
        "train_acc": 60.0,
        "device": "cpu",
    }
    save_model(root / "models/model.pt", model, "dilated_net", {"dropout": 0.05, "downsample": "stride"}, **extra)

    reports = root / "reports"
    reports.mkdir()
    logged = write_train_log(reports / "train")
    lrs = np.geomspace(1e-5, 1.0, 12)
    losses = 2.3 - 0.1 * np.arange(12)
    result = {"lr": lrs.tolist(), "loss": losses.tolist(), "raw_loss": (losses + 0.05).tolist(), "diverged": False}
    save_results(reports / "lr_find.json", result, MAX_LR, "steepest", 12)
    for stage, name in (("download", "download"), ("compute-mean-std", "compute_mean_std"), ("lr-find", "lr_find")):
        (reports / f"{name}_time.json").write_text(json.dumps({"wall_time_s": WALL_TIMES[stage]}))
    return {"logged": logged, "extra": extra}


def run_report(cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [str(PYTHON), str(ROOT / "stages/report.py")], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("project")
    info = make_project(root)
    result = run_report(root)
    assert result.returncode == 0, result.stderr
    return root, info


def read_predictions(root: Path) -> list[dict]:
    with open(root / "reports/predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def reference_predictions(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's own softmax on the test images, normalised by the training code's evaluation loader."""
    ckpt = torch.load(root / "models/model.pt", weights_only=True)
    model = model_from_checkpoint(ckpt)
    with np.load(root / "data/cifar10/test.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    with torch.no_grad():
        probs = model(eval_batch(images, ckpt["mean"], ckpt["std"])).softmax(dim=1).numpy()
    return probs, labels, images


def test_pick_misclassified_returns_only_mistakes_most_confident_first():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 200)
    preds = np.where(rng.random(200) < 0.3, rng.integers(0, 10, 200), labels)
    confidences = rng.random(200).astype(np.float32)
    mistakes = int((preds != labels).sum())
    for count in (1, 5, mistakes, mistakes + 10):
        picked = pick_misclassified(labels, preds, confidences, count)
        assert len(picked) == min(count, mistakes)
        assert np.all(preds[picked] != labels[picked])
        assert len(set(picked.tolist())) == len(picked)
        assert np.all(np.diff(confidences[picked]) <= 0)
        # No mistake left out is more confident than the least confident one picked.
        left_out = np.setdiff1d(np.flatnonzero(preds != labels), picked)
        if len(left_out) and len(picked):
            assert confidences[left_out].max() <= confidences[picked].min()


def test_pick_misclassified_with_no_mistakes_is_empty():
    labels = np.arange(10)
    assert len(pick_misclassified(labels, labels.copy(), np.ones(10), 20)) == 0


def test_per_class_accuracy_counts_each_class():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 500)
    preds = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 10, 500))
    result = per_class_accuracy(labels, preds, list(CLASSES))
    assert result["total"] == 500
    assert result["correct"] == sum(int(p == t) for p, t in zip(preds, labels, strict=True))
    assert result["test_acc"] == pytest.approx(100 * result["correct"] / 500, abs=0.01)
    for index, name in enumerate(CLASSES):
        in_class = [p == t for p, t in zip(preds, labels, strict=True) if t == index]
        assert result["per_class_acc"][name] == pytest.approx(100 * sum(in_class) / len(in_class), abs=0.01)


def test_read_tsv_reads_dvclive_metric_files(tmp_path):
    (tmp_path / "reports").mkdir()
    logged = write_train_log(tmp_path / "reports/train")
    steps, values = read_tsv(tmp_path / "reports/train/plots/metrics/test/acc.tsv")
    assert steps.tolist() == list(range(1, EPOCHS + 1))
    assert values.tolist() == [logged[epoch]["test/acc"] for epoch in range(1, EPOCHS + 1)]


def test_predictions_csv_has_one_row_per_test_image_matching_the_model(project):
    root, _ = project
    rows = read_predictions(root)
    probs, labels, _ = reference_predictions(root)
    assert list(rows[0]) == ["index", "true", "predicted", "confidence"]
    assert [int(r["index"]) for r in rows] == list(range(N_TEST))
    assert [r["true"] for r in rows] == [CLASSES[label] for label in labels]
    predicted = np.array([CLASSES.index(r["predicted"]) for r in rows])
    top2 = np.sort(probs, axis=1)[:, -2:]
    differ = predicted != probs.argmax(axis=1)
    # Batched and one-by-one normalisation may round differently: only an exact near-tie may flip.
    assert not differ.any() or (top2[differ, 1] - top2[differ, 0]).max() < 1e-5
    assert np.allclose([float(r["confidence"]) for r in rows], probs.max(axis=1), atol=1e-3)
    # The test images are not all one class for the model: the csv holds mistakes and hits alike.
    assert 0 < differ.size and len(set(predicted.tolist())) > 1


def test_per_class_json_matches_the_predictions(project):
    root, _ = project
    rows = read_predictions(root)
    result = json.loads((root / "reports/per_class.json").read_text())
    hits = [r["true"] == r["predicted"] for r in rows]
    # The overall accuracies first: `dvc exp show` shows the keys in this order.
    assert list(result) == ["test_acc", "test_acc_flip_tta", "correct", "total", "per_class_acc"]
    assert result["total"] == N_TEST
    assert result["correct"] == sum(hits)
    assert result["test_acc"] == pytest.approx(100 * sum(hits) / N_TEST, abs=0.01)
    for name in CLASSES:
        in_class = [r["true"] == r["predicted"] for r in rows if r["true"] == name]
        assert result["per_class_acc"][name] == pytest.approx(100 * sum(in_class) / len(in_class), abs=0.01)


def test_flip_tta_accuracy_is_reported_beside_the_plain_one(project):
    root, _ = project
    probs, labels, images = reference_predictions(root)
    ckpt = torch.load(root / "models/model.pt", weights_only=True)
    model = model_from_checkpoint(ckpt)
    with torch.no_grad():
        plain = model(eval_batch(images, ckpt["mean"], ckpt["std"]))
        mirrored = model(eval_batch(np.ascontiguousarray(images[:, :, ::-1]), ckpt["mean"], ckpt["std"]))
    expected = 100 * ((plain + mirrored) / 2).argmax(dim=1).eq(torch.from_numpy(labels)).float().mean().item()
    result = json.loads((root / "reports/per_class.json").read_text())
    assert result["test_acc_flip_tta"] == pytest.approx(expected, abs=0.01)
    # The headline stays the plain accuracy; the mirrors change some answers, so the two are not one number.
    assert result["test_acc"] == pytest.approx(100 * (probs.argmax(axis=1) == labels).mean(), abs=0.01)
    assert not torch.equal(plain.argmax(dim=1), ((plain + mirrored) / 2).argmax(dim=1))
    text = (root / "reports/summary.md").read_text()
    gain = result["test_acc_flip_tta"] - result["test_acc"]
    row = "| Final test accuracy with flip TTA (mean logits of each image and its mirror) | "
    assert row + f"{result['test_acc_flip_tta']:.2f}% ({gain:+.2f} points) |" in text


def test_tta_false_skips_the_flip_evaluation(project, tmp_path):
    shutil.copytree(project[0], tmp_path / "project")
    params_file = tmp_path / "project/params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["report"]["tta"] = False
    params_file.write_text(yaml.safe_dump(params))
    result = run_report(tmp_path / "project")
    assert result.returncode == 0, result.stderr
    assert "flip TTA" not in result.stdout
    metrics = json.loads((tmp_path / "project/reports/per_class.json").read_text())
    assert "test_acc_flip_tta" not in metrics
    with_tta = json.loads((project[0] / "reports/per_class.json").read_text())
    assert metrics == {key: value for key, value in with_tta.items() if key != "test_acc_flip_tta"}
    text = (tmp_path / "project/reports/summary.md").read_text()
    assert "| Final test accuracy with flip TTA (mean logits of each image and its mirror) | not measured" in text


def test_pictures_and_model_summary_are_written(project):
    from PIL import Image

    root, _ = project
    for name in ("misclassified.png", "metrics_curves.png", "confusion_matrix.png"):
        data = (root / "reports" / name).read_bytes()
        assert data.startswith(b"\x89PNG"), name
        assert len(data) > 10_000, name
        # Whole in a 1,400-pixel browser window (dvc plots show) without scrolling sideways.
        assert Image.open(root / "reports" / name).width <= 1300, name
    summary = (root / "reports/model_summary.txt").read_text()
    params = sum(p.numel() for p in build_model("dilated_net").parameters())
    assert f"{params:,}" in summary
    assert "Receptive field" in summary


def test_summary_md_reports_the_run(project):
    root, info = project
    text = (root / "reports/summary.md").read_text()
    accuracy = json.loads((root / "reports/per_class.json").read_text())
    assert f"Final test accuracy (epoch {EPOCHS}" in text
    assert f"{accuracy['test_acc']:.2f}%" in text
    best = f"{info['logged'][EPOCHS]['test/acc']:.2f}% (epoch {EPOCHS})"
    # Two evaluations of the same weights may differ (autocast in training, fp32 here): each row says which it is.
    assert f"Best test accuracy (over all epochs; the train stage's evaluation, in its precision) | {best}" in text
    assert f"Final test accuracy (epoch {EPOCHS}, models/model.pt, evaluated here in fp32)" in text
    assert f"{info['logged'][EPOCHS]['train/acc']:.2f}%" in text
    assert f"{MAX_LR:.4g}, suggested by the LR range test, rule `steepest`" in text
    assert f"{sum(p.numel() for p in build_model('dilated_net').parameters()):,} parameters" in text
    for stage in (*WALL_TIMES, "report"):
        assert f"| {stage} |" in text
    assert "| train | 20 min 34 s |" in text and "| download | 12.5 s |" in text and "| lr-find | 1 min 35 s |" in text
    pictures = ("misclassified.png", "metrics_curves.png", "confusion_matrix.png", "lr_find.png", "train_samples.png")
    for picture in (*pictures, "model_summary.txt"):
        assert f"({picture})" in text


def test_confusion_matrix_counts_the_predictions_with_class_names_and_counts(project):
    from cifar_pipeline.report.figures import confusion_matrix

    root, _ = project
    rows = read_predictions(root)
    labels = np.array([CLASSES.index(r["true"]) for r in rows])
    preds = np.array([CLASSES.index(r["predicted"]) for r in rows])
    counts = confusion_counts(labels, preds, len(CLASSES))
    for true, predicted in ((0, 0), (3, 5), (9, 1)):
        expected = sum(r["true"] == CLASSES[true] and r["predicted"] == CLASSES[predicted] for r in rows)
        assert counts[true, predicted] == expected
    assert (
        counts.sum() == N_TEST
        and np.trace(counts) == json.loads((root / "reports/per_class.json").read_text())["correct"]
    )

    ax = confusion_matrix(counts, list(CLASSES)).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASSES)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CLASSES)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(i, j): str(counts[i, j]) for i in range(len(CLASSES)) for j in range(len(CLASSES))}


def test_missing_model_names_the_train_stage(project, tmp_path):
    shutil.copytree(project[0], tmp_path / "project")
    (tmp_path / "project/models/model.pt").unlink()
    result = run_report(tmp_path / "project")
    assert result.returncode == 2
    assert "models/model.pt" in result.stderr and "'train' stage" in result.stderr
    assert "Traceback" not in result.stderr


def test_fresh_clone_names_the_download_stage(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    result = run_report(tmp_path)
    assert result.returncode == 2
    assert "'download' stage" in result.stderr and "Traceback" not in result.stderr


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    dvc = PYTHON.parent / "dvc"
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "DVC_TEST": "true"}
    result = subprocess.run([str(dvc), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def declared_plots() -> tuple[list[str], list[str]]:
    """(ids of the data-series plots, paths of the image plots) from the top-level plots of dvc.yaml."""
    entries = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    series = [next(iter(e)) for e in entries if isinstance(e, dict)]
    images = [e for e in entries if isinstance(e, str)]
    return series, images


def recorded_run(root: Path, repo: Path) -> Path:
    """A git + DVC repository as a run of this pipeline leaves it, committed: the report project's files under this
    project's dvc.yaml, .dvc/config (and the page template it names) and code, and the dvc.lock `dvc commit` makes."""
    shutil.copytree(root, repo)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    for folder in ("src", "stages"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # What the earlier stages write besides: any PNG stands in for their pictures here.
    for name in ("lr_find.png", "train_samples.png"):
        shutil.copy(repo / "reports/metrics_curves.png", repo / "reports" / name)
    shutil.copy(repo / "models/model.pt", repo / "models/best.pt")
    (repo / "reports/augmentations.yaml").write_text("transform: {}\n")
    (repo / "reports/params_check.json").write_text('{"params.yaml": "valid"}\n')
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")
    template = _dvc(repo, "config", "plots.html_template").stdout.strip()
    (repo / ".dvc" / template).parent.mkdir(parents=True)
    shutil.copy(ROOT / ".dvc" / template, repo / ".dvc" / template)
    _dvc(repo, "commit", "-f")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run 1")
    return repo


@pytest.mark.e2e
def test_dvc_plots_show_and_diff_render_every_declared_plot(project, tmp_path):
    repo = recorded_run(project[0], tmp_path / "repo")

    series, images = declared_plots()
    assert series and images
    _dvc(repo, "plots", "show", "--out", "show")
    html = (repo / "show/index.html").read_text()
    # Vega is in the page itself (.dvc/config: plots.html_template), not loaded from elsewhere.
    assert re.findall(r"<script[^>]*>", html) == ["<script>"] * 3 + ['<script type = "text/javascript">'] * len(series)
    assert html.count("vegaEmbed(") == len(series)
    for plot_id in series:
        assert f"vegaEmbed('#{plot_id}', spec)" in html, plot_id
    for image in images:
        name = f"workspace_{image.replace('/', '_')}"
        assert (repo / "show/static" / name).read_bytes() == (repo / image).read_bytes(), image
        assert html.count(f'<img src="static/{name}">') == 1, image
    spec = _dvc(repo, "plots", "show", "--json").stdout
    rendered = json.loads(spec)
    assert set(rendered["data"]) == set(series) | set(images), "plots rendered twice or missing"
    for plot_id in series:
        (plot,) = rendered["data"][plot_id]
        assert plot["type"] == "vega"
        assert plot["content"]["data"]["values"], f"{plot_id} has no data points"

    # A second experiment: a different test curve, compared against the committed one.
    tsv = repo / "reports/train/plots/metrics/test/acc.tsv"
    *rows, last = tsv.read_text().splitlines()
    *fields, acc = last.split("\t")
    tsv.write_text("\n".join([*rows, "\t".join([*fields, str(float(acc) + 9)])]) + "\n")
    result = _dvc(repo, "plots", "diff", "HEAD", "--json")
    diff = json.loads(result.stdout)["data"]["accuracy"][0]["content"]["data"]["values"]
    final_test = {
        p["rev"]: float(p["acc"]) for p in diff if p["filename"] == "test/acc.tsv" and p["step"] == str(EPOCHS)
    }
    assert final_test["workspace"] == final_test["HEAD"] + 9


def shown_columns(repo: Path, *args: str) -> list[str]:
    """The columns of `dvc exp show ARGS --csv` other than the experiment's name, commit, kind, date and parent."""
    header = _dvc(repo, "exp", "show", *args, "--csv").stdout.splitlines()[0].split(",")
    return [column for column in header if column not in ("Experiment", "rev", "typ", "Created", "parent")]


def changed(values: dict, new: dict) -> dict:
    """`values` (nested, as DVCLive writes them) with the keys of `new` (flat, a/b for nested) replaced."""
    values = json.loads(json.dumps(values))
    for name, value in new.items():
        *parents, key = name.split("/")
        inner = values
        for parent in parents:
            inner = inner[parent]
        inner[key] = value
    return values


@pytest.mark.e2e
def test_dvc_exp_show_puts_the_test_accuracy_first_and_the_documented_command_keeps_what_matters(project, tmp_path):
    repo = recorded_run(project[0], tmp_path / "repo")

    # Another run, as `dvc exp run -S train.max_lr=0.02` leaves it: new params, metrics and model.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["max_lr"] = 0.02
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    accuracy = json.loads((repo / "reports/per_class.json").read_text())
    new_accuracy = {"test_acc": 55.0, "test_acc_flip_tta": 56.0, "correct": 33, "per_class_acc/cat": 40.0}
    (repo / "reports/per_class.json").write_text(json.dumps(changed(accuracy, new_accuracy)))
    train = json.loads((repo / "reports/train/metrics.json").read_text())
    new_train = {"max_lr": 0.02, "max_lr_source": "params", "train/loss": 1.5, "train/acc": 60.5, "test/loss": 1.7}
    new_train |= {"test/acc": 55.0, "lr": 0.0002, "epoch_time_s": 390.0, "images_per_s": 130.0, "wall_time_s": 1200.0}
    new_train |= {"best/test_acc": 55.0}
    (repo / "reports/train/metrics.json").write_text(json.dumps(changed(train, new_train)))
    with open(repo / "models/model.pt", "ab") as f:
        f.write(b"another model")
    _dvc(repo, "commit", "-f")
    _dvc(repo, "exp", "save", "-n", "lr-002")

    # Plainly: every metric before the params and the stages' dependencies, the test accuracy first.
    columns = shown_columns(repo)
    assert columns[:2] == ["test_acc", "test_acc_flip_tta"]
    assert "reports/lr_find_time.json:wall_time_s" not in columns and columns.count("wall_time_s") == 1
    assert len(columns) > 90  # what the documented command is for
    # docs/experiments.md's command: the accuracies, the max LR used, then what changed; no per-class figures,
    # duplicates, losses, timings or hashes. (tests/test_e2e.py measures its width on a real sweep.)
    command = exp_show_command()
    assert command[:3] == ["dvc", "exp", "show"]
    assert shown_columns(repo, *command[3:]) == [
        "test_acc",
        "test_acc_flip_tta",
        "max_lr",
        "train.acc",
        "best.test_acc",
        "train.max_lr",
    ]


CHROMIUM = Path("/usr/bin/chromium")


class _Charts(HTMLParser):
    """Counts, for each plot's <div>, the Vega drawings inside it (a canvas or svg of class "marks")."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, plot_ids: list[str]):
        super().__init__()
        self.open: list[str | None] = []
        self.drawn = dict.fromkeys(plot_ids, 0)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("canvas", "svg") and "marks" in (attrs.get("class") or "").split():
            owner = next((i for i in reversed(self.open) if i in self.drawn), None)
            if owner is not None:
                self.drawn[owner] += 1
        if tag not in self.VOID:
            self.open.append(attrs.get("id"))

    def handle_endtag(self, tag):
        if tag not in self.VOID and self.open:
            self.open.pop()


def charts_drawn(page: Path, plot_ids: list[str]) -> dict[str, int]:
    """{plot id: Vega drawings in its div} once headless Chromium has run the page's scripts, with every host name
    unresolvable: nothing can come from the internet."""
    browser = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    offline = ["--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000"]
    result = subprocess.run(
        [*browser, *offline, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    )
    parser = _Charts(plot_ids)
    parser.feed(result.stdout)
    return parser.drawn


@pytest.mark.e2e
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no browser at {CHROMIUM} (apt-get install chromium)")
def test_the_plots_page_draws_every_chart_without_the_internet(project, tmp_path):
    from dvc_render.html import PAGE_HTML

    repo = recorded_run(project[0], tmp_path / "repo")
    series, _ = declared_plots()
    _dvc(repo, "plots", "show", "--out", "page")
    assert charts_drawn(repo / "page/index.html", series) == dict.fromkeys(series, 1)

    # DVC's own page, which loads Vega from a CDN, draws none of them offline: what the template is for.
    (tmp_path / "dvc_page.html").write_text(PAGE_HTML)
    _dvc(repo, "plots", "show", "--out", "cdn-page", "--html-template", str(tmp_path / "dvc_page.html"))
    assert charts_drawn(repo / "cdn-page/index.html", series) == dict.fromkeys(series, 0)


def test_misclassified_grid_handles_no_mistakes(tmp_path):
    from cifar_pipeline.report.figures import misclassified_grid
    from cifar_pipeline.stage import save_figure

    fig = misclassified_grid(np.zeros((0, 32, 32, 3), np.uint8), [], mistakes=0, total=50)
    assert fig.get_suptitle() == "No mistakes on the 50 test images"
    save_figure(tmp_path / "none.png", fig)
    assert (tmp_path / "none.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("correct", [10, 9])
def test_summary_shows_the_mistakes_picture_only_when_there_are_mistakes(correct):
    from cifar_pipeline.report.report import summary_markdown

    ckpt = {"epoch": 5, "max_lr": 0.2, "max_lr_source": "params", "model_name": "custom_resnet", "device": "cpu"}
    accuracy = {"test_acc": 10.0 * correct, "correct": correct, "total": 10, "per_class_acc": {"cat": 90.0}}
    text = summary_markdown(ckpt, accuracy, {}, None, 1000, {"report": 1.0}, "cpu")
    if correct == 10:
        assert "No test image of the 10 is misclassified." in text and "misclassified.png" not in text
    else:
        assert "1 of 10 test images are misclassified. The most confident mistakes:" in text
        assert "![misclassified test images](misclassified.png)" in text


def test_summary_names_validation_accuracy_and_params_lr_when_there_is_a_val_split():
    from cifar_pipeline.report.report import summary_markdown

    ckpt = {"epoch": 5, "max_lr": 0.2, "max_lr_source": "params", "model_name": "custom_resnet", "device": "cuda"}
    accuracy = {"test_acc": 90.0, "correct": 9, "total": 10, "per_class_acc": {"cat": 90.0}}
    metrics = {"train": {"acc": 95.5}, "best": {"val_acc": 91.25, "epoch": 4}}
    times = {"download": 1.0, "compute-mean-std": None, "report": 2.0}
    text = summary_markdown(ckpt, accuracy, metrics, None, 1000, times, "cpu")
    assert (
        "| Best validation accuracy (picks models/best.pt; the train stage's evaluation, in its precision) "
        "| 91.25% (epoch 4) |" in text
    )
    assert "Best test accuracy" not in text
    assert "| Max learning rate | 0.2, set in params.yaml (train.max_lr) |" in text
    assert "| Train accuracy (epoch 5, on augmented batches) | 95.50% |" in text
    assert "| compute-mean-std | n/a |" in text and "| total of the stages with a time | 3.0 s |" in text
