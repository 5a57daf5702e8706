"""Where the time of one train step goes, op by op (torch.profiler), with the runtime params.yaml asks for.

    python benchmarks/profile_step.py                      # custom_resnet, batch 512, the params' precision
    python benchmarks/profile_step.py --precision bf16 --steps 3
    python benchmarks/profile_step.py --model dilated_net --batch-size 64

Prints the profiler's table of the ops with the most self time, then the share of convolutions (forward and
backward) in the total: set against bench.py's ceiling rows, it says whether anything but the conv kernels is left
to speed up.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from cifar_pipeline.params import load_params
from cifar_pipeline.training.engine import make_optimizer, make_scaler, new_model, train_step
from cifar_pipeline.training.runtime import make_runtime

CONV_OPS = ("aten::convolution", "aten::convolution_backward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default=None, help="default: model.name of the params file")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size of the params file")
    parser.add_argument("--precision", default=None, help="default: train.precision of the params file")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps, after two warm-up steps")
    parser.add_argument("--rows", type=int, default=15, help="ops in the table")
    args = parser.parse_args()

    params = load_params(args.params)
    model_params = params.model.model_copy(update={"name": args.model or params.model.name})
    train = params.train.model_copy(update={"precision": args.precision or params.train.precision})
    runtime = make_runtime(train)
    batch_size = args.batch_size or train.batch_size

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    model = new_model(model_params, params.seed, runtime, 10)
    optimizer = make_optimizer(model, 1e-3, train.weight_decay, runtime)
    step = (model, *runtime.to_device(images, labels), optimizer, nn.CrossEntropyLoss(), make_scaler(runtime), runtime)
    for _ in range(2):  # first kernels, allocator, cudnn.benchmark's search
        train_step(*step)

    cuda = runtime.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(args.steps):
            train_step(*step)
        if cuda:
            torch.cuda.synchronize(runtime.device)

    ops = profiler.key_averages()
    kind = "device" if cuda else "cpu"
    print(ops.table(sort_by=f"self_{kind}_time_total", row_limit=args.rows))
    total = sum(getattr(op, f"self_{kind}_time_total") for op in ops)
    # Inclusive times: the top-level conv ops hold their kernels (oneDNN or cuDNN), forward and backward.
    conv = sum(getattr(op, f"{kind}_time_total") for op in ops if op.key in CONV_OPS)
    print(
        f"{model_params.name}, batch {batch_size}, {args.steps} steps on {runtime.device} "
        f"({train.precision} precision, {'channels_last' if runtime.channels_last else 'NCHW'}): "
        f"{total / 1e6 / args.steps:.3f} s of {kind} time a step, {batch_size * args.steps / (total / 1e6):.1f} "
        f"images/s of {kind} time; convolutions {100 * conv / total:.1f}% of it"
    )


if __name__ == "__main__":
    main()
