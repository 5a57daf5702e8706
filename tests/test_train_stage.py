"""The train stage as DVC runs it: `python stages/train.py` in a small project on the CPU.

Each run trains dilated_net on 40 synthetic images for 3 epochs (2 steps each): a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_training import assert_same_outputs, colour_images, outputs

from cifar_pipeline.training.runtime import cpu_has_native_bf16, cpu_name

pytestmark = pytest.mark.slow  # subprocesses or large models: make test-fast skips it

STAGES = Path(__file__).resolve().parents[1] / "stages"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SUGGESTED_LR = 0.02
PARAMS = {
    "seed": 0,
    "data": {"md5": None, "train_subset": 40, "test_subset": 20, "num_workers": 0},
    "model": {"name": "dilated_net"},
    "lr_find": {"start_lr": 1e-4, "end_lr": 3.0, "num_iter": 30},
    "train": {"epochs": 3, "batch_size": 20, "max_lr": "auto", "peak_epoch": 1, "device": "cpu"},
}


def make_project(root: Path, params: dict | None = None, std: tuple = (0.25, 0.25, 0.25)) -> Path:
    """A project folder as the train stage expects it after download, compute-mean-std and lr-find."""
    data = root / "data/cifar10"
    data.mkdir(parents=True)
    for split, n, seed in (("train", 60, 0), ("test", 30, 1)):
        images, labels = colour_images(n, seed)
        np.savez(data / f"{split}.npz", images=images, labels=labels)
    (data / "meta.json").write_text(json.dumps({"classes": CLASSES}))
    (root / "data/stats.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": list(std)}))
    (root / "reports").mkdir()
    (root / "reports/lr_find.json").write_text(json.dumps({"suggested_lr": SUGGESTED_LR, "curve": []}))
    set_params(root, params or PARAMS)
    return root


def set_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def stage_env() -> dict[str, str]:
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg"}


def run_stage(root: Path, name: str = "train") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STAGES / f"{name}.py")],
        cwd=root,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def with_train(**changes) -> dict:
    return {**PARAMS, "train": {**PARAMS["train"], **changes}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run with max_lr: auto, shared by the tests that compare against it."""
    root = make_project(tmp_path_factory.mktemp("reference"))
    result = run_stage(root)
    assert result.returncode == 0, result.stderr
    return root


def test_a_run_writes_every_output_and_uses_the_lr_find_suggestion(reference):
    for path in ("models/model.pt", "models/best.pt", "reports/train_samples.png", "reports/augmentations.yaml"):
        assert (reference / path).is_file(), path
    assert not (reference / ".resume/train.pt").exists()
    metrics = json.loads((reference / "reports/train/metrics.json").read_text())
    assert metrics["max_lr"] == SUGGESTED_LR and metrics["max_lr_source"] == "lr-find"
    assert metrics["step"] == 3
    ckpt = torch.load(reference / "models/model.pt", weights_only=True)
    assert ckpt["max_lr"] == SUGGESTED_LR and ckpt["max_lr_source"] == "lr-find" and ckpt["epoch"] == 3
    assert ckpt["classes"] == CLASSES and ckpt["model_name"] == "dilated_net"
    assert ckpt["test_acc"] == metrics["test"]["acc"]
    lrs = [r["lr"] for r in json.loads((reference / "reports/train/plots/custom/lr_schedule.json").read_text())]
    assert len(lrs) == 6 and int(np.argmax(lrs)) == 1 and max(lrs) == pytest.approx(SUGGESTED_LR)


def test_a_run_with_a_weight_average_saves_it_and_the_report_names_it(tmp_path):
    root = make_project(tmp_path, with_train(ema=0.8, label_smoothing=0.1))
    result = run_stage(root)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((root / "reports/train/metrics.json").read_text())
    assert f"{metrics['ema']['test']['acc']:.2f}% with the weight average" in result.stdout
    ckpt = torch.load(root / "models/model.pt", weights_only=True)
    assert ckpt["weights"] == "EMA of the trained weights, decay 0.8"
    assert ckpt["test_acc"] == metrics["ema"]["test"]["acc"]
    result = run_stage(root, "report")
    assert result.returncode == 0, result.stderr
    summary = (root / "reports/summary.md").read_text()
    assert "| Weights in models/model.pt | EMA of the trained weights, decay 0.8 |" in summary
    assert "Best test accuracy of the weight average (" in summary


def test_the_run_records_what_it_used_in_the_checkpoint_dvclive_params_and_the_report(reference, tmp_path):
    """Every `auto` resolved once (runtime.make_runtime) and the result named: the hardware, the precision, the
    augmentation backend, the loader workers, the processes, torch."""
    ckpt = torch.load(reference / "models/model.pt", weights_only=True)
    record = ckpt["run"]
    expected_precision = "bf16 autocast" if cpu_has_native_bf16() else "fp32"
    assert record["device"] == "cpu" and record["precision"] == expected_precision
    assert record["augment_backend"] == "albumentations" and record["loader_workers"] == 0  # data.num_workers: 0
    assert record["processes"] == 1 and record["torch"] == torch.__version__ and record["cuda"] is None
    assert record["hardware"].startswith(f"{len(os.sched_getaffinity(0))} core") and cpu_name() in record["hardware"]
    assert torch.load(reference / "models/best.pt", weights_only=True)["run"] == record
    assert yaml.safe_load((reference / "reports/train/params.yaml").read_text()) == {"run": record}
    shutil.copytree(reference, tmp_path / "run")
    result = run_stage(tmp_path / "run", "report")
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "run/reports/summary.md").read_text()
    assert f"| Trained on | {record['hardware']} (cpu), {expected_precision}, albumentations augmentation" in summary
    assert f"(0 loader workers), 1 training process, torch {torch.__version__} (this report evaluated on cpu" in summary


def test_two_runs_with_the_same_params_are_identical(reference, tmp_path):
    root = make_project(tmp_path)
    result = run_stage(root)
    assert result.returncode == 0, result.stderr
    assert_same_outputs(outputs(reference), outputs(root))


def test_a_number_for_max_lr_is_used_as_it_is(reference, tmp_path):
    root = make_project(tmp_path, with_train(max_lr=SUGGESTED_LR))
    (root / "reports/lr_find.json").unlink()  # not needed when the LR is given
    result = run_stage(root)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(root / "models/model.pt", weights_only=True)
    assert ckpt["max_lr"] == SUGGESTED_LR and ckpt["max_lr_source"] == "params"
    mine, theirs = outputs(root), outputs(reference)
    assert mine["metrics"].pop("max_lr_source") == "params"
    theirs["metrics"].pop("max_lr_source")
    assert_same_outputs(mine, theirs)  # the same LR, so the same run


def kill_after_a_saved_epoch(root: Path) -> None:
    """Start the train stage in `root` and SIGKILL it (the stage's process alone, in a session of its own, as a
    `kill -9` of it would) as soon as its first resume state is on disk."""
    resume = root / ".resume/train.pt"
    process = subprocess.Popen(
        [sys.executable, str(STAGES / "train.py")],
        cwd=root,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not resume.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def test_a_run_killed_mid_training_resumes_to_the_same_result(reference, tmp_path):
    root = make_project(tmp_path)
    resume = root / ".resume/train.pt"
    kill_after_a_saved_epoch(root)
    saved = torch.load(resume, weights_only=True)["epoch"]
    assert saved in (1, 2)  # killed in the middle of the run (almost surely during epoch 2)

    result = run_stage(root)
    assert result.returncode == 0, result.stderr
    assert f"resuming after epoch {saved} of 3" in result.stdout
    assert f"epoch {saved}/3" not in result.stdout and "epoch 3/3" in result.stdout
    assert not resume.exists()
    assert_same_outputs(outputs(reference), outputs(root))


def test_a_diverging_loss_stops_with_a_clear_error(tmp_path):
    root = make_project(tmp_path, std=(1e-40, 1e-40, 1e-40))  # normalised pixels overflow to inf
    result = run_stage(root)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.splitlines()[-1]  # after numpy's overflow warnings
    assert message.startswith("error: the training loss became nan in epoch 1, step 1 of 2")
    assert "train.max_lr" in message
    assert not (root / "models/model.pt").exists()


def test_auto_without_an_lr_find_result_names_the_stage_to_run(tmp_path):
    root = make_project(tmp_path)
    (root / "reports/lr_find.json").unlink()
    result = run_stage(root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "reports/lr_find.json does not exist: run the 'lr-find' stage first" in result.stderr
