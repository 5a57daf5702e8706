"""report stage: evaluate models/model.pt on the test split; write reports/summary.md and the pictures it shows."""

import _venv  # noqa: F401  (first: reruns the stage with .venv's python where `python` lacks the package)

from cifar_pipeline.params import load_params
from cifar_pipeline.report.report import run_report
from cifar_pipeline.stage import run_stage


def main() -> None:
    run_report(load_params())


if __name__ == "__main__":
    run_stage(main)
