"""cifar-export: the ONNX model gives PyTorch's logits (normalisation included) and carries its class names."""

import json

import numpy as np
import onnxruntime
import pytest
import torch
from archives import CLASSES
from conftest import save_model
from tiny_model import MEAN, STD, colour_images

from cifar_pipeline.models import build_model
from cifar_pipeline.models.checkpoint import batch_logits, load_classifier
from cifar_pipeline.use.cli import export_main

pytestmark = pytest.mark.slow  # subprocesses or large models: make test-fast skips it


def onnx_logits(path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / 255  # what the graph takes: RGB in 0..1, NCHW
    return session.run(["logits"], {"images": pixels})[0]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "out" / "model.onnx"
    export_main([str(path), "--model", str(tiny_model[0])])
    return path


def test_onnxruntime_gives_pytorchs_logits_on_a_batch(tiny_model, exported):
    images, labels = colour_images(per_class=3, seed=7)
    noise = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    images = np.concatenate([images, noise])
    classifier = load_classifier(tiny_model[0])
    expected = batch_logits(classifier.model, images, classifier.mean, classifier.std, torch.device("cpu"))
    got = onnx_logits(exported, images)
    assert got.shape == (len(images), len(CLASSES))
    assert np.allclose(got, expected, atol=1e-4, rtol=1e-4), np.abs(got - expected).max()
    assert np.array_equal(got[: len(labels)].argmax(axis=1), labels)  # the known answers survive the export
    # Any batch size: the batch dimension is dynamic.
    assert np.allclose(onnx_logits(exported, images[:1]), expected[:1], atol=1e-4, rtol=1e-4)


def test_onnx_metadata_names_the_classes_and_the_normalisation(exported):
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["classes"]) == list(CLASSES)
    assert json.loads(metadata["mean"]) == pytest.approx(MEAN) and json.loads(metadata["std"]) == pytest.approx(STD)
    assert metadata["model_name"] == "dilated_net"
    [image_input] = session.get_inputs()
    assert image_input.name == "images" and image_input.shape[1:] == [3, 32, 32]
    assert [p.name for p in exported.parent.iterdir()] == ["model.onnx"]  # written atomically, nothing beside it


def test_custom_resnet_exports_too(tmp_path, capsys):
    torch.manual_seed(0)
    extra = {"mean": list(MEAN), "std": list(STD), "classes": list(CLASSES)}
    save_model(tmp_path / "model.pt", build_model("custom_resnet"), "custom_resnet", {"dropout": 0.0}, **extra)
    export_main([str(tmp_path / "model.onnx"), "--model", str(tmp_path / "model.pt")])
    out, err = capsys.readouterr()
    assert out.startswith(f"wrote {tmp_path / 'model.onnx'} (custom_resnet, classes: airplane")
    assert "torchvision" not in err  # the exporter's notes on ops our models never use
    images = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    classifier = load_classifier(tmp_path / "model.pt")
    expected = batch_logits(classifier.model, images, classifier.mean, classifier.std, torch.device("cpu"))
    assert np.allclose(onnx_logits(tmp_path / "model.onnx", images), expected, atol=1e-4, rtol=1e-4)


def test_export_of_a_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tmp_path / "model.onnx"), "--model", str(tmp_path / "none.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'none.pt'} does not exist") and err.count("\n") == 1
    assert not (tmp_path / "model.onnx").exists()
