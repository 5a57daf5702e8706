"""The benchmark runs end to end on the CPU with small settings and reports every figure it promises."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_small_benchmark_prints_and_saves_every_figure(tmp_path):
    # A project of its own: the params file, and two stage outputs whose wall times the benchmark reads back.
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stats.json").write_text(json.dumps({"wall_time_s": 12.5}))
    (tmp_path / "reports" / "train").mkdir(parents=True)
    (tmp_path / "reports" / "train" / "metrics.json").write_text(json.dumps({"wall_time_s": 345.0}))
    out = tmp_path / "bench.json"

    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--params", str(tmp_path / "params.yaml")]
    command += [
        "--model",
        "dilated_net",
        "--batches",
        "3",
        "--batch-size",
        "32",
        "--loader-batches",
        "4",
        "--workers",
        "1",
    ]
    command += ["--out", str(out)]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu") and result["model"] == "dilated_net" and result["batch_size"] == 32
    assert result["workers"] == 1 and len(result["load_average"]) == 2
    rows = {(r["kind"], r["name"]): r for r in result["rows"]}
    measured = [r for r in result["rows"] if r["kind"] != "stage"]
    assert {r["kind"] for r in measured} == {"train", "step", "loader", "eval"}
    for r in measured:
        assert r["images_per_s"] > 0 and r["images_per_s"] == pytest.approx(r["images"] / r["seconds"], rel=0.01)
    train = [r for r in measured if r["kind"] == "train"]
    assert [r["name"] for r in train] == [
        "baseline (notebook, workers=2)",
        "ours, albumentations backend, workers=1",
        "ours, gpu backend",
    ]
    assert all(r["images"] == 3 * 32 for r in train)
    assert rows[("loader", "device loader (gpu backend)")]["images"] == 4 * 32

    # The headline first: params.yaml's backend (albumentations) against the baseline.
    ratios = list(result["ratios"].items())
    assert ratios[0][0].startswith("ours, albumentations backend")
    assert ratios[0][1] == round(train[1]["images_per_s"] / train[0]["images_per_s"], 3)

    stages = {r["name"]: r["seconds"] for r in result["rows"] if r["kind"] == "stage"}
    assert stages == {"download": None, "compute-mean-std": 12.5, "lr-find": None, "train": 345.0}
    for r in measured:
        assert r["name"] in done.stdout
    assert "x the baseline" in done.stdout
