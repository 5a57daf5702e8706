"""Behaviour pinned: a tiny run of the stage scripts, end to end on the CPU, against a golden record of its numbers.

A restructuring of the package must leave what a run computes unchanged. tests/golden/tiny_run.json holds what
stages/{download,compute_mean_std,lr_find,train,report}.py computed in a scratch project on a synthetic archive:
the range test's curve and suggestion, every epoch's metrics, a digest of the final weights and the report's
accuracy. On the kind of machine that wrote it (its `platform` entry: CPU model, thread count, torch) every number
must match bit for bit; elsewhere other CPU kernels round differently, so floats match to 1e-4 (relative) and
accuracies to one test image.

After a change that is meant to change results, rewrite the record and say why in the commit:
    UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from archives import learnable_archive
from conftest import ROOT

pytestmark = pytest.mark.slow  # subprocesses or large models: make test-fast skips it

GOLDEN = Path(__file__).parent / "golden" / "tiny_run.json"
STAGES = ["download", "compute_mean_std", "lr_find", "train", "report"]
PARAMS = {
    "seed": 3,
    "data": {"url": "tiny.tar.gz", "md5": None, "num_workers": 0},
    "model": {"name": "dilated_net"},
    "lr_find": {"start_lr": 1e-5, "end_lr": 10.0, "num_iter": 30},
    # A fixed max LR: on another CPU the range test's pick may move by a step, and training must not follow it.
    "train": {"epochs": 2, "peak_epoch": 1, "batch_size": 50, "max_lr": 0.01, "device": "cpu", "precision": "fp32"},
    "report": {"misclassified": 4},
}
TEST_IMAGES = 60  # learnable_archive: 6 a class


def machine() -> str:
    """The CPU's model and vector units, the thread count and torch: what decides how fp32 kernels round."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        first_cpu = cpuinfo.read_text().split("\n\n")[0].splitlines()
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first_cpu)}
        model, flags = fields.get("model name", model), set(fields.get("flags", "").split())
    units = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if flag in flags]
    return f"{model} ({' '.join(units)}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def weights_digest(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def per_epoch(project: Path) -> dict[str, list[float]]:
    series = {}
    for split in ("train", "test"):
        for name in ("loss", "acc"):
            with open(project / f"reports/train/plots/metrics/{split}/{name}.tsv", newline="") as f:
                series[f"{split}/{name}"] = [float(row[name]) for row in csv.DictReader(f, delimiter="\t")]
    return series


def tiny_run(project: Path) -> dict:
    project.mkdir()
    learnable_archive(project / "tiny.tar.gz")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in PARAMS.items():
        params[section] = {**params[section], **values} if isinstance(values, dict) else values
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "MPLBACKEND": "Agg"}
    for stage in STAGES:
        done = subprocess.run(
            [sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=project, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{stage}: {done.stderr}"
    lr_find = json.loads((project / "reports/lr_find.json").read_text())
    report = json.loads((project / "reports/per_class.json").read_text())
    return {
        "platform": machine(),
        "suggested_lr": lr_find["suggested_lr"],
        "range_test_raw_loss": [point["raw_loss"] for point in lr_find["curve"]],
        "epochs": per_epoch(project),
        "weights_sha256": weights_digest(project / "models/model.pt"),
        "test_acc": report["test_acc"],
        "test_acc_flip_tta": report["test_acc_flip_tta"],
    }


def test_a_tiny_run_computes_what_the_golden_record_says(tmp_path):
    run = tiny_run(tmp_path / "project")
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(run, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if run["platform"] == golden["platform"]:
        assert run == golden
        return
    one_image = 100 / TEST_IMAGES + 1e-6
    step = (PARAMS["lr_find"]["end_lr"] / PARAMS["lr_find"]["start_lr"]) ** (1 / (PARAMS["lr_find"]["num_iter"] - 1))
    assert golden["suggested_lr"] / step * 0.999 <= run["suggested_lr"] <= golden["suggested_lr"] * step * 1.001
    # Up to the lowest loss: past it the loss diverges, and rounding differences grow without bound.
    descent = int(np.argmin(golden["range_test_raw_loss"])) + 1
    assert run["range_test_raw_loss"][:descent] == pytest.approx(golden["range_test_raw_loss"][:descent], rel=1e-3)
    for name, values in golden["epochs"].items():
        tolerance = {"abs": one_image} if name.endswith("acc") else {"rel": 1e-3}
        assert run["epochs"][name] == pytest.approx(values, **tolerance), name
    assert run["test_acc"] == pytest.approx(golden["test_acc"], abs=one_image)
    assert run["test_acc_flip_tta"] == pytest.approx(golden["test_acc_flip_tta"], abs=one_image)
