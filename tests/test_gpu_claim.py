"""GPU claims for concurrent runs (training/runtime.py): real processes, a faked GPU count (no GPU needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_pipeline.params import TrainParams
from cifar_pipeline.training import runtime

pytestmark = pytest.mark.skipif(runtime.fcntl is None, reason="flock is POSIX-only")

# A training process as far as the claim goes: claim one of 2 GPUs, then hold it until told to stop.
HOLDER = """
import sys, time
from pathlib import Path
from cifar_pipeline.training.runtime import claim_gpu
folder = Path(sys.argv[1])
index = claim_gpu(2, folder=folder, poll_s=0.05, say=lambda m: print(m, flush=True))
print(f"index {index}", flush=True)
while not (folder / f"stop-{sys.argv[2]}").exists():
    time.sleep(0.05)
"""


def start(folder: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), name], stdout=subprocess.PIPE, text=True)


def next_line(process: subprocess.Popen) -> str:
    return process.stdout.readline().strip()


def test_concurrent_runs_take_distinct_gpus_and_the_next_waits_for_one_to_free(tmp_path):
    first, second = start(tmp_path, "a"), start(tmp_path, "b")
    lines = [next_line(first), next_line(first), next_line(second), next_line(second)]
    assert {lines[1], lines[3]} == {"index 0", "index 1"}, lines
    assert all(line.startswith("claimed GPU ") for line in (lines[0], lines[2]))

    third = start(tmp_path, "c")
    assert (
        next_line(third) == f"all 2 GPUs are held by other runs of this pipeline (locks in {tmp_path}): waiting for one"
    )
    holder_of_0 = first if lines[1] == "index 0" else second
    holder_of_0.send_signal(signal.SIGKILL)  # killed, not stopped politely: the kernel still releases its lock
    holder_of_0.wait()
    claimed = next_line(third)
    assert claimed.startswith("claimed GPU 0 (cuda:0) for this process after waiting"), claimed
    assert next_line(third) == "index 0"
    for name in "abc":
        (tmp_path / f"stop-{name}").touch()
    for process in (first, second, third):
        process.wait(timeout=30)
        process.stdout.close()


def test_gpu_ids_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert runtime.gpu_ids(2) == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert runtime.gpu_ids(3) == ["0", "1", "2"]


@pytest.fixture
def fake_gpus(monkeypatch, tmp_path):
    """torch sees two GPUs (none is touched): what make_runtime needs to pick one."""
    monkeypatch.setattr(runtime, "_claim", {})
    monkeypatch.setenv(runtime.LOCK_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_device_auto_trains_on_the_gpu_it_claimed_and_cuda_claims_nothing(fake_gpus, tmp_path, capsys):
    held = os.open(tmp_path / "gpu-0.lock", os.O_RDWR | os.O_CREAT)
    runtime.fcntl.flock(held, runtime.fcntl.LOCK_EX)  # another run holds GPU 0
    try:
        chosen = runtime.make_runtime(TrainParams(device="auto"))
        assert chosen.device == torch.device("cuda", 1) and fake_gpus == [torch.device("cuda", 1)]
        assert "claimed GPU 1 (cuda:1)" in capsys.readouterr().out
        assert runtime.make_runtime(TrainParams(device="auto")).device == torch.device("cuda", 1)  # the same again
    finally:
        os.close(held)
    assert runtime.make_runtime(TrainParams(device="cuda")).device == torch.device("cuda")
    assert len(fake_gpus) == 2  # only the auto runtimes set a device
