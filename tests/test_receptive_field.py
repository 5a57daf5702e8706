"""Receptive fields: the calculator against hand-computed values and against the gradient of a real network."""

import copy
import math

import pytest
import torch
from torch import nn

from cifar_pipeline.models import build_model
from cifar_pipeline.report.report import format_receptive_field_table, receptive_field, receptive_field_table

MODELS = [("custom_resnet", {}), ("dilated_net", {"downsample": "stride"}), ("dilated_net", {"downsample": "dilation"})]


def test_calculator_on_a_stack_computed_by_hand():
    toy = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # rf 3, jump 1, 32
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),  # rf 3 + 2 = 5, jump 2, 16
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),  # rf 5 + 2*2*2 = 13, jump 2, 16
        nn.MaxPool2d(2),  # rf 13 + 1*2 = 15, jump 4, 8
        nn.Conv2d(4, 4, 5),  # rf 15 + 4*4 = 31, jump 4, 8 - 4 = 4
        nn.AdaptiveAvgPool2d(1),  # global: every output sees everything
        nn.Flatten(),
        nn.Linear(4, 10),
    )
    rows = receptive_field_table(toy, input_size=32)
    assert [(r["layer"], r["receptive_field"], r["jump"], r["output_size"]) for r in rows] == [
        ("0", 3, 1, 32),
        ("2", 5, 2, 16),
        ("3", 13, 2, 16),
        ("4", 15, 4, 8),
        ("5", 31, 4, 4),
        ("6", 31 + 3 * 4, 16, 1),
    ]
    assert rows[2]["dilation"] == 2 and rows[2]["padding"] == 2 and rows[1]["stride"] == 2
    assert rows[-1]["note"].startswith("global") and not any(r["note"] for r in rows[:-1])
    assert receptive_field(toy) == 31


def test_table_notes_the_residual_branches_and_formats_aligned_text():
    rows = receptive_field_table(build_model("custom_resnet"))
    notes = {row["layer"]: row["note"] for row in rows}
    assert notes["res1.0"].startswith("residual") and notes["res2.4"].startswith("residual")
    assert notes["pool"].startswith("global") and notes["layer3.0"] == ""
    lines = format_receptive_field_table(rows).splitlines()
    assert len(lines) == len(rows) + 2 and lines[0].split()[:3] == ["layer", "type", "kernel"]
    column = lines[0].index("receptive_field")
    assert [line[column:].split()[0] for line in lines[2:]] == [str(row["receptive_field"]) for row in rows]


def _measured_receptive_field(model: nn.Module, size: int) -> int:
    """Extent of the input pixels that reach the centre of the last feature map, from the gradient.

    All weights are set to 1/fan-in and the input to ones, so every activation is positive, every ReLU passes and no
    gradient cancels. Max-pools become average pools of the same geometry: a max-pool sends the gradient to one
    winner per window, an average pool to all the pixels the max-pool could have picked.
    """
    model = copy.deepcopy(model).eval().requires_grad_(False)  # only the input's gradient is needed
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Conv2d):
                layer.weight.fill_(1.0 / layer.weight[0].numel())
    x = torch.ones(1, 3, size, size, requires_grad=True)
    features = model.features(x)
    h, w = features.shape[-2:]
    features[0, :, h // 2, w // 2].sum().backward()
    reached = x.grad[0].abs().sum(0) > 0
    rows = reached.any(1).nonzero().flatten()
    cols = reached.any(0).nonzero().flatten()
    # The field must lie inside the input, or padding would clip it.
    assert rows.min() > 0 and rows.max() < size - 1 and cols.min() > 0 and cols.max() < size - 1
    assert rows.max() - rows.min() == cols.max() - cols.min()
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize(("name", "kwargs"), MODELS)
def test_calculator_matches_the_measured_receptive_field(name, kwargs):
    model = build_model(name, **kwargs)
    computed = receptive_field(model)
    size = 32 * math.ceil(1.2 * computed / 32)  # big enough to hold the whole field away from the border
    assert _measured_receptive_field(model, size) == computed


def test_receptive_fields_of_the_shipped_models():
    # Each layer adds (kernel - 1) * dilation * jump; the jump doubles after every stride or pool of 2.
    # custom_resnet: 1 +2 +2 +1 (pool) +4 +4 +4 +2 (pool) +8 +4 (pool) +16 +16 = 64
    # dilated_net stride: 1 +2 +2 +2 (T1) +4 +8 +4 (T2) +8 +8 +8 (T3) +16 +16 = 79
    # dilated_net dilation (jump stays 1; dilations 1 1 2 | 2 4 4 | 4 4 8 | 8 8):
    #   1 +2 +2 +4 +4 +8 +8 +8 +8 +16 +16 +16 = 93
    fields = {f"{name}{kwargs}": receptive_field(build_model(name, **kwargs)) for name, kwargs in MODELS}
    assert fields == {
        "custom_resnet{}": 64,
        "dilated_net{'downsample': 'stride'}": 79,
        "dilated_net{'downsample': 'dilation'}": 93,
    }
