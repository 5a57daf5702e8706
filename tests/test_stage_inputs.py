"""A stage run before its inputs exist (say, on a fresh clone) names the stage to run, without a traceback."""

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


@pytest.mark.parametrize("script", ["download.py", "compute_mean_std.py", "lr_find.py", "train.py", "report.py"])
def test_every_stage_validates_params_before_doing_anything(script, tmp_path):
    (tmp_path / "params.yaml").write_text(
        (ROOT / "params.yaml").read_text().replace("batch_size: 512", "batch_size: 0")
    )
    result = run_stage(script, tmp_path)
    assert result.returncode == 2
    assert "train.batch_size = 0: must be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
