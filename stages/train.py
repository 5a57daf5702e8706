"""train stage: One Cycle training -> models/{model,best}.pt, DVCLive logs in reports/train, sample images.

Interrupted (killed, out of time)? Run it again with the same params: it resumes after the last completed epoch.
train.devices > 1: the stage starts itself again on that many processes under torchrun (training/runtime.py).
"""

import _venv  # noqa: F401  (first: reruns the stage with .venv's python where `python` lacks the package)

from cifar_pipeline.params import load_params
from cifar_pipeline.stage import run_stage
from cifar_pipeline.training.runtime import launch, under_torchrun
from cifar_pipeline.training.train import train


def main() -> None:
    params = load_params()
    if params.train.devices > 1 and not under_torchrun():
        launch(params.train.devices, __file__)
        return
    summary = train(params)
    if summary is not None:  # rank 0's
        average = f", {summary['ema']['test']['acc']:.2f}% with the weight average" if "ema" in summary else ""
        print(f"final test accuracy {summary['test']['acc']:.2f}%{average} after {params.train.epochs} epochs")


if __name__ == "__main__":
    run_stage(main)
