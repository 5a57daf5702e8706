"""The pipeline's own errors, and how a stage script reports them.

A PipelineError is a problem the user can fix (bad params, a missing input, a corrupt archive): the stage
prints one readable message and exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


class PipelineError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class MissingInputError(PipelineError):
    """A stage's input does not exist yet: an upstream stage has to run first."""


def require_inputs(paths: dict[str, str]) -> None:
    """Fail with the stage to run when an input is missing; `paths` maps each input to its stage."""
    for path, stage in paths.items():
        if not Path(path).exists():
            raise MissingInputError(
                f"{path} does not exist: run the '{stage}' stage first "
                f"(dvc repro {stage}), or the whole pipeline with dvc repro"
            )


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main function; turn a PipelineError into a clear message and exit status 2."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
