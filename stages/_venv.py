"""Imported first by every stage script: runs the stage with the project's .venv when `python` lacks the package.

dvc.yaml's commands call `python`, the first on PATH: `.venv/bin/dvc repro` without `source .venv/bin/activate` (which
`make repro` does for you, by putting .venv/bin first on PATH) finds the system's, which has none of the project's
packages. Standard library only: that is all such a python has.
"""

import importlib.util
import os
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parents[1] / ".venv"
# Set for the rerun: if .venv's python lacks the package too, say so rather than rerun again.
RERUN = "CIFAR_PIPELINE_RERUN"

if importlib.util.find_spec("cifar_pipeline") is None:
    python = VENV / "bin" / "python"
    if python.is_file() and RERUN not in os.environ:
        print(f"note: {sys.executable} cannot import cifar_pipeline: running the stage with {python}", file=sys.stderr)
        os.environ[RERUN] = "1"
        os.execv(python, [str(python), *sys.argv])
    sys.exit(
        f"error: {sys.executable} cannot import cifar_pipeline. Run `make repro` (it creates .venv and runs dvc "
        "with it), or activate the environment the project is installed in before running dvc "
        "(source .venv/bin/activate; or pip install -e . into this Python)"
    )
