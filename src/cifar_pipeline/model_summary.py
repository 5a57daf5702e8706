"""The model summary written to reports/model_summary.txt: torchinfo's layer table, then the receptive fields."""

from __future__ import annotations

from torch import nn

from cifar_pipeline.receptive_field import format_receptive_field_table, receptive_field, receptive_field_table


def model_summary_text(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> str:
    from torchinfo import summary

    # torchinfo would move a CPU model to CUDA when one is present: keep it where it is.
    device = next(model.parameters()).device
    table = summary(
        model,
        input_size=input_size,
        depth=2,
        col_names=("input_size", "kernel_size", "output_size", "num_params", "trainable"),
        row_settings=("var_names",),
        device=device,
        verbose=0,
    )
    rows = receptive_field_table(model, input_size[-1])
    return (
        f"{table}\n\n"
        f"Receptive field per spatial layer ({input_size[-1]}x{input_size[-1]} input; jump = input pixels between "
        f"neighbouring outputs)\n"
        f"{format_receptive_field_table(rows)}\n\n"
        f"Receptive field of the last feature map: {receptive_field(model, input_size[-1])} pixels\n"
    )
