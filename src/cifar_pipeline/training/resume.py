"""A run that survives a kill: the resume state (fingerprint, RNG states) and the background writer that saves it
and the best epoch's model without stalling training.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_pipeline.models.checkpoint import save_plain
from cifar_pipeline.params import Params

# ---------------------------------------- checkpoint writer ----------------------------------------
# Checkpoints written off the training thread.
#
# The train stage's resume state and models/best.pt hold the weights and Adam's moments: about 75 MB each for
# custom_resnet. Written on the training thread after every epoch they would cost a large share of a GPU epoch of about
# a second (benchmarks/RESULTS.md, "Checkpoint writes"). Here the training thread only copies the tensors into buffers
# kept from the last epoch (where they lie: on the GPU, a device-side copy), and one background thread moves the copies
# to the CPU and writes the files, in order, each atomically.


def copy_into(value: Any, buffers: Any = None) -> Any:
    """`value` with every tensor copied: into the tensor at the same place in `buffers` (an earlier copy of the same
    structure) where it fits, else into a new one. Reusing buffers spares allocating (and on the CPU page-faulting)
    the whole state every epoch."""
    if isinstance(value, torch.Tensor):
        fits = isinstance(buffers, torch.Tensor) and (buffers.shape, buffers.dtype, buffers.device) == (
            value.shape,
            value.dtype,
            value.device,
        )
        return buffers.copy_(value) if fits else value.detach().clone()
    if isinstance(value, dict):
        buffers = buffers if isinstance(buffers, dict) else {}
        return {key: copy_into(item, buffers.get(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        buffers = buffers if isinstance(buffers, (list, tuple)) and len(buffers) == len(value) else [None] * len(value)
        items = [copy_into(item, buffer) for item, buffer in zip(value, buffers, strict=True)]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def _write_in_order(files: Sequence[tuple[Path, dict[str, Any]]]) -> None:
    for path, obj in files:
        save_plain(path, obj)


class CheckpointWriter:
    """One background thread writing lists of files, one list at a time, and the buffers their tensors are copied
    into. A failed write raises on the training thread at the next `snapshot`, `write`, `wait` or `close`."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._running: Future | None = None
        self._buffers: Any = None

    def snapshot(self, state: Any) -> Any:
        """A copy of `state` that training may not change, in the buffers of the last snapshot: so this waits until
        the last files handed over are written."""
        self.wait()
        self._buffers = copy_into(state, self._buffers)
        return self._buffers

    def busy(self) -> bool:
        """Whether the last files handed over are still being written."""
        return self._running is not None and not self._running.done()

    def write(self, files: Sequence[tuple[str | Path, dict[str, Any]]]) -> None:
        """Write `files` (path, content from `snapshot`) in this order, after the ones handed over before."""
        self.wait()
        self._running = self._executor.submit(_write_in_order, [(Path(path), obj) for path, obj in files])

    def wait(self) -> None:
        """Block until everything handed over is written."""
        running, self._running = self._running, None
        if running is not None:
            running.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown()


# ---------------------------------------- resume ----------------------------------------
# The train stage's resume state: what lets a killed run continue after its last completed epoch.
#
# After each epoch but the last, the whole state of the run (weights, optimizer, scheduler, grad scaler, history, RNG
# states) goes atomically to .resume/train.pt with a fingerprint of the params, inputs and the train stage's code. A
# rerun with the same fingerprint continues after the saved epoch and ends with the same weights and metrics as an
# uninterrupted run; with another fingerprint it starts afresh. DVC has no checkpoints of its own: this is ours.

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# The train stage's code, relative to the package: exactly its code deps in dvc.yaml (tests/test_stage_deps.py), and
# what the fingerprint hashes. Not stage.py: how errors are worded and files written, no stage's dependency.
TRAIN_CODE = ("params.py", "paths.py", "data", "models", "training")


def code_files(code: Sequence[str] = TRAIN_CODE, package_dir: str | Path = PACKAGE_DIR) -> list[Path]:
    """The Python files of `code` (files and folders of the package), sorted by their package-relative names."""
    package_dir = Path(package_dir)
    files = []
    for name in code:
        path = package_dir / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return sorted(files, key=lambda file: file.relative_to(package_dir).as_posix())


def fingerprint(params: Params, max_lr: float, files: Iterable[str | Path], code_dir: str | Path = PACKAGE_DIR) -> str:
    """A hash of everything the train stage's result depends on: a resume state is only valid under the same one.

    data.num_workers is left out: the augmentations do not depend on it, so a resumed run may use other workers.
    The train stage's code is in (TRAIN_CODE, its code deps in dvc.yaml): DVC reruns the stage after such a change,
    and a run killed under the old code must not be continued by the new one (the half-trained weights would pass
    for the new code's result). An edit of code it does not depend on (the report's) keeps the state.
    """
    digest = hashlib.sha256()
    settings = params.model_dump(
        include={"seed", "data", "model", "augment", "train"}, exclude={"data": {"num_workers"}}, mode="json"
    )
    digest.update(json.dumps({"params": settings, "max_lr": max_lr}, sort_keys=True).encode())
    for path in files:
        path = Path(path)
        digest.update(str(path).encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    code_dir = Path(code_dir)
    for path in code_files(TRAIN_CODE, code_dir):
        # By package-relative name, so a moved clone can still resume.
        digest.update(path.relative_to(code_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def rng_states() -> dict[str, Any]:
    """Every RNG state, as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_resume_state(path: str | Path, expected_fingerprint: str, best_path: str | Path) -> dict[str, Any] | None:
    """The saved state of an interrupted run, or None when there is none or it cannot be continued: made with
    other inputs, or the best epoch's model saved beside it (`best_path`) is gone, so that a best epoch from before
    the kill would never be written again. A state not continued is moved aside (train.stale.pt, best.stale.pt)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        stale = state.get("fingerprint") != expected_fingerprint
        reason = "it was made with other params, inputs or code" if stale else ""
    except Exception as exc:  # written atomically, so only a foreign or damaged file gets here
        reason = f"not a readable resume state ({exc})"
    if not reason and not Path(best_path).is_file():
        reason = f"{best_path} of the interrupted run is gone"
    if reason:
        # Moved aside, not deleted: a state ignored by mistake (say, with the package imported from another
        # checkout) can still be put back by hand. The next state ignored replaces it.
        kept = []
        for file in (path, Path(best_path)):
            if file.is_file():
                aside = file.with_name(f"{file.stem}.stale{file.suffix}")
                file.replace(aside)
                kept.append(str(aside))
        print(f"ignoring {path}: {reason}; starting afresh (kept as {' and '.join(kept)}: delete when not needed)")
        return None
    return state
