"""Mean and std: exact, over the images the model trains on, and the stage script end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from archives import make_pickle_archive
from conftest import ROOT

from cifar_pipeline.data.dataset import compute_stats, load_splits, load_stats, mean_std
from cifar_pipeline.data.download import download
from cifar_pipeline.params import DataParams
from cifar_pipeline.stage import MissingInputError, PipelineError


def reference(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = images.reshape(-1, 3).astype(np.float64) / 255
    return pixels.mean(axis=0), pixels.std(axis=0)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_mean_std_matches_a_float64_reference_whatever_the_chunk(chunk):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    images[..., 2] //= 2  # channels differ
    mean, std = mean_std(images, chunk=chunk)
    expected_mean, expected_std = reference(images)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(std, expected_std, rtol=1e-12)
    assert mean[2] < mean[0] / 1.5


def test_mean_std_of_constant_images():
    images = np.full((4, 32, 32, 3), (0, 51, 255), dtype=np.uint8)
    mean, std = mean_std(images)
    np.testing.assert_allclose(mean, (0.0, 0.2, 1.0))
    assert std == (0.0, 0.0, 0.0)


def test_mean_std_refuses_floats_and_empty_arrays():
    with pytest.raises(PipelineError, match="uint8"):
        mean_std(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(PipelineError, match="non-empty"):
        mean_std(np.zeros((0, 32, 32, 3), np.uint8))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with data/cifar10 written by the download stage: 100 train, 20 test images."""
    root = tmp_path_factory.mktemp("project")
    make_pickle_archive(root / "cifar.tar.gz", n_train=100, n_test=20, seed=4)
    download(str(root / "cifar.tar.gz"), None, root / "data" / "cifar10")
    return root


def test_stats_cover_only_the_images_trained_on(project, tmp_path):
    data = DataParams(train_subset=60, val_size=20)
    stats = compute_stats(project / "data" / "cifar10", data, seed=3, path=tmp_path / "stats.json")
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    train = load_splits(project / "data" / "cifar10", data, seed=3).train_images
    assert stats["count"] == len(train) == 40
    expected_mean, expected_std = reference(train)
    np.testing.assert_allclose(stats["mean"], expected_mean, rtol=1e-12)
    np.testing.assert_allclose(stats["std"], expected_std, rtol=1e-12)
    assert load_stats(tmp_path / "stats.json") == (tuple(stats["mean"]), tuple(stats["std"]))


def test_load_stats_errors(tmp_path):
    with pytest.raises(MissingInputError, match="run the 'compute-mean-std' stage first"):
        load_stats(tmp_path / "stats.json")
    (tmp_path / "stats.json").write_text('{"mean": [0.5, 0.5]}')
    with pytest.raises(PipelineError, match="not a valid stats file"):
        load_stats(tmp_path / "stats.json")
    (tmp_path / "stats.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}')
    with pytest.raises(PipelineError, match="not a valid stats file.*std be > 0"):
        load_stats(tmp_path / "stats.json")


def run_stage(project: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}
    script = ROOT / "stages" / "compute_mean_std.py"
    return subprocess.run([sys.executable, str(script)], cwd=project, env=env, capture_output=True, text=True)


def test_stage_script_end_to_end(project):
    (project / "params.yaml").write_text("seed: 1\ndata:\n  val_size: 10\n")
    result = run_stage(project)
    assert result.returncode == 0, result.stderr
    stats = json.loads((project / "data" / "stats.json").read_text())
    train = load_splits(project / "data" / "cifar10", DataParams(val_size=10), seed=1).train_images
    assert stats["count"] == 90 and "over 90 train images" in result.stdout
    np.testing.assert_allclose(stats["mean"], reference(train)[0], rtol=1e-12)


def test_stage_script_without_data_names_the_download_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    result = run_stage(tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (
        "error: data/cifar10 does not exist: run the 'download' stage first (dvc repro download), "
        "or the whole pipeline with dvc repro\n"
    )
    assert not (tmp_path / "data").exists()


def test_a_rerun_writes_byte_identical_stats_and_its_time_apart(project):
    # data/stats.json feeds lr-find and train: a byte that changes on a rerun would retrain for nothing.
    (project / "params.yaml").write_text("seed: 1\n")
    assert run_stage(project).returncode == 0
    first = (project / "data/stats.json").read_bytes()
    assert run_stage(project).returncode == 0
    assert (project / "data/stats.json").read_bytes() == first and b"wall_time_s" not in first
    assert json.loads((project / "reports/compute_mean_std_time.json").read_text())["wall_time_s"] > 0
