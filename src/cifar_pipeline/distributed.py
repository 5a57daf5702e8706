"""Data-parallel training on several processes: PyTorch DDP, its processes started by torchrun.

`train.devices: N` (N > 1) makes the train stage start itself again under torchrun (`--standalone
--nproc-per-node N`), so `dvc repro` and `dvc exp run` need no other command. A stage that torchrun started (several
machines: docs/scaling.md) trains on the processes torchrun made.

The run is the same as on one process, up to the order of float additions:
- every process iterates sampling.py's global batches of train.batch_size images and takes a contiguous share of
  each (sampling.share), so the batches, their order and every image's augmentation do not depend on the process count;
- BatchNorm normalises with the statistics of the whole global batch: nn.SyncBatchNorm on CUDA, and on the CPU
  (gloo), where nn.SyncBatchNorm refuses to run, GlobalBatchNorm below;
- each process's loss is its images' summed cross-entropy times (processes / global batch size): DDP averages the
  gradients over the processes, which makes the gradient of the global batch's mean loss, also for a short last batch.
Rank 0 alone writes files (training.py); the epoch's metrics are summed over the processes (engine.py).
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cifar_pipeline.errors import PipelineError
from cifar_pipeline.params import TrainParams
from cifar_pipeline.runtime import Runtime, autocast_dtype, pick_device, resolve_backend, resolve_num_workers

# Set by torchrun in every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def local_processes() -> int:
    """How many processes of the run share this machine (1 outside torchrun)."""
    return int(os.environ["LOCAL_WORLD_SIZE"]) if under_torchrun() else 1


def launch(devices: int, script: str) -> None:
    """Run `script` on `devices` processes on this machine under torchrun, and exit with their status.

    In this process, through torchrun's own entry point (torch.distributed.run), so that a failing process ends the
    stage with that process's message and exit status rather than with torchrun's traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    print(f"train.devices is {devices}: starting {devices} training processes with torchrun", flush=True)
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={devices}", script])
    try:
        run(args)
    except ChildFailedError as exc:
        # The first to fail on its own: torchrun then stops the others with SIGTERM (a negative exit status).
        rank, failure = min(exc.failures.items(), key=lambda item: (item[1].exitcode <= 0, item[1].timestamp))
        print(
            f"error: training process {rank} of {devices} failed (exit status {failure.exitcode}); "
            "its message is above",
            file=sys.stderr,
        )
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)
    except SignalException as exc:  # torchrun stopped its processes on SIGTERM or SIGINT: end as they did
        print(f"stopped by {exc.sigval.name}", file=sys.stderr)
        sys.exit(128 + exc.sigval)


def make_runtime(train: TrainParams, backend: str = "albumentations", num_workers: int | str = 0) -> Runtime:
    """The runtime of one of torchrun's processes, in its process group (NCCL on CUDA, gloo on the CPU): on CUDA the
    GPU of its local rank (no gpu_claim: the run's processes take GPUs 0..N-1 of CUDA_VISIBLE_DEVICES); `backend`
    and `num_workers` as runtime.make_runtime resolves them.

    torchrun's processes on this machine must be train.devices, also when a user starts torchrun (several machines).
    """
    device = pick_device(train.device)
    if device.type not in ("cuda", "cpu"):
        raise PipelineError(f"training on several processes runs on CUDA or the CPU, not on {device.type}")
    _die_with_torchrun()
    report_crashes()
    if local_processes() != train.devices:
        raise PipelineError(
            f"torchrun started {local_processes()} training processes on this machine but train.devices is "
            f"{train.devices}: set train.devices: {local_processes()} in params.yaml, so that the run's params say "
            "how it trained"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise PipelineError(
                f"{local_processes()} training processes on this machine but {torch.cuda.device_count()} GPUs: "
                "set train.devices to at most the GPU count"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not train.deterministic
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp_dtype = autocast_dtype(train.precision, device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local = local_processes()
    return Runtime(
        device,
        amp_dtype,
        train.channels_last,
        rank,
        world_size,
        local,
        distributed=True,
        backend=resolve_backend(backend, device),
        num_workers=resolve_num_workers(num_workers, local),
    )


def _die_with_torchrun() -> None:
    """Have the kernel kill this process when torchrun, its parent, dies (Linux).

    torchrun starts each process in a session of its own, so a SIGKILL of the train stage or of `dvc exp run` would
    leave them training unseen, writing the files of a run that its rerun is writing too.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request
        os._exit(1)


def report_crashes() -> None:
    """Have a process that dies in C++ (SIGABRT, SIGSEGV) print every Python thread's stack to stderr first.

    A CPU process of gloo very rarely dies with SIGABRT and no more than "terminate called without an active
    exception" (twice in the suite's runs, tests/conftest.py); the stacks say where.
    """
    if not faulthandler.is_enabled():
        faulthandler.enable()


def backend() -> str:
    """The process group's backend: nccl or gloo."""
    return str(dist.get_backend())


def finish() -> None:
    """Wait until every process is done with the group (rank 0 writes the last files while the others wait): a
    process that tears the group down while gloo's threads still serve a peer can die with SIGABRT."""
    if dist.is_initialized():
        dist.barrier()


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with the statistics of every process's share of the batch, for CPU processes (gloo).

    Two autograd-aware all-reduces a layer in training: the sums and the count (the mean), then the squared
    deviations from it (the variance), as one process computes them; the one-pass E[x^2] - E[x]^2 would lose digits
    that one process keeps. In fp32 whatever the input (CPU batch norm keeps its statistics in fp32 too).
    Evaluation is plain BatchNorm2d on the running statistics, which are the same on every process.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = (0, 2, 3)
        values = x.float()
        count = values.new_tensor([values.numel() // values.shape[1]])
        sums = _summed(torch.cat([values.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        deviation = values - mean.view(1, -1, 1, 1)
        var = _summed((deviation * deviation).sum(dims)) / n
        out = deviation * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), momentum)
        return out.to(x.dtype)


class _Summed(torch.autograd.Function):
    """A tensor summed over every process; its gradient is summed over the processes too (each process's loss
    depends on every process's share through the batch statistics). Plain blocking all-reduces: PyTorch's
    functional collectives would do the same asynchronously, which buys nothing here."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


def _summed(tensor: torch.Tensor) -> torch.Tensor:
    return _Summed.apply(tensor)


def sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """`model` with every BatchNorm2d computing the global batch's statistics; same state_dict keys and values."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            replacement.to(next(child.buffers()).device)
            setattr(model, name, replacement)
        else:
            sync_batchnorm(child, device_type)
    return model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The DDP module that trains `model` (whose batch norms sync_batchnorm already converted)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every process (tensors come back on the CPU, as rank 0 had them)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every process's `obj`, in rank order, on rank 0 (None elsewhere)."""
    box = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, box, dst=0)
    return box
