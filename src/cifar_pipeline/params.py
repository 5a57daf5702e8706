"""params.yaml: its schema (pydantic), validated whole before any stage works, with errors that name the key, the
allowed values and how to put back just that key; and the value sets the schema and the code share (choices).
"""

from __future__ import annotations

import difflib
import re
import subprocess
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cifar_pipeline import paths
from cifar_pipeline.stage import PipelineError

# ---------------------------------------- choices ----------------------------------------
# The allowed values of every choice in params.yaml (and of the commands' options), written once.
#
# params.py validates against these types, and the code that acts on a choice reads the same names from here, so a
# value cannot be allowed in one place and unknown in another. No imports from the package: anything may use it.

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


# ---------------------------------------- params ----------------------------------------
# The one typed schema for params.yaml.
#
# Every stage calls `load_params()` before doing any work, so a typo anywhere in the file stops
# `dvc repro` at its first stage with a message naming the key, the value and what is allowed.

# Keys that older params.yaml files may still hold, and what replaced them.
RENAMED = {"train.amp": "train.precision (auto | fp32 | bf16 | fp16; amp: true is auto, amp: false is fp32)"}


# A failed `dvc exp run -S key=value` leaves its value in params.yaml: each error says how to put back that key alone
# (undo_advice), keeping the user's other changes (a data.url to a local copy, say) that `git checkout params.yaml`
# would throw away.


class ParamsError(PipelineError):
    """params.yaml is missing, unreadable or does not match the schema."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataParams(_Section):
    url: str = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    md5: str | None = "c58f30108f718f92721af3b95e74349a"
    labels: Cifar100Labels = "fine"
    train_subset: int | None = Field(default=None, ge=10)
    test_subset: int | None = Field(default=None, ge=10)
    val_size: int = Field(default=0, ge=0)
    num_workers: int | Literal["auto"] = "auto"

    @field_validator("md5")
    @classmethod
    def _md5_hex(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", value):
            raise ValueError("must be null (skip the check) or 32 hexadecimal digits")
        return value.lower() if value else value

    @field_validator("num_workers")
    @classmethod
    def _workers_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 'auto' or an integer >= 0")
        return value

    @model_validator(mode="after")
    def _val_fits(self) -> DataParams:
        if self.train_subset is not None and self.val_size >= self.train_subset:
            raise ValueError(
                f"data.val_size ({self.val_size}) must be smaller than data.train_subset ({self.train_subset})"
            )
        return self


class ModelParams(_Section):
    name: ModelName = "custom_resnet"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    downsample: Downsample = "stride"

    def kwargs(self, num_classes: int) -> dict[str, Any]:
        """The chosen model's constructor arguments (downsample is dilated_net's alone); the class count comes from
        the data (the download stage's meta.json)."""
        if self.name == "dilated_net":
            return {"dropout": self.dropout, "downsample": self.downsample, "num_classes": num_classes}
        return {"dropout": self.dropout, "num_classes": num_classes}


# augment.coarse_dropout_p: auto. The small model underfits its augmented batches (train accuracy below test
# accuracy at epoch 24) and gains from half as many holes; custom_resnet fits them (train above test) and did not.
# Measured: docs/results/dilated_net_coarse_dropout_seeds.md, custom_resnet_coarse_dropout.md.
HOLE_PROBABILITY = {"custom_resnet": 0.5, "dilated_net": 0.25}


class AugmentParams(_Section):
    backend: Backend = "auto"
    hflip_p: float = Field(default=0.5, ge=0.0, le=1.0)
    shift_limit: float = Field(default=0.1, ge=0.0, le=0.5)
    scale_limit: float = Field(default=0.1, ge=0.0, lt=1.0)
    rotate_limit: float = Field(default=15.0, ge=0.0, le=180.0)
    shift_scale_rotate_p: float = Field(default=0.5, ge=0.0, le=1.0)
    # 'auto' is resolved by Params from model.name (HOLE_PROBABILITY); this default serves AugmentParams alone.
    coarse_dropout_p: float = Field(default=HOLE_PROBABILITY["custom_resnet"], ge=0.0, le=1.0)
    hole_size: int = Field(default=16, ge=1, le=32)

    @field_validator("coarse_dropout_p", mode="before")
    @classmethod
    def _number_or_auto(cls, value: Any) -> Any:
        if isinstance(value, (str, bool)):
            raise ValueError(
                "must be 'auto' (by model: "
                + ", ".join(f"{m} {p}" for m, p in HOLE_PROBABILITY.items())
                + ") or a number from 0 to 1"
            )
        return value


class LrFindParams(_Section):
    start_lr: float = Field(default=1e-7, gt=0.0)
    end_lr: float = Field(default=10.0, gt=0.0)
    num_iter: int = Field(default=200, ge=10)
    smooth: float = Field(default=0.05, gt=0.0, le=1.0)
    diverge_threshold: float = Field(default=5.0, gt=1.0)
    rule: LrRule = "descent_end"
    divisor: float = Field(default=1.0, ge=1.0)  # descent_end only: its LR is divided by this
    repeats: int = Field(default=1, ge=1)  # range tests averaged step by step (lr_finder.run_range_test)

    @model_validator(mode="after")
    def _range_increases(self) -> LrFindParams:
        if self.end_lr <= self.start_lr:
            raise ValueError(f"lr_find.end_lr ({self.end_lr}) must be greater than lr_find.start_lr ({self.start_lr})")
        return self


class TrainParams(_Section):
    epochs: int = Field(default=24, ge=1)
    batch_size: int = Field(default=512, ge=1)
    max_lr: float | Literal["auto"] = "auto"
    peak_epoch: int = Field(default=5, ge=1)
    div_factor: float = Field(default=100.0, ge=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)  # CrossEntropyLoss's own; lr-find uses it too
    ema: Literal[False] | float = False  # false, or the decay of an average of the weights kept every step
    device: Device = "auto"
    devices: int = Field(default=1, ge=1)  # training processes on this machine (training/runtime.py)
    precision: Precision = "auto"
    channels_last: bool = True
    deterministic: bool = False
    compile: Literal[False] | CompileMode = False

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, value: Any) -> Any:
        if value is not False and value not in COMPILE_MODES:
            raise ValueError(f"must be false (no compiling) or a torch.compile mode: {', '.join(COMPILE_MODES)}")
        return value

    @field_validator("ema", mode="before")
    @classmethod
    def _ema_decay(cls, value: Any) -> Any:
        # A bool other than false, or a decay outside (0, 1), would silently average nothing or never move.
        if value is not False and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            raise ValueError("must be false (no weight averaging) or a decay between 0 and 1, e.g. 0.995")
        return value

    @field_validator("max_lr")
    @classmethod
    def _positive_lr(cls, value: float | str) -> float | str:
        if value != "auto" and not value > 0:
            raise ValueError("must be 'auto' or a number > 0")
        return value

    @model_validator(mode="after")
    def _peak_inside(self) -> TrainParams:
        if self.peak_epoch > self.epochs:
            raise ValueError(f"train.peak_epoch ({self.peak_epoch}) must not exceed train.epochs ({self.epochs})")
        return self


class ReportParams(_Section):
    misclassified: int = Field(default=20, ge=1, le=200)
    tta: bool = True

    @field_validator("tta", mode="before")
    @classmethod
    def _true_or_false(cls, value: Any) -> Any:
        # pydantic would also take 'yes', 'off', 0 or 1: a YAML boolean says what is meant.
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value


class Params(_Section):
    seed: int = Field(default=42, ge=0)
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    augment: AugmentParams = AugmentParams()
    lr_find: LrFindParams = LrFindParams()
    train: TrainParams = TrainParams()
    report: ReportParams = ReportParams()

    @model_validator(mode="before")
    @classmethod
    def _hole_probability_by_model(cls, raw: Any) -> Any:
        """augment.coarse_dropout_p 'auto' (or absent) becomes the model's own probability before validation."""
        if not isinstance(raw, dict) or not isinstance(raw.get("augment", {}), dict):
            return raw
        augment = dict(raw.get("augment") or {})
        if augment.get("coarse_dropout_p", "auto") != "auto":
            return raw
        model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        name = model.get("name", ModelParams.model_fields["name"].default)
        # An unknown model.name gets its own error; the hole then needs none.
        augment["coarse_dropout_p"] = HOLE_PROBABILITY.get(name, HOLE_PROBABILITY["custom_resnet"])
        return {**raw, "augment": augment}


def _field_path(loc: tuple) -> tuple[tuple[str, ...], type[BaseModel] | None]:
    """The params keys in a pydantic error location, and the section model that holds the last one.

    Locations of union errors carry the branch name too ('train.max_lr.float'): stop at the field.
    """
    model: type[BaseModel] | None = Params
    keys: list[str] = []
    for part in loc:
        if model is None or not isinstance(part, str):
            break
        keys.append(part)
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif field is not None:
            model = None
    return tuple(keys), model


def _describe(error: dict) -> tuple[str, str, str]:
    """(key, the offending value or '', what is wrong) for one pydantic error."""
    keys, _ = _field_path(error["loc"])
    key = ".".join(keys) or "(top level)"
    if error["type"] == "extra_forbidden":
        message = "unknown key"
        if key in RENAMED:
            return key, "", f"{message}: replaced by {RENAMED[key]}"
        section, _ = _field_path(keys[:-1])
        _, model = _field_path(section) if section else ((), Params)
        known = list(model.model_fields) if model else []
        hint = difflib.get_close_matches(keys[-1], known, n=1)
        if hint:
            message += f" (did you mean '{'.'.join((*keys[:-1], hint[0]))}'?)"
        return key, "", message + f"; allowed keys here: {', '.join(known)}"
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    shown = error["type"] != "missing" and "input" in error and not isinstance(error["input"], dict)
    return key, f" = {error['input']!r}" if shown else "", message


def _lookup(tree: Any, keys: tuple[str, ...]) -> tuple[bool, Any]:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return False, None
        tree = tree[key]
    return True, tree


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _changed_leaves(raw: Any, reference: Any, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The keys under `path` whose value in `raw` differs from `reference`'s: a section in error (say, train.epochs
    below train.peak_epoch) is put back key by key, only where it was changed."""
    if not (isinstance(raw, dict) and isinstance(reference, dict)):
        return [path] if raw != reference else []
    keys = list(raw) + [k for k in reference if k not in raw]
    return [
        leaf
        for k in keys
        if raw.get(k) != reference.get(k)
        for leaf in _changed_leaves(raw.get(k), reference.get(k), (*path, k))
    ]


def undo_advice(keys: list[tuple[str, ...]], raw: Any, committed: dict | None) -> str:
    """How to put back just the keys in error, leaving every other change: the last commit's value (`committed`),
    else the schema's default, else delete the key."""
    defaults = Params().model_dump(mode="json")
    defaults["augment"]["coarse_dropout_p"] = "auto"  # as params.yaml ships it
    fixes: dict[str, str] = {}
    for path in keys:
        for reference, why in ((committed, "the last commit's value"), (defaults, "the default")):
            found, value = _lookup(reference, path) if reference is not None else (False, None)
            if found:
                for leaf in _changed_leaves(_lookup(raw, path)[1], value, path):
                    present, leaf_value = _lookup(reference, leaf)
                    fixes[".".join(leaf)] = (
                        f"set {'.'.join(leaf)}: {_yaml_value(leaf_value)} ({why})"
                        if present
                        else f"delete {'.'.join(leaf)}"
                    )
                break
        else:
            if _lookup(raw, path)[0]:
                fixes[".".join(path)] = f"delete {'.'.join(path)}"
    if not fixes:
        return ""
    keys_text = "this key" if len(fixes) == 1 else "these keys"
    return (
        f"Put back just {keys_text}, keeping your other changes: {'; '.join(fixes.values())} in params.yaml. "
        "(A failed `dvc exp run -S` leaves its value there.)"
    )


def committed_params(path: str | Path) -> dict | None:
    """params.yaml as the last Git commit holds it, or None (no Git, no commit, not tracked, not valid YAML)."""
    path = Path(path).resolve()
    try:
        result = subprocess.run(
            ["git", "show", f"HEAD:./{path.name}"], cwd=path.parent, capture_output=True, text=True, timeout=30
        )
        content = yaml.safe_load(result.stdout) if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, yaml.YAMLError):
        return None
    return content if isinstance(content, dict) else None


def parse_params(raw: Any, source: str = "params.yaml", committed: dict | None = None) -> Params:
    """Validate already-loaded YAML content; raise ParamsError listing every problem, and how to put back each key
    in error (`committed`: the file as last committed, whose values the advice gives)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        # pydantic reports each failing branch of a union separately: merge them into one line per key.
        problems: dict[tuple[str, str], list[str]] = {}
        keys = []
        for error in exc.errors():
            # A check across keys (train.peak_epoch against train.epochs) fails on its section: its message names them.
            named = [tuple(k.split(".")) for k in re.findall(r"\b[a-z_]+\.[a-z_]+\b", error["msg"])]
            keys.extend(named or [_field_path(error["loc"])[0]])
            key, value, message = _describe(error)
            messages = problems.setdefault((key, value), [])
            if message not in messages:
                messages.append(message)
        lines = [f"{key}{value}: {' or '.join(messages)}" for (key, value), messages in problems.items()]
        advice = undo_advice([k for k in keys if k], raw, committed)
        raise ParamsError(
            f"{source} is invalid:\n  " + "\n  ".join(lines) + (f"\n{advice}" if advice else "")
        ) from None


def load_params(path: str | Path = paths.PARAMS) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run the stages from the project root, where params.yaml lives")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    try:
        return parse_params(raw, source=str(path))
    except ParamsError:
        # Only now ask Git (a subprocess) for the committed values the advice gives; the second parse raises again.
        committed = committed_params(path)
        if committed is None:
            raise
        return parse_params(raw, source=str(path), committed=committed)
