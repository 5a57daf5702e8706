"""Your own data through the whole pipeline: real `dvc repro` on a 3-class and a 100-class image folder and on a
synthetic CIFAR-100 archive (tiny configurations), then cifar-predict and cifar-export on the model it trained."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from archives import learnable_archive, make_cifar100_archive
from PIL import Image
from test_e2e import STAGES, dvc, make_project, run, stages_run

pytestmark = pytest.mark.e2e

THREE = ("Zebra", "ant", "bee")  # sorted() order: upper case first
HUNDRED = tuple(f"class_{i:03d}" for i in range(100))


def three_classes(path):
    learnable_archive(path, per_class_train=20, per_class_test=6, classes=THREE)
    return THREE


def hundred_classes(path):
    learnable_archive(path, per_class_train=4, per_class_test=1, classes=HUNDRED)
    return HUNDRED


def cifar100(path):
    return tuple(make_cifar100_archive(path, n_train=400, n_test=100)["fine"][1])  # data.labels: fine, the default


@pytest.mark.parametrize("dataset", [three_classes, hundred_classes, cifar100])
def test_the_pipeline_takes_its_classes_from_the_data(tmp_path, dataset):
    classes = dataset(tmp_path / "data.tar.gz")
    project = make_project(tmp_path / "project", tmp_path / "data.tar.gz")
    if len(classes) == 100:  # a loss from ln(100) needs more range-test steps to fall by 5%
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["lr_find"]["num_iter"] = 60
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(project, "repro")
    assert stages_run(result.stdout) == STAGES
    assert f"of {len(classes)} classes" in result.stdout

    assert json.loads((project / "data/cifar10/meta.json").read_text())["classes"] == list(classes)
    checkpoint = torch.load(project / "models/model.pt", weights_only=True)
    assert checkpoint["classes"] == list(classes)
    assert checkpoint["model_kwargs"]["num_classes"] == len(classes)
    assert checkpoint["state_dict"]["fc.weight"].shape[0] == len(classes)  # the head: one output per class
    per_class = json.loads((project / "reports/per_class.json").read_text())["per_class_acc"]
    assert list(per_class) == list(classes)
    summary = (project / "reports/summary.md").read_text()
    assert f"| Classes | {len(classes)}: {', '.join(classes[:3])}" in summary
    assert all(f"| {name} |" in summary for name in classes)  # the per-class table has a row for each
    with Image.open(project / "reports/confusion_matrix.png") as image:
        assert image.width >= (700 if len(classes) <= 20 else 1500)  # grows with the class count

    with np.load(project / "data/cifar10/test.npz") as test:
        Image.fromarray(test["images"][0]).save(tmp_path / "test0.png")
    predicted = run(tmp_path, "cifar-predict", "test0.png", "--model", str(project / "models/model.pt"), "--json")
    top = json.loads(predicted.stdout)["predictions"][0]["top_k"]
    assert len(top) == 3 and {entry["class"] for entry in top} <= set(classes)

    exported = tmp_path / "model.onnx"
    run(tmp_path, "cifar-export", str(exported), "--model", str(project / "models/model.pt"))
    metadata = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    assert json.loads(metadata["classes"]) == list(classes)
