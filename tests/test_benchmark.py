"""The benchmark runs end to end on the CPU with small settings and reports every figure it promises."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from torch import nn

pytestmark = pytest.mark.slow  # subprocesses or large models: make test-fast skips it


def test_small_benchmark_prints_and_saves_every_figure(tmp_path):
    # A project of its own: the params file, and two stage outputs whose wall times the benchmark reads back.
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "compute_mean_std_time.json").write_text(json.dumps({"wall_time_s": 12.5}))
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
    assert {r["kind"] for r in measured} == {"train", "step", "loader", "eval", "ceiling"}
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

    # The fp32 ceiling: the measured dense peak over the model's FLOPs, above what the fp32 step reaches.
    ceiling = rows[("ceiling", "fp32 dense peak / model FLOPs")]
    assert ceiling["images_per_s"] == pytest.approx(ceiling["peak_gflop_per_s"] / ceiling["gflop_per_image"], rel=0.01)
    fp32_steps = [r for r in measured if r["kind"] == "step" and r["note"].startswith("fp32")]
    assert fp32_steps and all(r["images_per_s"] < ceiling["images_per_s"] for r in fp32_steps)

    stages = {r["name"]: r["seconds"] for r in result["rows"] if r["kind"] == "stage"}
    assert stages == {"download": None, "compute-mean-std": 12.5, "lr-find": None, "train": 345.0}
    for r in measured:
        assert r["name"] in done.stdout
    assert "x the baseline" in done.stdout


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_train_flops_count_forward_and_weight_gradients_but_no_input_gradient():
    bench = load_bench()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    # Forward: 2 FLOPs per multiply-add. Backward: the weight gradient only, the images need none.
    assert bench.train_gflop_per_image(model) * 1e9 == pytest.approx(2 * (2 * 3072 * 10))
    assert all(p.grad is None for p in model.parameters())

    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 32 * 32, 10))
    first, second, linear = 2 * 32 * 32 * 3 * 8 * 9, 2 * 32 * 32 * 8 * 4, 2 * 4096 * 10
    # Every layer after the first also passes a gradient back to its input: the same FLOPs again.
    expected = 2 * first + 3 * second + 3 * linear
    assert bench.train_gflop_per_image(conv) * 1e9 == pytest.approx(expected)


def test_grouped_conv_flops_are_counted_per_group():
    # torch's own formula counts a depthwise conv's weight gradient as if the conv were dense (64x here), which put
    # the fp32 ceiling below measured steps. Forward: 2 * 64 channels * 9 taps * 32 * 32 positions; the backward
    # computes the input and the weight gradient, each as costly as the forward.
    bench = load_bench()
    model = nn.Sequential(
        nn.Conv2d(3, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Flatten(), nn.Linear(64 * 1024, 10)
    )
    stem, depthwise, linear = 2 * 1024 * 3 * 64, 2 * 64 * 9 * 1024, 2 * 64 * 1024 * 10
    assert bench.train_gflop_per_image(model) * 1e9 == pytest.approx(2 * stem + 3 * depthwise + 3 * linear)


def test_profile_step_shows_the_ops_and_the_share_of_convolutions(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--params", str(tmp_path / "params.yaml")]
    command += ["--model", "dilated_net", "--batch-size", "8", "--steps", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "aten::convolution_backward" in done.stdout
    summary = re.search(r"dilated_net, batch 8, 1 steps on cpu .* convolutions ([\d.]+)% of it", done.stdout)
    assert summary and 5 < float(summary.group(1)) < 100
