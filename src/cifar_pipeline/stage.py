"""What every stage shares: its files written atomically (a temp file, then a rename), the error a user sees
(PipelineError: a message and exit status 1, never a traceback) and `run_stage`, which runs a stage's main with both.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# ---------------------------------------- atomic ----------------------------------------
# Atomic writes: every output goes to a temporary file beside its target, then is renamed into place.
#
# A stage that fails or is killed part-way therefore never leaves a half-written artifact behind.


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; outputs should get the usual permissions, as if opened normally.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_torch(path: str | Path, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_figure(path: str | Path, figure: Any, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically (the format follows the target's suffix) and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    plt.close(figure)


# ---------------------------------------- errors ----------------------------------------
# The pipeline's own errors, and how a stage script reports them.
#
# A PipelineError is a problem the user can fix (bad params, a missing input, a corrupt archive): the stage
# prints one readable message and exits non-zero. Anything else is a bug and keeps its traceback.


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
