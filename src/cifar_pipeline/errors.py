"""The pipeline's own errors, and how a stage script reports them.

A PipelineError is a problem the user can fix (bad params, a missing input, a corrupt archive): the stage
prints one readable message and exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from cifar_pipeline.atomic import write_json


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


def run_stage(main: Callable[[], None], time_file: str | Path | None = None) -> None:
    """Run a stage's main function; turn a PipelineError into a clear message and exit status 2.

    `time_file`: where the stage's wall time goes, as {"wall_time_s": ...}. A file of its own, because a time differs
    on every run: in an output that a later stage reads, it would rerun that stage for nothing.
    """
    started = time.perf_counter()
    try:
        main()
        if time_file is not None:
            write_json(time_file, {"wall_time_s": round(time.perf_counter() - started, 3)})
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
