"""Checkpoints round-trip exactly, load without running code, and refuse foreign or tampered files."""

import pickle

import numpy as np
import pytest
import torch
from conftest import save_model

from cifar_pipeline.models import build_model
from cifar_pipeline.models.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint
from cifar_pipeline.stage import MissingInputError, PipelineError

KWARGS = {"dropout": 0.1, "downsample": "stride"}


class Payload:
    """Unpickling this creates `sentinel`: proof that a loader ran code from the file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


@pytest.fixture(scope="module")
def trained():
    """A dilated_net after one Adam + One Cycle step, so weights, BN statistics and optimizer state are non-trivial."""
    torch.manual_seed(0)
    model = build_model("dilated_net", **KWARGS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=10)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8))
    loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_round_trip_rebuilds_the_same_model_and_keeps_the_extras(tmp_path, trained):
    model, optimizer, scheduler = trained
    path = tmp_path / "models" / "model.pt"
    extra = {
        "epoch": 3,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loss": 1.25,
        "batch_size": 512,
        "mean": [0.49, 0.48, 0.45],
        "std": (0.25, 0.24, 0.26),
        "classes": ["airplane", "automobile"],
        "max_lr": np.float64(0.02),  # numpy scalars become Python numbers
        "max_lr_source": "lr-find",
        "test_acc": np.float32(0.5),
        "train_acc": 0.75,
        "device": "cpu",
    }
    save_model(path, model, "dilated_net", KWARGS, **extra)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left behind

    raw = torch.load(path, weights_only=True)  # the contract: plain data only
    assert raw["format"] == FORMAT and raw["model_name"] == "dilated_net" and raw["model_kwargs"] == KWARGS
    assert type(raw["max_lr"]) is float and raw["max_lr"] == 0.02 and type(raw["test_acc"]) is float
    assert raw["std"] == (0.25, 0.24, 0.26) and raw["classes"] == extra["classes"] and raw["epoch"] == 3

    checkpoint = load_checkpoint(path)
    rebuilt = model_from_checkpoint(checkpoint)
    assert not rebuilt.training
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
    model.train()

    # The optimizer and scheduler can resume from what was saved.
    fresh = torch.optim.Adam(rebuilt.parameters(), lr=1e-3)
    fresh.load_state_dict(checkpoint["optimizer"])
    assert fresh.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    resumed = torch.optim.lr_scheduler.OneCycleLR(fresh, max_lr=0.01, total_steps=10)
    resumed.load_state_dict(checkpoint["scheduler"])
    assert resumed.get_last_lr() == scheduler.get_last_lr()


def test_compiled_model_is_saved_without_the_wrapper_prefix(tmp_path, trained):
    model = trained[0]
    compiled = torch.compile(model)  # compiles lazily: wrapping costs nothing until it is called
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    save_model(tmp_path / "model.pt", compiled, "dilated_net", KWARGS)
    state = load_checkpoint(tmp_path / "model.pt")["state_dict"]
    assert list(state) == list(model.state_dict())
    assert all(value.device.type == "cpu" for value in state.values())


def test_unsaveable_extra_is_a_bug_caught_before_writing(tmp_path, trained):
    with pytest.raises(TypeError, match=r"checkpoint\.run is a .*Path"):
        save_model(tmp_path / "model.pt", trained[0], "dilated_net", KWARGS, run=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_says_which_stage_to_run(tmp_path):
    with pytest.raises(MissingInputError, match="run the 'train' stage"):
        load_checkpoint(tmp_path / "model.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note about the plain-pickle file
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_tampered_checkpoint_is_refused_without_running_its_code(tmp_path, writer):
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "model.pt"
    tampered = {"format": FORMAT, "model_name": "dilated_net", "model_kwargs": {}, "state_dict": Payload(sentinel)}
    if writer == "torch":
        torch.save(tampered, path)
    else:
        path.write_bytes(pickle.dumps(tampered))
    with pytest.raises(PipelineError, match="refused and nothing in it was run: it would import|not a readable"):
        load_checkpoint(path)
    assert not sentinel.exists()
    if writer == "torch":
        # The payload is live: an unsafe load would have run it.
        torch.load(path, weights_only=False)
        assert sentinel.exists()


def _save(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: build_model("dilated_net").state_dict(), "format None.*looks like a bare state_dict"),
        (lambda: {"epoch": 3, "accuracy": 0.9}, "not a cifar_pipeline checkpoint"),
        (lambda: {"format": "other/2", "model_name": "dilated_net"}, "format 'other/2'"),
        (lambda: [1, 2, 3], "it holds a list"),
        (
            lambda: {"format": FORMAT, "model_name": "vgg", "model_kwargs": {}, "state_dict": {}},
            "unknown model 'vgg'; known models: custom_resnet, dilated_net",
        ),
        (lambda: {"format": FORMAT, "model_name": "dilated_net", "state_dict": {}}, "no valid 'model_kwargs'"),
    ],
)
def test_foreign_checkpoint_is_refused(tmp_path, content, message):
    path = _save(tmp_path / "model.pt", content())
    with pytest.raises(PipelineError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_corrupt_checkpoint_is_refused(tmp_path, trained, damage):
    path = tmp_path / "model.pt"
    save_model(path, trained[0], "dilated_net", KWARGS)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": bytes(range(256)) * 8}[damage])
    with pytest.raises(PipelineError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_named_model_are_refused(tmp_path, trained):
    path = tmp_path / "model.pt"
    save_model(path, trained[0], "custom_resnet", {"dropout": 0.1})  # dilated_net weights, wrong name
    with pytest.raises(PipelineError, match="do not fit model 'custom_resnet'"):
        model_from_checkpoint(load_checkpoint(path))
    save_model(path, trained[0], "dilated_net", {"dropout": 0.1, "width": 2})
    with pytest.raises(PipelineError, match="do not fit model 'dilated_net'.*width"):
        model_from_checkpoint(load_checkpoint(path))
