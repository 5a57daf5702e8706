"""params.yaml validation: every mistake is named by key, value and what is allowed."""

import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, follow_undo_advice

from cifar_pipeline.params import HOLE_PROBABILITY, MODEL_NAMES, ParamsError, load_params, parse_params
from cifar_pipeline.training.loader import train_transforms


def test_shipped_params_file_is_valid_and_holds_the_specified_recipe():
    params = load_params(ROOT / "params.yaml")
    assert params.train.epochs == 24
    assert params.train.batch_size == 512
    assert params.train.peak_epoch == 5
    assert params.train.max_lr == "auto"
    assert params.model.name == "custom_resnet"
    assert params.model.dropout == 0.0
    assert params.augment.hole_size == 16
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["augment"]["coarse_dropout_p"] == "auto"
    assert params.augment.coarse_dropout_p == 0.5  # custom_resnet's
    assert params.augment.backend == "auto"
    assert params.data.md5 == "c58f30108f718f92721af3b95e74349a"
    assert params.train.ema is False and params.train.label_smoothing == 0.0  # the seed's recipe has neither


@pytest.mark.parametrize(
    ("model", "written", "expected"),
    [
        ("custom_resnet", "auto", 0.5),
        ("dilated_net", "auto", 0.25),
        ("dilated_net", None, 0.25),  # absent: as auto
        ("dilated_net", 0.5, 0.5),
        ("custom_resnet", 0.0, 0.0),
    ],
)
def test_the_holes_probability_auto_is_the_models_own_and_a_number_is_kept(model, written, expected):
    assert set(HOLE_PROBABILITY) == set(MODEL_NAMES)  # a new model needs its own entry, not custom_resnet's
    augment = {} if written is None else {"coarse_dropout_p": written}
    params = parse_params({"model": {"name": model}, "augment": augment})
    assert params.augment.coarse_dropout_p == expected
    hole = train_transforms(params.augment, (0.5, 0.5, 0.5)).transforms[-1]
    assert type(hole).__name__ == "CoarseDropout" and hole.p == expected  # what training draws from


def test_shipped_params_file_sets_every_key_explicitly():
    """Every knob a user may change is visible in params.yaml, not hidden in a schema default."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = parse_params(raw).model_dump()
    for section, values in params.items():
        if isinstance(values, dict):
            assert set(raw[section]) == set(values), section
        else:
            assert section in raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"batch_size": 0}}, "train.batch_size = 0: must be greater than or equal to 1"),
        ({"train": {"epochs": 3, "peak_epoch": 5}}, "train.peak_epoch (5) must not exceed train.epochs (3)"),
        ({"train": {"max_lr": -0.1}}, "train.max_lr = -0.1: must be 'auto' or a number > 0"),
        ({"train": {"max_lr": "fast"}}, "train.max_lr = 'fast'"),
        ({"train": {"device": "tpu"}}, "train.device = 'tpu': must be 'auto', 'cpu', 'cuda' or 'mps'"),
        ({"train": {"devices": 0}}, "train.devices = 0: must be greater than or equal to 1"),
        ({"train": {"precision": "fp8"}}, "train.precision = 'fp8': must be 'auto', 'fp32', 'bf16' or 'fp16'"),
        (
            {"train": {"compile": "fast"}},
            "train.compile = 'fast': must be false (no compiling) or a torch.compile mode: "
            "default, reduce-overhead, max-autotune-no-cudagraphs, max-autotune",
        ),
        ({"train": {"compile": True}}, "train.compile = True: must be false (no compiling) or a torch.compile mode"),
        ({"train": {"amp": True}}, "train.amp: unknown key: replaced by train.precision (auto | fp32 | bf16 | fp16;"),
        ({"trian": {}}, "trian: unknown key (did you mean 'train'?)"),
        ({"data": {"train_subst": 100}}, "data.train_subst: unknown key (did you mean 'data.train_subset'?)"),
        ({"model": {"name": "vgg"}}, "model.name = 'vgg': must be 'custom_resnet' or 'dilated_net'"),
        ({"data": {"md5": "abc"}}, "data.md5 = 'abc': must be null (skip the check) or 32 hexadecimal digits"),
        ({"data": {"num_workers": -1}}, "data.num_workers = -1"),
        ({"data": {"train_subset": 100, "val_size": 100}}, "data.val_size (100) must be smaller"),
        ({"lr_find": {"start_lr": 1.0, "end_lr": 0.1}}, "lr_find.end_lr (0.1) must be greater than"),
        ({"augment": {"hflip_p": 1.5}}, "augment.hflip_p = 1.5: must be less than or equal to 1"),
        (
            {"augment": {"coarse_dropout_p": "often"}},
            "augment.coarse_dropout_p = 'often': must be 'auto' (by model: custom_resnet 0.5, dilated_net 0.25) or a "
            "number from 0 to 1",
        ),
        ({"augment": {"coarse_dropout_p": -0.1}}, "augment.coarse_dropout_p = -0.1: must be greater than or equal"),
        ({"augment": {"backend": "cuda"}}, "augment.backend = 'cuda': must be 'auto', 'albumentations' or 'gpu'"),
        ({"seed": "x"}, "seed = 'x'"),
        ({"report": {"tta": "yes"}}, "report.tta = 'yes': must be true or false"),
        ({"report": {"tta": 1}}, "report.tta = 1: must be true or false"),
        ({"train": {"ema": 1.0}}, "train.ema = 1.0: must be false (no weight averaging) or a decay between 0 and 1"),
        ({"train": {"ema": 0}}, "train.ema = 0: must be false (no weight averaging) or a decay between 0 and 1"),
        ({"train": {"ema": True}}, "train.ema = True: must be false"),
        ({"train": {"ema": "0.99"}}, "train.ema = '0.99': must be false"),
        ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing = 1.0: must be less than 1"),
        ({"train": {"label_smoothing": -0.1}}, "train.label_smoothing = -0.1: must be greater than or equal to 0"),
    ],
)
def test_bad_params_are_named_with_key_value_and_what_is_allowed(raw, expected):
    with pytest.raises(ParamsError) as excinfo:
        parse_params(raw)
    assert expected in str(excinfo.value)


def test_a_weight_average_decay_in_range_is_kept():
    assert parse_params({"train": {"ema": 0.995}}).train.ema == 0.995
    assert parse_params({"train": {"ema": False}}).train.ema is False


def test_the_advice_puts_back_just_the_broken_key_and_keeps_the_users_other_changes(tmp_path):
    """Two keys edited (a local data.url, a bad batch size): the error says how to put back the batch size alone,
    with the last commit's value; following it leaves a valid file that still has the user's data.url."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    for command in (
        ["init", "-q"],
        ["add", "params.yaml"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"],
    ):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    text = (tmp_path / "params.yaml").read_text().replace("batch_size: 512", "batch_size: 0")
    text = re.sub(r"url: \S+", "url: /data/cifar10-local.tar.gz", text)
    (tmp_path / "params.yaml").write_text(text)
    check = [sys.executable, str(ROOT / "stages/check_params.py")]
    result = subprocess.run(check, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert "set train.batch_size: 512 (the last commit's value)" in result.stderr
    assert "git checkout" not in result.stderr and "data.url" not in result.stderr
    assert follow_undo_advice(tmp_path / "params.yaml", result.stderr) == ["train.batch_size"]
    assert subprocess.run(check, cwd=tmp_path, capture_output=True, text=True).returncode == 0
    assert load_params(tmp_path / "params.yaml").data.url == "/data/cifar10-local.tar.gz"


def test_without_git_the_advice_gives_the_default():
    with pytest.raises(ParamsError, match=r"set train.epochs: 24 \(the default\)"):
        parse_params({"train": {"epochs": 3, "peak_epoch": 5}})


def test_all_problems_are_reported_at_once():
    with pytest.raises(ParamsError) as excinfo:
        parse_params({"train": {"batch_size": 0, "epochs": 0}})
    message = str(excinfo.value)
    assert "train.batch_size" in message and "train.epochs" in message


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(tmp_path / "params.yaml")
