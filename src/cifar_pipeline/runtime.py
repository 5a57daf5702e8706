"""Where and how a model runs, chosen once per stage run: every `auto` of params.yaml that depends on the machine
(the device, the autocast precision, the augmentation backend, the loader workers) is resolved here and nowhere else,
and `Runtime.record()` says what was used, for the run's files. Also the seeding of every random generator a run
touches.
"""

from __future__ import annotations

import functools
import os
import platform
import random
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cifar_pipeline.choices import DEVICES
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.gpu_claim import claim_gpu
from cifar_pipeline.params import TrainParams


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs, chosen once from the `train` params."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # None: plain fp32
    channels_last: bool = False
    # Data-parallel training (distributed.py): this process's rank among world_size processes, local_size of them on
    # this machine; distributed: one of torchrun's processes (even if the only one), training through DDP.
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
    train: TrainParams, backend: str = "albumentations", num_workers: int | Literal["auto"] = 0, processes: int = 1
) -> Runtime:
    """The device (`train.device`), its precision (`train.precision`) and memory format (`train.channels_last`), the
    augmentation backend (`augment.backend`) and the loader workers (`data.num_workers`) of one of `processes`
    training processes on this machine."""
    device = pick_device(train.device)
    if device.type == "cuda" and train.device == "auto":
        # A GPU of its own when several runs share the machine (gpu_claim.py); `cuda` means cuda:0, unclaimed.
        device = torch.device("cuda", claim_gpu(torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not train.deterministic
    return Runtime(
        device,
        autocast_dtype(train.precision, device),
        train.channels_last,
        backend=resolve_backend(backend, device),
        num_workers=resolve_num_workers(num_workers, processes),
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
