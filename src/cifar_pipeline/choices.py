"""The allowed values of every choice in params.yaml (and of the commands' options), written once.

params.py validates against these types, and the code that acts on a choice reads the same names from here, so a
value cannot be allowed in one place and unknown in another. No imports from the package: anything may use it.
"""

from __future__ import annotations

from typing import Literal, get_args

Cifar100Labels = Literal["fine", "coarse"]  # data.labels: CIFAR-100's 100 fine classes or 20 superclasses
ModelName = Literal["custom_resnet", "dilated_net"]
Downsample = Literal["stride", "dilation"]  # dilated_net: how C1-C3 end (a strided conv, or a dilated one)
Backend = Literal["auto", "albumentations", "gpu"]  # augment.backend
LrRule = Literal["descent_end", "steepest", "valley", "minimum"]  # lr_find.rule
Device = Literal["auto", "cpu", "cuda", "mps"]  # train.device, cifar-predict --device
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # train.precision
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]  # or false

# CIFAR-10's classes, label 0 to 9 in the official order: the download stage names them, cifar-results knows the
# dataset by them.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_LABELS: tuple[str, ...] = get_args(Cifar100Labels)
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
DOWNSAMPLE_MODES: tuple[str, ...] = get_args(Downsample)
BACKENDS: tuple[str, ...] = get_args(Backend)
LR_RULES: tuple[str, ...] = get_args(LrRule)
DEVICES: tuple[str, ...] = get_args(Device)
PRECISIONS: tuple[str, ...] = get_args(Precision)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
