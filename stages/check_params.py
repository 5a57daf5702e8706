"""check-params stage: validate the whole params.yaml before any other stage runs, and write a constant file.

Every other stage depends on its output, so DVC runs this first. A mistake in params.yaml (a typo, a value out of
range, an unknown model) stops `dvc repro` / `dvc exp run` here, before DVC removes any other stage's outputs to
rerun it. The output is the same for any valid params.yaml, so a valid change reruns only the stages it affects.
"""

import _venv  # noqa: F401  (first: reruns the stage with .venv's python where `python` lacks the package)

from cifar_pipeline import paths
from cifar_pipeline.params import load_params
from cifar_pipeline.stage import run_stage, write_json


def main() -> None:
    load_params()
    write_json(paths.PARAMS_CHECK, {"params.yaml": "valid"})


if __name__ == "__main__":
    run_stage(main)
