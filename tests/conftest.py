"""Shared test set-up: offline, quiet, small, and the paths tests need."""

import os
from pathlib import Path

import pytest

# Offline and quiet: no update checks, no analytics, deterministic DVC behaviour in tests.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DVC_TEST", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def pytest_collection_modifyitems(config, items):
    if SHARED_CIFAR.is_file():
        return
    skip = pytest.mark.skip(reason=f"shared CIFAR-10 copy not found at {SHARED_CIFAR}")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


def dvc_plot_values(project: Path, name: str, x: str, file: str, y: str) -> list[dict]:
    """The data points `dvc plots show` renders for one plot declared as {x, y: {file: y}} in `project`."""
    import json
    import subprocess
    import sys

    (project / "dvc.yaml").write_text(f"plots:\n  - {name}:\n      x: {x}\n      y:\n        {file}: {y}\n")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    shown = subprocess.run([*dvc, "plots", "show", "--json"], cwd=project, check=True, capture_output=True, text=True)
    rendered = json.loads(shown.stdout)
    assert "errors" not in rendered, rendered["errors"]
    [plot] = rendered["data"][name]
    return plot["content"]["data"]["values"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(checkpoint path, training images, labels) of a model trained on a tiny colour set: it knows their labels."""
    from tiny_model import train_tiny_model

    path = tmp_path_factory.mktemp("tiny_model") / "model.pt"
    images, labels = train_tiny_model(path)
    return path, images, labels
