"""Where and how a model runs, chosen once from the `train` params: the device, the autocast precision, the memory
format; and the seeding of every random generator a run touches.
"""

from __future__ import annotations

import os
import random
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass

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

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and prints its progress (rank 0)."""
        return self.rank == 0

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

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


def make_runtime(train: TrainParams) -> Runtime:
    """The device (`train.device`), its precision (`train.precision`) and memory format (`train.channels_last`)."""
    device = pick_device(train.device)
    if device.type == "cuda" and train.device == "auto":
        # A GPU of its own when several runs share the machine (gpu_claim.py); `cuda` means cuda:0, unclaimed.
        device = torch.device("cuda", claim_gpu(torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not train.deterministic
    return Runtime(device, autocast_dtype(train.precision, device), train.channels_last)


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
