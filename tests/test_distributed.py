"""Data-parallel training (training/runtime.py) on the CPU with gloo: N processes train the run of one process.

The stage runs use test_train_stage's small project (dilated_net, 40 training images, batches of 20) with
train.devices: 2, so the train stage starts itself under torchrun, as `dvc repro` runs it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import gloo_aborted
from test_train_stage import PARAMS, STAGES, kill_after_a_saved_epoch, make_project, run_stage, stage_env
from test_training import TIMING, assert_same_outputs, colour_images, outputs, read_tsv
from torch import nn

from cifar_pipeline.models import build_model
from cifar_pipeline.params import AugmentParams
from cifar_pipeline.training.loader import batch_sampler, make_train_loader, set_epoch, share
from cifar_pipeline.training.runtime import GlobalBatchNorm, finish, report_crashes, sync_batchnorm, wrap

pytestmark = pytest.mark.slow  # processes: make test-fast skips it

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# --- which images each process trains on ---------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "world_size"), [(20, 2), (21, 2), (3, 3), (2, 3), (1, 2), (512, 3)])
def test_the_shares_of_a_batch_are_contiguous_and_cover_it_once(size, world_size):
    parts = [share(size, rank, world_size) for rank in range(world_size)]
    assert [i for part in parts for i in range(size)[part]] == list(range(size))
    lengths = [len(range(size)[part]) for part in parts]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


@pytest.mark.parametrize("backend", ["albumentations", "gpu"])
@pytest.mark.parametrize(("n", "world_size"), [(23, 2), (22, 3)])  # last batches of 3 and 2 images: 3 gets none
def test_every_process_share_put_together_is_the_one_process_batch(backend, n, world_size):
    """The same images, in the same order, with the same augmentation, for any number of processes."""
    images, labels = colour_images(n, seed=3)
    augment = AugmentParams(backend=backend)
    options = {"batch_size": 10, "seed": 5, "num_workers": 0, "device": torch.device("cpu")}

    def epoch(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = make_train_loader(
            images, labels, augment, MEAN, STD, backend=backend, **options, rank=rank, world_size=world
        )
        set_epoch(loader, 1)
        return list(loader)

    whole = epoch(0, 1)
    shares = [epoch(rank, world_size) for rank in range(world_size)]
    assert [len(y) for _, y in whole] == [10, 10, n - 20]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([s[step][0] for s in shares]), x)
        assert torch.equal(torch.cat([s[step][1] for s in shares]), y)


def test_global_sizes_are_the_batches_of_one_process():
    assert batch_sampler(45, 0, 20, train=True, rank=1, world_size=2).global_sizes() == [20, 20, 5]
    assert batch_sampler(41, 0, 20, train=True, rank=0, world_size=2).global_sizes() == [20, 20]  # a lone 1 dropped
    assert batch_sampler(45, 0, 20, train=True, full_batches=True, world_size=2).global_sizes() == [20, 20]


# --- synchronised batch norm and the loss's weight -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("dilated_net", dropout=0.0, downsample="stride", num_classes=10)


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator)


CASES = [(21, 2), (2, 3)]  # uneven shares; a process with no image of a short batch


def one_step(rank: int, world_size: int, port: int, size: int, out: str) -> None:
    """One process's part of a train step on batch(size), as engine.train_epoch weighs it; rank 0 saves the
    gradients and the batch norms' running statistics."""
    report_crashes()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = sync_batchnorm(new_model(), "cpu")
    images, labels = batch(size)
    part = share(size, rank, world_size)
    ddp = wrap(model, torch.device("cpu"))  # kept until after backward: its hooks all-reduce the gradients
    loss = nn.CrossEntropyLoss(reduction="sum")(ddp(images[part]), labels[part])
    (loss * world_size / size).backward()
    if rank == 0:
        grads = {name: p.grad for name, p in model.named_parameters()}
        torch.save({"grads": grads, "buffers": dict(model.named_buffers())}, out)
    finish()  # as the train stage ends: nobody tears the group down while a peer still works in it
    dist.destroy_process_group()


def steps(rank: int, ports: list[int], out: str) -> None:
    """Every case of CASES in turn, by the processes of the largest world (a process group for each case)."""
    for case, ((size, world_size), port) in enumerate(zip(CASES, ports, strict=True)):
        if rank < world_size:
            one_step(rank, world_size, port, size, f"{out}{case}")


def test_a_step_on_several_processes_has_the_gradient_of_one(tmp_path, capfd):
    """Gradients and running statistics equal one process's up to float rounding (fp32: relative 1e-5)."""
    out = str(tmp_path / "rank0-")
    for attempt in (1, 2):
        ports = [free_port() for _ in CASES]
        try:
            mp.spawn(steps, args=(ports, out), nprocs=max(world for _, world in CASES))
            break
        except mp.ProcessExitedException as exc:  # gloo's rare abort (conftest.GLOO_ABORT): once more, with its stacks
            if attempt == 2 or exc.signal_name != "SIGABRT":
                raise
            left = "\n".join(capfd.readouterr())
            warnings.warn(f"a process aborted ({exc}), run again:\n{left}", stacklevel=1)
    torch.set_num_threads(1)
    for case, (size, _) in enumerate(CASES):
        distributed = torch.load(f"{out}{case}", weights_only=True)
        model = new_model()
        images, labels = batch(size)
        nn.CrossEntropyLoss()(model(images), labels).backward()
        for name, p in model.named_parameters():
            scale = p.grad.abs().max().item()
            assert (distributed["grads"][name] - p.grad).abs().max().item() <= 1e-5 * scale + 1e-9, (case, name)
        for name, buffer in model.named_buffers():
            assert torch.allclose(distributed["buffers"][name].double(), buffer.double(), rtol=1e-5, atol=1e-7), name


def test_a_training_process_that_aborts_in_cpp_prints_where_it_was_in_python():
    code = (
        "import os\nfrom cifar_pipeline.training.runtime import report_crashes\n"
        "def all_reduce_of_the_step():\n    os.abort()  # what std::terminate does\n"
        "report_crashes()\nall_reduce_of_the_step()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == -6  # SIGABRT, as before
    assert "Fatal Python error: Aborted" in result.stderr
    assert "line 4 in all_reduce_of_the_step" in result.stderr


def test_sync_batchnorm_keeps_the_state_dict_and_evaluates_as_batch_norm():
    model = new_model()
    model.eval()
    converted = sync_batchnorm(new_model(), "cpu")
    converted.eval()
    assert any(isinstance(m, GlobalBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    state, mine = model.state_dict(), converted.state_dict()
    assert list(state) == list(mine) and all(torch.equal(state[k], mine[k]) for k in state)
    images, _ = batch(4)
    with torch.no_grad():
        assert torch.equal(model(images), converted(images))  # evaluation needs no process group


# --- the train stage on two processes ------------------------------------------------------------------------------

# fp32 and a fixed LR: the comparison is about the processes, not about bf16 or the range test.
DDP = {**PARAMS, "train": {**PARAMS["train"], "max_lr": 0.001, "precision": "fp32"}}
TWO = {**DDP, "train": {**DDP["train"], "devices": 2}}

# How far two processes may end from one. Only the order of float additions differs (the gradient's all-reduce, the
# batch statistics summed in two parts), which moves a step's gradient by ~1e-6 relative
# (test_a_step_on_several_processes_has_the_gradient_of_one); Adam's first steps divide each gradient by its own
# size, so a near-zero gradient's rounding can change its update's sign, and that grows over the run. Measured on
# this project: one process with train.channels_last false instead of true (nothing but the order of the additions
# in the convolutions changes) ends its epochs up to 0.0013 apart in loss and one image apart in accuracy; two
# processes end 0.0009 from one. The bound is a few times that: a real mistake (a batch statistic or a gradient of
# one share instead of the batch, a batch trained twice) moves the losses by 0.01-0.1 from the first epochs on.
LOSS_TOLERANCE = 0.005
TRAIN_IMAGES, TEST_IMAGES = PARAMS["data"]["train_subset"], PARAMS["data"]["test_subset"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("one"), DDP)
    result = run_stage(root)
    assert result.returncode == 0, result.stderr
    return root


def run_stage_on_processes(root: Path) -> subprocess.CompletedProcess:
    """run_stage, once more in place on gloo's abort (the stage resumes after its last saved epoch, which
    test_a_killed_two_process_run_leaves_no_process_and_resumes_to_the_same_result shows changes nothing); the
    stdout of both runs."""
    result = run_stage(root)
    if gloo_aborted(result):
        warnings.warn(f"a training process aborted, run again:\n{result.stdout}\n{result.stderr}", stacklevel=2)
        first = result.stdout
        result = run_stage(root)
        result.stdout = first + result.stdout
    return result


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = make_project(tmp_path_factory.mktemp("two"), TWO)
    result = run_stage(root)
    if gloo_aborted(result):  # from scratch: the tests count the epochs it prints
        left = f"{result.stdout}\n{result.stderr}"
        warnings.warn(f"two-process run aborted, run again from scratch:\n{left}", stacklevel=1)
        root = make_project(tmp_path_factory.mktemp("two-again"), TWO)
        result = run_stage(root)
    assert result.returncode == 0, result.stderr
    return root, result


def epoch_metrics(root: Path) -> dict[str, list[float]]:
    plots = root / "reports/train/plots/metrics"
    return {
        name: [float(row[Path(name).name]) for row in read_tsv(plots / f"{name}.tsv")]
        for name in ("train/loss", "train/acc", "test/loss", "test/acc")
    }


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_two_processes_train_the_run_of_one(one_process, two_processes):
    root, result = two_processes
    one, two = epoch_metrics(one_process), epoch_metrics(root)
    assert len(two["train/loss"]) == 3
    # The first epoch's losses come before any rounding difference has reached an Adam update's sign.
    assert two["train/loss"][0] == pytest.approx(one["train/loss"][0], rel=1e-5)
    assert two["test/loss"][0] == pytest.approx(one["test/loss"][0], rel=1e-5)
    for split, images in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        assert np.allclose(two[f"{split}/loss"], one[f"{split}/loss"], rtol=0, atol=LOSS_TOLERANCE), split
        image = 100 / images  # one image, in percent
        assert np.allclose(two[f"{split}/acc"], one[f"{split}/acc"], rtol=0, atol=image + 1e-6), split
    assert "on 2 processes (cpu, gloo)" in result.stdout


def test_two_processes_write_the_outputs_of_one_once(one_process, two_processes):
    root, result = two_processes
    assert files(root) == files(one_process)
    for epoch in (1, 2, 3):  # rank 0 alone prints
        assert result.stdout.count(f"epoch {epoch}/3 ") == 1
    assert result.stdout.count("final test accuracy") == 1
    mine, theirs = outputs(root), outputs(one_process)
    assert mine["weights"]["model.pt"].keys() == theirs["weights"]["model.pt"].keys()  # plain batch norm names
    assert set(mine["metrics"]) | set(TIMING) == set(theirs["metrics"]) | set(TIMING)
    assert mine["metrics"]["step"] == 3


def processes_in(root: Path) -> list[int]:
    """The pids of the processes working in `root` (the train stage and its torchrun processes)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == root:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_two_process_run_leaves_no_process_and_resumes_to_the_same_result(two_processes, tmp_path):
    reference, _ = two_processes
    root = make_project(tmp_path, TWO).resolve()
    resume = root / ".resume/train.pt"
    kill_after_a_saved_epoch(root)  # the stage alone: torchrun's processes must die with it
    deadline = time.monotonic() + 30
    while processes_in(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_in(root) == [], "training processes outlived the killed stage"
    saved = torch.load(resume, weights_only=True)
    assert saved["epoch"] in (1, 2) and len(saved["rng"]) == 2  # every process's RNG states

    result = run_stage_on_processes(root)
    assert result.returncode == 0, result.stderr
    assert f"resuming after epoch {saved['epoch']} of 3" in result.stdout
    assert not resume.exists()
    assert_same_outputs(outputs(reference), outputs(root))


def test_a_failing_process_ends_the_stage_with_its_message(tmp_path):
    root = make_project(tmp_path, TWO, std=(1e-40, 1e-40, 1e-40))  # normalised pixels overflow to inf
    result = run_stage_on_processes(root)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: the training loss became nan in epoch 1, step 1 of 2" in result.stderr
    assert result.stderr.rstrip().endswith("its message is above")
    assert not (root / "models/model.pt").exists()


def test_torchrun_with_another_process_count_than_train_devices_is_refused(tmp_path):
    """Started by hand (several machines, docs/scaling.md), the processes on a machine must be train.devices: dvc.lock
    records the params, so they must say how the run trained."""
    root = make_project(tmp_path, DDP)  # train.devices: 1
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(STAGES / "train.py"),
        ],
        cwd=root,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    message = "error: torchrun started 2 training processes on this machine but train.devices is 1"
    assert message in result.stderr and "set train.devices: 2 in params.yaml" in result.stderr
    assert not (root / "models/model.pt").exists()
