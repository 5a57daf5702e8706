"""A stage run before its inputs exist (say, on a fresh clone) names the stage to run, without a traceback; one run by
a python without the project's packages reruns itself with the project's .venv, or says how to run it."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def run_stage(script: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / script)], cwd=cwd, capture_output=True, text=True, env=os.environ
    )


@pytest.mark.parametrize("script", ["compute_mean_std.py", "lr_find.py", "train.py", "report.py"])
def test_stage_on_a_fresh_clone_says_to_run_download_first(script, tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    result = run_stage(script, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "run the 'download' stage first" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.tmp*")), "no half-written output"


@pytest.mark.parametrize(
    "script", ["check_params.py", "download.py", "compute_mean_std.py", "lr_find.py", "train.py", "report.py"]
)
def test_every_stage_validates_params_before_doing_anything(script, tmp_path):
    (tmp_path / "params.yaml").write_text(
        (ROOT / "params.yaml").read_text().replace("batch_size: 512", "batch_size: 0")
    )
    result = run_stage(script, tmp_path)
    assert result.returncode == 2
    assert "train.batch_size = 0: must be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# A python that cannot import the project (no site-packages, PYTHONPATH ignored), as the system's cannot.
BARE_PYTHON = [sys.executable, "-S", "-E"]


def stages_copy(tmp_path):
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests' Python is not a virtual environment")
def test_a_python_without_the_package_reruns_the_stage_with_the_projects_venv(tmp_path):
    stages_copy(tmp_path)
    (tmp_path / ".venv").symlink_to(sys.prefix)
    result = subprocess.run([*BARE_PYTHON, "stages/compute_mean_std.py"], cwd=tmp_path, capture_output=True, text=True)
    # Run by .venv's python, the stage read params.yaml and asks for the download stage's output.
    assert result.returncode == 2, result.stderr
    assert f"running the stage with {tmp_path / '.venv/bin/python'}" in result.stderr
    assert "run the 'download' stage first" in result.stderr and "Traceback" not in result.stderr


def test_a_python_without_the_package_and_no_venv_says_how_to_run_the_stage(tmp_path):
    stages_copy(tmp_path)
    result = subprocess.run([*BARE_PYTHON, "stages/download.py"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert (
        "cannot import cifar_pipeline. Run `make repro`" in result.stderr
        and "source .venv/bin/activate" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "stages"]
