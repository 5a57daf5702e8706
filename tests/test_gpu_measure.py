"""benchmarks/gpu_measure.sh on the CPU: SMOKE=1 --quick end to end, and a deadline that stops it cleanly."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from archives import learnable_archive
from conftest import ROOT

pytestmark = pytest.mark.e2e


def measure(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    archive = tmp_path / "tiny.tar.gz"
    learnable_archive(archive, per_class_train=20, per_class_test=10)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    out = tmp_path / "out"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the stages call `python`, and dvc
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_measure.sh"), *args, str(archive), md5, str(out)],
        env={**os.environ, "PATH": path, "SMOKE": "1", "TMPDIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, out


def members(out: Path) -> set[str]:
    with tarfile.open(out / "results.tar.gz") as tar:
        return set(tar.getnames())


def test_quick_smoke_run_keeps_every_result(tmp_path):
    done, out = measure(tmp_path, "--quick")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["default", "ddp", "bench"]
    assert summary[0].startswith("default: done in") and "test acc" in summary[0]
    assert summary[1].startswith("ddp: done in") and "on 1 process (cpu, gloo), test acc" in summary[1]
    assert summary[2].startswith("bench: done in")
    names = members(out)
    assert {"results/default/reports/train/metrics.json", "results/default/dvc.lock", "results/bench.json"} <= names
    assert "results/ddp/train/metrics.json" in names
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.txt"]  # no temporary file left


def test_a_step_that_does_not_fit_before_the_deadline_is_not_started(tmp_path):
    done, out = measure(tmp_path, "--quick", DEADLINE_S="5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "summary.txt").read_text().startswith("default: not started: needs ~60 s")
    assert members(out) == {"results", "results/summary.txt"}
    assert "dvc repro" not in done.stdout and "=== default:" not in done.stdout


def test_a_failing_import_stops_before_any_run(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "albumentations.py").write_text("raise ImportError('no albumentations here')\n")
    done, out = measure(tmp_path, "--quick", PYTHONPATH=str(shadow))
    assert done.returncode == 3
    assert "import check failed: nothing was run" in done.stderr and "no albumentations here" in done.stderr
    assert not (out / "results.tar.gz").exists()
