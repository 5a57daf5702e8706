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
