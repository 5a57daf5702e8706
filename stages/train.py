"""train stage: One Cycle training -> models/{model,best}.pt, DVCLive logs in reports/train, sample images.

Interrupted (killed, out of time)? Run it again with the same params: it resumes after the last completed epoch.
"""

import _venv  # noqa: F401  (first: reruns the stage with .venv's python where `python` lacks the package)

from cifar_pipeline.errors import run_stage
from cifar_pipeline.params import load_params
from cifar_pipeline.training import train


def main() -> None:
    params = load_params()
    summary = train(params)
    print(f"final test accuracy {summary['test']['acc']:.2f}% after {params.train.epochs} epochs")


if __name__ == "__main__":
    run_stage(main)
