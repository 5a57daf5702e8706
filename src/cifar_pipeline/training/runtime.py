"""Where and how a stage's model runs, resolved once per stage run, and the seam between one process and several.

`make_runtime` turns every `auto` of params.yaml that depends on the machine (the device, the autocast precision,
the augmentation backend, the loader workers) into its value, here and nowhere else; `Runtime.record()` names what
was used, for the run's files. On one process the Runtime's `parallel`, `broadcast`, `gather`, `all_reduce`,
`barrier`, `criterion` and `epoch_totals` are the identity or the plain thing; under torchrun (`train.devices` > 1)
they are DDP's and torch.distributed's (the last section), so the training code (train.py, engine.py) has one
path. Also: which GPU a run takes when several share a machine, and the seeding of every RNG.
"""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import os
import platform
import random
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cifar_pipeline.params import DEVICES, TrainParams
from cifar_pipeline.stage import PipelineError

# ---------------------------------------- the runtime ----------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs, chosen once from the `train` params."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # None: plain fp32
    channels_last: bool = False
    # Data-parallel training (below): this process's rank among world_size processes, local_size of them on this
    # machine; distributed: one of torchrun's processes (even if the only one), training through DDP.
    rank: int = 0
    world_size: int = 1
    local_size: int = 1
    distributed: bool = False
    backend: str = "albumentations"  # augment.backend, resolved: albumentations | gpu
    num_workers: int = 0  # data.num_workers, resolved: loader worker processes of this training process

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and prints its progress (rank 0)."""
        return self.rank == 0

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def record(self) -> dict[str, Any]:
        """What the run used, by name: for DVCLive's params, the checkpoints and the report."""
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.amp_dtype]
        return {
            "device": str(self.device),
            "hardware": device_name(self.device),
            "precision": precision,
            "augment_backend": self.backend,
            "loader_workers": self.num_workers,
            "processes": self.world_size,
            "torch": str(torch.__version__),  # a str subclass that YAML would not write
            "cuda": torch.version.cuda if self.device.type == "cuda" else None,
            "cudnn": torch.backends.cudnn.version() if self.device.type == "cuda" else None,
        }

    # The seam between one process and several: on one process each of these is the identity or does nothing, so
    # the training code reads straight through; on several they are DDP's and torch.distributed's.

    def parallel(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(the model, the module a train step calls): on several processes the model with synchronised batch norm,
        and its DDP wrapper."""
        if not self.distributed:
            return model, model
        model = sync_batchnorm(model, self.device.type)
        return model, wrap(model, self.device)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        return broadcast(obj) if self.distributed else obj

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's `obj` in rank order on rank 0 (None elsewhere)."""
        return gather(obj) if self.distributed else [obj]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of every process's `tensor`, on every process."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def criterion(self, loader: Any, label_smoothing: float) -> Callable[..., torch.Tensor]:
        """The train step's loss of batch `step`, criterion(step, logits, labels): the batch's mean cross-entropy. On
        several processes each has a share of the global batch (sizes may differ by one image): its summed loss times
        (processes / global batch size), so that DDP's mean of the gradients is the global batch's."""
        if not self.distributed:
            mean = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
            return lambda step, logits, labels: mean(logits, labels)
        summed = nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)
        weights = [self.world_size / size for size in loader.batch_sampler.global_sizes()]
        return lambda step, logits, labels: summed(logits, labels) * weights[step]

    def epoch_totals(
        self, loader: Any, step_losses: torch.Tensor, correct: torch.Tensor, sizes: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(each step's mean loss, correct count, batch sizes) of an epoch's global batches, from this process's
        criterion values, correct count and batch sizes: the same on every process."""
        if not self.distributed:
            return step_losses, correct, sizes
        # The criterion values sum over the processes to processes x the global batch's mean loss.
        step_losses = self.all_reduce(step_losses) / self.world_size
        return step_losses, self.all_reduce(correct), loader.batch_sampler.global_sizes()[: len(sizes)]

    def where(self) -> str:
        """Where the run trains, for its first line: the device, or the processes and their backend."""
        if not self.distributed:
            return str(self.device)
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        return f"{processes} ({self.device.type}, {dist.get_backend()})"

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.type == "cuda"  # overlaps the copy with compute when the loader pins memory
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=non_blocking, memory_format=memory_format)
        return images, labels.to(self.device, non_blocking=non_blocking)


def pick_device(setting: str, key: str = "train.device") -> torch.device:
    """`auto`: CUDA, then Apple MPS, then the CPU. An explicitly requested device must exist.

    `key` is where the user chose `setting` (a params.yaml key, or a command-line option such as --device).
    """
    if setting not in DEVICES:
        raise PipelineError(f"{key} must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {setting!r}")
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if setting == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (setting == "cuda" and not cuda) or (setting == "mps" and not mps):
        in_params = "" if key.startswith("-") else " in params.yaml"
        raise PipelineError(
            f"{key} is {setting!r} but no {setting.upper()} device is available here: "
            f"set {key} to auto (or cpu){in_params}"
        )
    return torch.device(setting)


def cpu_name() -> str:
    """The CPU's model name as the OS reports it (/proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cpus() -> int:
    """The CPUs this process may use (its affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@functools.cache  # every checkpoint records it; the hardware does not change during a run
def device_name(device: torch.device) -> str:
    """The hardware by name: the GPU's, or the CPU's with its core count and bf16 hardware."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU (MPS) of {cpu_name()}"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    bf16 = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if flag in flags]
    if not bf16 and cpu_has_native_bf16():
        bf16 = ["bf16 hardware"]
    cpus = usable_cpus()
    hardware = f" with {' and '.join(bf16)}" if bf16 else ", no bf16 hardware"
    return f"{cpus} core{'s' if cpus != 1 else ''} of {cpu_name()}{hardware}"


MAX_AUTO_WORKERS = 8  # beyond this, workers stop paying for their memory and start-up time on 32x32 images


def resolve_num_workers(setting: int | Literal["auto"], processes: int = 1) -> int:
    """`data.num_workers` as a number: `auto` leaves one CPU to the training process, up to MAX_AUTO_WORKERS; with
    `processes` training processes on the machine, each takes its part of the CPUs."""
    if setting == "auto":
        return max(0, min(usable_cpus() // processes - 1, MAX_AUTO_WORKERS))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise PipelineError(f"data.num_workers must be 'auto' or an integer >= 0, got {setting!r}")
    return setting


def resolve_backend(setting: str, device: torch.device) -> str:
    """`augment.backend` as the backend to use on `device`: `auto` is gpu on CUDA, albumentations elsewhere."""
    if setting == "auto":
        return "gpu" if device.type == "cuda" else "albumentations"
    return setting


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN emulates it, slowly."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that `train.precision` asks for on `device` (None: plain fp32).

    auto is bf16 on CUDA where supported (fp16 with a grad scaler before Ampere), bf16 on a CPU with bf16 hardware
    (AVX512-BF16 or AMX: custom_resnet trained 2.05x as fast end to end as in fp32 on a Zen 4, benchmarks/RESULTS.md),
    and fp32 elsewhere (emulated bf16 is slower than fp32). fp32 would not buy portability: its results already
    differ between CPUs in the last digits (other SIMD widths and kernels).
    """
    cuda = device.type == "cuda"
    if precision == "auto" and not cuda:
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and not cuda:
        raise PipelineError(
            f"train.precision fp16 needs CUDA (the device here is {device.type}): use auto, fp32 or bf16"
        )
    if precision == "bf16" and device.type == "mps":
        raise PipelineError("train.precision bf16 is not supported on mps here: use auto or fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise PipelineError("train.precision bf16: this GPU has no bf16 support; use auto (fp16 with a grad scaler)")
    if precision == "bf16" and not cuda and not cpu_has_native_bf16():
        warnings.warn(
            "train.precision bf16: this CPU has no bf16 hardware (AVX512-BF16 or AMX), so bf16 is emulated and "
            "likely slower than fp32",
            stacklevel=2,
        )
    return torch.bfloat16 if precision == "bf16" else torch.float16


def make_runtime(
    train: TrainParams, backend: str = "albumentations", num_workers: int | Literal["auto"] = 0
) -> Runtime:
    """The device (`train.device`), its precision (`train.precision`) and memory format (`train.channels_last`), the
    augmentation backend (`augment.backend`) and the loader workers (`data.num_workers`): of this process, or, under
    torchrun, of one of its processes (`_torchrun_runtime`)."""
    if under_torchrun():
        return _torchrun_runtime(train, backend, num_workers)
    device = pick_device(train.device)
    if device.type == "cuda" and train.device == "auto":
        # A GPU of its own when several runs share the machine (claim_gpu); `cuda` means cuda:0, unclaimed.
        device = torch.device("cuda", claim_gpu(torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not train.deterministic
    return Runtime(
        device,
        autocast_dtype(train.precision, device),
        train.channels_last,
        backend=resolve_backend(backend, device),
        num_workers=resolve_num_workers(num_workers),
    )


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every RNG a run touches; with `deterministic`, also ask PyTorch for deterministic kernels.

    Call it before anything touches CUDA: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA and MPS too
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        # warn_only: an op without a deterministic kernel warns instead of stopping a long run.
        torch.use_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------- a GPU of its own ----------------------------------------
# Which GPU a training process takes when several run at once, as `dvc queue start -j N` does on N GPUs.
#
# Without this every queue worker would train on cuda:0. With `train.device: auto` and CUDA present, lr-find and train
# each take the first GPU that no other run of this pipeline on the machine holds: an exclusive lock (flock) on
# `<lock dir>/gpu-<id>.lock`, held until the process exits. The kernel drops the lock when the process ends in any way,
# so a killed run never leaves a GPU claimed. When every GPU is taken the process waits for one and says so. The lock
# dir is $CIFAR_PIPELINE_GPU_LOCKS, else `<temp dir>/cifar-pipeline-gpu-locks`: one for every clone and every queue
# worker on the machine. A GPU's id is its entry in CUDA_VISIBLE_DEVICES when that is set (so that two workers shown
# different GPUs never share a lock), else its index. `train.device: cuda` claims nothing and uses cuda:0.
#
# Why flock and not a library: the claim must die with the process however it dies (a kill, an out-of-memory kill),
# which a lock file with a PID in it cannot promise; flock is in the standard library on Linux and macOS.

try:
    import fcntl
except ImportError:  # Windows: no flock; every run takes the first GPU, as before
    fcntl = None

LOCK_DIR_ENV = "CIFAR_PIPELINE_GPU_LOCKS"
_claim: dict[str, int] = {}  # once this process holds a GPU: its index and the lock's file descriptor (kept open)


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "cifar-pipeline-gpu-locks")


def gpu_ids(count: int) -> list[str]:
    """The ids of the `count` GPUs this process sees, as the machine knows them."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:count] if len(visible) >= count else [str(i) for i in range(count)]


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a curious `cat`
    return fd


def claim_gpu(
    count: int, *, folder: Path | None = None, poll_s: float = 2.0, say: Callable[[str], None] = print
) -> int:
    """The index (0..count-1) of the first GPU no other process holds, now held by this one until it exits.
    Waits while all are taken. A process that already holds one gets the same one again."""
    if _claim:
        return _claim["index"]
    if fcntl is None or count < 1:
        return 0
    folder = folder or lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    ids = gpu_ids(count)
    waited_since = None
    while True:
        for index, gpu in enumerate(ids):
            fd = _try_lock(folder / f"gpu-{gpu}.lock")
            if fd is not None:
                _claim.update(index=index, fd=fd)
                waited = f" after waiting {time.monotonic() - waited_since:.0f} s" if waited_since else ""
                say(f"claimed GPU {gpu} (cuda:{index}) for this process{waited}; lock {folder / f'gpu-{gpu}.lock'}")
                return index
        if waited_since is None:
            waited_since = time.monotonic()
            say(f"all {count} GPUs are held by other runs of this pipeline (locks in {folder}): waiting for one")
        time.sleep(poll_s)


# ---------------------------------------- several processes ----------------------------------------
# Data-parallel training on several processes: PyTorch DDP, its processes started by torchrun.
#
# `train.devices: N` (N > 1) makes the train stage start itself again under torchrun (`--standalone
# --nproc-per-node N`), so `dvc repro` and `dvc exp run` need no other command. A stage that torchrun started (several
# machines: docs/scaling.md) trains on the processes torchrun made.
#
# The run is the same as on one process, up to the order of float additions:
# - every process iterates the loader's global batches of train.batch_size images and takes a contiguous share of
#   each (share, training/loader.py), so the batches, their order and every image's augmentation do not depend on the
#   process count;
# - BatchNorm normalises with the statistics of the whole global batch: nn.SyncBatchNorm on CUDA, and on the CPU
#   (gloo), where nn.SyncBatchNorm refuses to run, GlobalBatchNorm below;
# - each process's loss is its images' summed cross-entropy times (processes / global batch size): DDP averages the
#   gradients over the processes, which makes the gradient of the global batch's mean loss, also for a short last batch.
# Rank 0 alone writes files (training/train.py); the epoch's metrics are summed over the processes (training/engine.py).

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


def _torchrun_runtime(train: TrainParams, backend: str, num_workers: int | Literal["auto"]) -> Runtime:
    """The runtime of one of torchrun's processes, in its process group (NCCL on CUDA, gloo on the CPU): on CUDA the
    GPU of its local rank (no gpu_claim: the run's processes take GPUs 0..N-1 of CUDA_VISIBLE_DEVICES); `backend`
    and `num_workers` as make_runtime resolves them.

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
