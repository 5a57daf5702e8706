"""cifar-predict: a trained model classifies image files of any size; every bad input gets one clear line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from archives import CLASSES
from PIL import Image
from test_checkpoint import Payload
from tiny_model import colour_images, write_images

from cifar_pipeline.models import build_model
from cifar_pipeline.models.checkpoint import FORMAT, batch_logits, load_classifier
from cifar_pipeline.training.loader import make_eval_loader
from cifar_pipeline.use.cli import predict_main
from cifar_pipeline.use.predict import classify, find_images, read_image

SCRIPT = Path(sys.executable).parent / "cifar-predict"


def predict(capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `cifar-predict args`, run in this process."""
    try:
        predict_main(list(args))
        status = 0
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def photos(tiny_model, tmp_path_factory) -> tuple[Path, list[Path], np.ndarray]:
    """The tiny model's own training images as 32x32 PNG files, named <index>_<class>.png."""
    _, images, labels = tiny_model
    folder = tmp_path_factory.mktemp("photos")
    return folder, write_images(folder, images, labels), labels


def test_installed_command_predicts_the_labels_of_the_training_images_as_json(tiny_model, photos):
    model, _, _ = tiny_model
    folder, files, labels = photos
    result = subprocess.run(
        [str(SCRIPT), str(folder), "--model", str(model), "--json", "--top-k", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"model", "tta", "predictions", "errors"}
    assert document["model"] == str(model) and document["tta"] is False and document["errors"] == []
    predictions = document["predictions"]
    assert [p["file"] for p in predictions] == [str(f) for f in files]  # sorted folder order
    for prediction, label in zip(predictions, labels, strict=True):
        assert set(prediction) == {"file", "top_k"}
        top = prediction["top_k"]
        assert len(top) == 3 and all(set(entry) == {"class", "probability"} for entry in top)
        assert top[0]["class"] == CLASSES[label], prediction["file"]  # the known answer
        probabilities = [entry["probability"] for entry in top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0 <= p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-5
        assert len({entry["class"] for entry in top}) == 3 and {entry["class"] for entry in top} <= set(CLASSES)


def test_probabilities_are_the_models_own_on_the_training_normalisation(tiny_model, photos):
    """A 32x32 file goes through exactly what the test images of training went through."""
    model_path, images, _ = tiny_model
    _, files, _ = photos
    classifier = load_classifier(model_path)
    options = {"batch_size": len(images), "seed": 0, "num_workers": 0, "device": torch.device("cpu")}
    zeros = np.zeros(len(images), dtype=np.int64)
    [(batch, _)] = make_eval_loader(images, zeros, classifier.mean, classifier.std, backend="albumentations", **options)
    with torch.no_grad():
        expected = classifier.model(batch).softmax(dim=1).numpy()
    results = list(classify(classifier, files, torch.device("cpu"), top_k=10, batch_size=7))
    for result, row in zip(results, expected, strict=True):
        got = dict(result.top)
        assert np.allclose([got[name] for name in CLASSES], row, atol=1e-5)
    # Batching does not change an answer (only the last digits: other batch sizes, other kernels).
    for small, large in zip(results, classify(classifier, files, torch.device("cpu"), 10, 256), strict=True):
        assert small.file == large.file and small.top[0][0] == large.top[0][0]
        assert np.allclose([p for _, p in small.top], [p for _, p in large.top], atol=1e-5)


def test_text_output_is_one_line_per_file_with_top_k_percentages(capsys, tiny_model, photos):
    model, _, _ = tiny_model
    _, files, labels = photos
    status, out, err = predict(capsys, str(files[0]), str(files[-1]), "--model", str(model), "--top-k", "2")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 2
    for line, file, label in zip(lines, (files[0], files[-1]), (labels[0], labels[-1]), strict=True):
        name, answers = line.split(": ")
        assert name == str(file)
        first, second = answers.split(", ")
        assert first.startswith(f"{CLASSES[label]} ") and first.endswith("%")
        assert float(first.split()[1][:-1]) >= float(second.split()[1][:-1])


def test_any_size_and_mode_is_centre_cropped_and_resized_to_32(tmp_path):
    # A wide image: red bands left and right of a blue centre square. The crop keeps only the blue square.
    wide = np.zeros((64, 160, 3), np.uint8)
    wide[:, :48] = wide[:, 112:] = (255, 0, 0)
    wide[:, 48:112] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert read_image(tmp_path / "wide.png").shape == (32, 32, 3)
    assert np.array_equal(np.unique(read_image(tmp_path / "wide.png").reshape(-1, 3), axis=0), [[0, 0, 255]])
    # Grey, palette and RGBA files become RGB; a 32x32 PNG is read back exactly.
    Image.new("L", (50, 40), 128).save(tmp_path / "grey.jpg")
    Image.new("P", (33, 99), 3).save(tmp_path / "palette.png")
    Image.new("RGBA", (200, 300), (10, 20, 30, 40)).save(tmp_path / "alpha.png")
    for name in ("grey.jpg", "palette.png", "alpha.png"):
        assert read_image(tmp_path / name).shape == (32, 32, 3), name
    assert np.all(read_image(tmp_path / "alpha.png") == (10, 20, 30))
    exact = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(exact).save(tmp_path / "exact.png")
    assert np.array_equal(read_image(tmp_path / "exact.png"), exact)


def test_large_jpeg_photos_get_the_known_answer(capsys, tiny_model, tmp_path):
    model, _, _ = tiny_model
    images, labels = colour_images(per_class=1, seed=5)
    for image, label in zip(images, labels, strict=True):
        big = Image.fromarray(image).resize((400, 300), Image.Resampling.NEAREST)
        big.save(tmp_path / f"{CLASSES[label]}.JPG", quality=90)
    status, out, _ = predict(capsys, str(tmp_path), "--model", str(model), "--json", "--top-k", "1")
    assert status == 0
    predictions = json.loads(out)["predictions"]
    assert len(predictions) == len(CLASSES)  # the upper-case suffix is found too
    for prediction in predictions:
        assert prediction["top_k"][0]["class"] == Path(prediction["file"]).stem


def test_flip_tta_averages_the_logits_of_image_and_mirror(capsys, tiny_model, tmp_path):
    model_path, _, _ = tiny_model
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "noise.png")
    status, out, _ = predict(capsys, str(tmp_path / "noise.png"), "--model", str(model_path), "--tta", "--json")
    assert status == 0 and json.loads(out)["tta"] is True
    got = {e["class"]: e["probability"] for e in json.loads(out)["predictions"][0]["top_k"]}
    classifier = load_classifier(model_path)
    cpu = torch.device("cpu")
    logits = batch_logits(classifier.model, image[None], classifier.mean, classifier.std, cpu)
    mirrored = batch_logits(classifier.model, image[None, :, ::-1].copy(), classifier.mean, classifier.std, cpu)
    expected = torch.from_numpy((logits + mirrored) / 2).softmax(dim=1)[0]
    for name, probability in got.items():
        assert probability == pytest.approx(expected[CLASSES.index(name)].item(), abs=1e-5)


def test_bad_files_get_one_line_each_and_the_others_are_still_answered(capsys, tiny_model, photos, tmp_path):
    model, _, _ = tiny_model
    _, files, labels = photos
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "cut.png").write_bytes(files[0].read_bytes()[:200])
    (tmp_path / "empty").mkdir()
    bad = {
        str(tmp_path / "missing.jpg"): "no such file or folder",
        str(tmp_path / "notes.png"): "not an image (expected PNG or JPEG)",
        str(tmp_path / "cut.png"): "a broken or truncated image",
        str(tmp_path / "empty"): "a folder with no PNG or JPEG files in it",
    }
    status, out, err = predict(capsys, str(files[0]), *bad, str(files[1]), "--model", str(model))
    assert status == 1
    assert [line.split(":")[0] for line in out.splitlines()] == [str(files[0]), str(files[1])]
    assert out.splitlines()[1].split(": ")[1].startswith(CLASSES[labels[1]])
    lines = err.splitlines()
    assert len(lines) == len(bad) and "Traceback" not in err
    for path, message in bad.items():
        assert sum(line.startswith(f"error: {path}: {message}") for line in lines) == 1, (path, err)

    status, out, err = predict(capsys, str(tmp_path / "notes.png"), str(files[0]), "--model", str(model), "--json")
    assert status == 1
    document = json.loads(out)
    assert [p["file"] for p in document["predictions"]] == [str(files[0])]
    assert document["errors"] == [{"file": str(tmp_path / "notes.png"), "error": "not an image (expected PNG or JPEG)"}]


def test_unreadable_file_is_named(capsys, tiny_model, photos, tmp_path, monkeypatch):
    locked = tmp_path / "locked.png"
    locked.write_bytes(photos[1][0].read_bytes())
    locked.chmod(0)
    if os.geteuid() == 0:  # root (as in CI) reads any file: have opening it fail as it does for everyone else
        opened = PIL.Image.open

        def refused(path, *args, **kwargs):
            if str(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return opened(path, *args, **kwargs)

        monkeypatch.setattr(PIL.Image, "open", refused)
    status, _, err = predict(capsys, str(locked), "--model", str(tiny_model[0]))
    assert status == 1 and err == f"error: {locked}: cannot be read: Permission denied\n"


def _saved(path: Path, content) -> Path:
    torch.save(content, path)
    return path


def _without_stats(folder: Path) -> Path:
    """A checkpoint in the pipeline's format, but without the class names, mean and std the train stage adds."""
    kwargs = {"dropout": 0.0, "downsample": "stride"}
    state = build_model("dilated_net", **kwargs).state_dict()
    content = {"format": FORMAT, "model_name": "dilated_net", "model_kwargs": kwargs, "state_dict": state}
    return _saved(folder / "m.pt", content)


def _garbage(folder: Path) -> Path:
    (folder / "m.pt").write_bytes(b"\x89PNG, not a checkpoint")
    return folder / "m.pt"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nowhere.pt", "nowhere.pt does not exist: run the 'train' stage first"),
        (lambda d: _saved(d / "m.pt", build_model("dilated_net").state_dict()), "it looks like a bare state_dict"),
        (_garbage, "is not a readable checkpoint"),
        (lambda d: _saved(d / "m.pt", {"format": FORMAT, "x": Payload(d / "ran")}), "refused and nothing in it was"),
        (_without_stats, "has no classes, mean, std: it was not written by the train stage"),
    ],
    ids=["missing", "foreign", "garbage", "tampered", "no-stats"],
)
def test_bad_checkpoint_is_one_line_and_exit_2(capsys, photos, tmp_path, make, message):
    model = make(tmp_path)
    status, out, err = predict(capsys, str(photos[1][0]), "--model", str(model))
    assert status == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "ran").exists()


def test_installed_command_refuses_a_tampered_checkpoint_without_a_traceback(photos, tmp_path):
    _saved(tmp_path / "m.pt", {"format": FORMAT, "x": Payload(tmp_path / "ran")})
    result = subprocess.run(
        [str(SCRIPT), str(photos[1][0]), "--model", str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "ran").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_missing_gpu_names_the_option(capsys, tiny_model, photos):
    status, _, err = predict(capsys, str(photos[1][0]), "--model", str(tiny_model[0]), "--device", "cuda")
    assert status == 2
    assert err == "error: --device is 'cuda' but no CUDA device is available here: set --device to auto (or cpu)\n"


@pytest.mark.parametrize("args", [["--top-k", "0"], ["--batch-size", "x"], ["--device", "tpu"], []])
def test_bad_arguments_are_usage_errors(capsys, args):
    status, _, err = predict(capsys, *args, *(["a.png"] if args else []))
    assert status == 2 and "usage: cifar-predict" in err and "Traceback" not in err


def test_progress_bar_and_folder_search(tiny_model, photos, capsys):
    folder, files, _ = photos
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "README.txt").write_text("not searched")
    found, problems = find_images([folder])
    assert found == files and problems == []
    classifier = load_classifier(tiny_model[0])
    list(classify(classifier, files, torch.device("cpu"), batch_size=16, progress=True))
    assert f"{len(files)}/{len(files)}" in capsys.readouterr().err
    list(classify(classifier, files, torch.device("cpu"), batch_size=16, progress=False))
    assert capsys.readouterr().err == ""


def test_top_k_larger_than_the_classes_shows_every_class(capsys, tiny_model, photos):
    status, out, _ = predict(capsys, str(photos[1][0]), "--model", str(tiny_model[0]), "--top-k", "50", "--json")
    assert status == 0
    top = json.loads(out)["predictions"][0]["top_k"]
    assert sorted(e["class"] for e in top) == sorted(CLASSES)
    assert sum(e["probability"] for e in top) == pytest.approx(1, abs=1e-4)
