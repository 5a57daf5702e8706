"""The two models and the registry: architecture row by row, shapes, budgets, gradients, summary."""

import subprocess
import sys
from typing import get_args

import pytest
import torch
import torchinfo
from torch import nn

from cifar_pipeline import models
from cifar_pipeline.models import build_model
from cifar_pipeline.params import MODEL_NAMES, ModelParams
from cifar_pipeline.report.report import model_summary_text, receptive_field
from cifar_pipeline.stage import PipelineError

# The CustomResNet spec: (block, [(layer type, parameters)], block output shape).
CONV_BN = ["Conv2d", "BatchNorm2d", "ReLU", "Dropout"]
CONV_POOL_BN = ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU", "Dropout"]
RESNET_SPEC = [
    ("prep", CONV_BN, [1728, 128], [64, 32, 32]),
    ("layer1", CONV_POOL_BN, [73728, 256], [128, 16, 16]),
    ("res1", CONV_BN * 2, [147456, 256, 147456, 256], [128, 16, 16]),
    ("layer2", CONV_POOL_BN, [294912, 512], [256, 8, 8]),
    ("layer3", CONV_POOL_BN, [1179648, 1024], [512, 4, 4]),
    ("res2", CONV_BN * 2, [2359296, 1024, 2359296, 1024], [512, 4, 4]),
    ("pool", [], [], [512, 1, 1]),
    ("fc", [], [5130], [10]),
]
VARIANTS = ["stride", "dilation"]
MODELS = [("custom_resnet", {}), *[("dilated_net", {"downsample": v}) for v in VARIANTS]]


def summary_rows(model):
    return torchinfo.summary(model, input_size=(1, 3, 32, 32), depth=2, device="cpu", verbose=0).summary_list


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_custom_resnet_matches_the_spec_row_for_row():
    model = build_model("custom_resnet")
    assert [name for name, _ in model.named_children()] == [block for block, *_ in RESNET_SPEC]
    blocks = []  # torchinfo rows in forward order: each depth-1 row followed by its depth-2 rows
    for row in summary_rows(model)[1:]:
        if row.depth == 1:
            blocks.append((row, []))
        else:
            blocks[-1][1].append(row)
    for (row, children), (name, layers, params, shape) in zip(blocks, RESNET_SPEC, strict=True):
        assert row.var_name == name
        assert row.output_size == [1, *shape], name
        assert [child.class_name for child in children] == layers, name
        counts = [child.num_params for child in children if child.num_params] or [row.num_params] * bool(params)
        assert counts == params, name
    assert sum(p.numel() for p in model.parameters()) == 6_573_130
    assert all(conv.bias is None and conv.padding == (1, 1) for conv in convs(model))


def test_custom_resnet_adds_the_residual_branches_in_forward():
    model = build_model("custom_resnet").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.layer1(model.prep(x))
        h = h + model.res1(h)
        h = model.layer3(model.layer2(h))
        h = h + model.res2(h)
        expected = model.fc(model.pool(h).flatten(1))
        assert torch.allclose(model(x), expected, atol=1e-5)
        # Without the skip connections the logits differ: the adds are really there.
        assert not torch.allclose(model(x), model.fc(model.pool(model.res2(h)).flatten(1)), atol=1e-3)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dropout_probability_comes_from_the_constructor(name):
    dropouts = [m for m in build_model(name, dropout=0.3).modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.3 for m in dropouts)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_models_add_no_dropout_noise_in_training(name):
    """Dropout is off by default (it cost dilated_net 1.8 points and a third of its CPU speed in 24 epochs)."""
    model = build_model(name, **ModelParams(name=name).kwargs(10)).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)  # another dropout draw, if there were one
    assert torch.equal(first, model(x))
    noisy = build_model(name, dropout=0.3).train()
    assert not torch.equal(noisy(x), noisy(x))


@pytest.mark.parametrize("downsample", VARIANTS)
def test_dilated_net_fits_the_budget_and_constraints(downsample):
    model = build_model("dilated_net", downsample=downsample)
    assert 150_000 < sum(p.numel() for p in model.parameters()) < 200_000
    assert receptive_field(model) > 44
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert isinstance(model.gap, nn.AdaptiveAvgPool2d) and list(model.named_children())[-2:][0][0] == "gap"
    layers = convs(model)
    assert any(conv.dilation[0] > 1 for conv in layers)
    separable = [
        (dw, pw)
        for dw, pw in zip(layers, layers[1:], strict=False)
        if dw.groups == dw.in_channels > 1 and dw.kernel_size == (3, 3) and pw.kernel_size == (1, 1)
    ]
    assert separable and all(pw.in_channels == dw.out_channels for dw, pw in separable)
    spatial = 4 if downsample == "stride" else 32
    assert model.features(torch.randn(1, 3, 32, 32)).shape == (1, 128, spatial, spatial)


def test_dilation_variant_never_strides_or_pools():
    model = build_model("dilated_net", downsample="dilation")
    assert all(conv.stride == (1, 1) for conv in convs(model))
    assert [type(m) for m in model.modules() if "Pool" in type(m).__name__] == [nn.AdaptiveAvgPool2d]
    strided = build_model("dilated_net", downsample="stride")
    assert sum(conv.stride == (2, 2) for conv in convs(strided)) == 3  # one transition in each of C1..C3


@pytest.mark.parametrize(("name", "kwargs"), MODELS)
def test_forward_and_backward_give_finite_gradients_everywhere(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs).train()
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    nn.functional.cross_entropy(logits, torch.tensor([0, 5, 9])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


def test_registry_rejects_an_unknown_name_and_lists_the_known_ones():
    with pytest.raises(PipelineError, match="unknown model 'resnet50'; known models: custom_resnet, dilated_net"):
        build_model("resnet50")


def test_model_kwargs_pick_the_arguments_of_the_chosen_model():
    resnet = ModelParams(name="custom_resnet", dropout=0.1, downsample="dilation").kwargs(10)
    assert resnet == {"dropout": 0.1, "num_classes": 10}
    chosen = ModelParams(name="dilated_net", dropout=0.2, downsample="dilation").kwargs(7)
    assert chosen == {"dropout": 0.2, "downsample": "dilation", "num_classes": 7}
    model = build_model("dilated_net", **chosen)
    assert all(conv.stride == (1, 1) for conv in convs(model))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)  # the head has one output per class


def test_params_validate_without_torch():
    # Every stage validates params.yaml first: a typo must be reported at once, not after torch has loaded.
    code = "import sys, cifar_pipeline.params; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_allowed_model_name_builds_its_model():
    assert tuple(models.MODELS) == MODEL_NAMES == get_args(ModelParams.model_fields["name"].annotation)


def test_model_summary_has_the_torchinfo_table_and_the_receptive_fields():
    model = build_model("custom_resnet").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = model_summary_text(model)
    assert "Total params: 6,573,130" in text
    for column in ("Input Shape", "Kernel Shape", "Output Shape", "Param #", "Trainable"):
        assert column in text
    assert "Sequential (res2)" in text and "Conv2d (0)" in text  # var names, depth 2
    assert "receptive_field" in text and "res2.4" in text
    assert text.rstrip().endswith("Receptive field of the last feature map: 64 pixels")
    # Summarising must not switch the mode nor update BatchNorm statistics.
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
