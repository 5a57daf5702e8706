"""Receptive field of every spatial layer, computed from kernel, stride, dilation and padding.

The layers are walked in registration order, which both models keep equal to their forward order. A residual block
adds its input to its branch's output; the branch has the larger receptive field, so walking the branch gives the
receptive field of the sum too (the max over the two paths). Only square kernels and inputs are handled.
"""

from __future__ import annotations

import math

from torch import nn

SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
COLUMNS = ("layer", "type", "kernel", "stride", "dilation", "padding", "jump", "receptive_field", "output_size", "note")


def _first(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value


def _geometry(layer: nn.Module, size: int) -> tuple[int, int, int, int, bool]:
    """(kernel, stride, dilation, padding, ceil_mode) of one layer fed a size x size map."""
    if isinstance(layer, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        out = _first(layer.output_size) or size
        return size // out, size // out, 1, 0, False
    kernel = _first(layer.kernel_size)
    stride = _first(layer.stride) if layer.stride is not None else kernel
    dilation = _first(getattr(layer, "dilation", 1))
    padding = layer.padding
    if padding == "same":
        padding = dilation * (kernel - 1) // 2
    elif padding == "valid":
        padding = 0
    return kernel, stride, dilation, _first(padding), getattr(layer, "ceil_mode", False)


def receptive_field_table(model: nn.Module, input_size: int = 32) -> list[dict]:
    """One row per spatial layer; the walk stops after the first global pooling (output 1x1), which sees it all."""
    residual = tuple(getattr(model, "residual_branches", ()))
    size, jump, field = input_size, 1, 1
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, SPATIAL):
            continue
        kernel, stride, dilation, padding, ceil_mode = _geometry(layer, size)
        span = dilation * (kernel - 1) + 1
        rounding = math.ceil if ceil_mode else math.floor
        out = int(rounding((size + 2 * padding - span) / stride)) + 1
        field += (kernel - 1) * dilation * jump
        jump *= stride
        note = ""
        if out == 1 and size > 1 and not isinstance(layer, nn.Conv2d):
            note = "global pooling: each output sees the whole image"
        elif name.split(".")[0] in residual:
            note = "residual branch: x + branch(x) has the branch's field"
        rows.append(
            {
                "layer": name,
                "type": type(layer).__name__,
                "kernel": kernel,
                "stride": stride,
                "dilation": dilation,
                "padding": padding,
                "jump": jump,
                "receptive_field": field,
                "output_size": out,
                "note": note,
            }
        )
        size = out
        if note.startswith("global"):
            break
    return rows


def receptive_field(model: nn.Module, input_size: int = 32) -> int:
    """Receptive field (pixels) of the last spatial feature map, before global pooling and the classifier."""
    rows = [row for row in receptive_field_table(model, input_size) if not row["note"].startswith("global")]
    return rows[-1]["receptive_field"] if rows else 1


def format_receptive_field_table(rows: list[dict]) -> str:
    """The table as aligned plain text."""
    cells = [list(COLUMNS)] + [[str(row[column]) for column in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
