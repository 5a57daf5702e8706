"""The train stage's resume state: what lets a killed run continue after its last completed epoch.

After each epoch but the last, the whole state of the run (weights, optimizer, scheduler, grad scaler, history, RNG
states) goes atomically to .resume/train.pt with a fingerprint of the params, inputs and the train stage's code. A rerun
with the same fingerprint continues after the saved epoch and ends with the same weights and metrics as an
uninterrupted run; with another fingerprint it starts afresh. DVC has no checkpoints of its own: this is ours.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_pipeline.params import Params

PACKAGE_DIR = Path(__file__).resolve().parent
# How errors are worded and how files are written (atomically), not what a stage computes: no stage's dependency.
NOT_CODE_DEPS = ("__init__.py", "errors.py", "atomic.py")


def module_file(module: str, package_dir: Path) -> Path | None:
    """The file of the package's `module` (dotted, from the package's name on), or None."""
    path = package_dir.joinpath(*module.split(".")[1:])  # cifar_pipeline.models.x -> package_dir/models/x
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_package_files(script: str | Path, package_dir: str | Path = PACKAGE_DIR) -> set[Path]:
    """Every file of the package in `package_dir` that `script` imports at module level, transitively, each package's
    __init__ with its modules: the code a stage runs, which dvc.yaml lists as the stage's deps
    (tests/test_stage_deps.py). Imports inside functions are left out: they run only when called, and the one there,
    params.py's model-name check, validates a name without using the models."""
    package_dir, package = Path(package_dir), __name__.split(".")[0]  # the package may lie in a folder of another name
    seen: set[Path] = set()
    todo = [Path(script)]
    while todo:
        for node in ast.parse(todo.pop().read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.split(".")[0] == package]
            else:
                continue
            for file in filter(None, (module_file(name, package_dir) for name in names)):
                for loaded in (file, file.parent / "__init__.py"):
                    if loaded not in seen and loaded.is_file():
                        seen.add(loaded)
                        todo.append(loaded)
    return seen


def fingerprint(params: Params, max_lr: float, files: Iterable[str | Path], code_dir: str | Path = PACKAGE_DIR) -> str:
    """A hash of everything the train stage's result depends on: a resume state is only valid under the same one.

    data.num_workers is left out: the augmentations do not depend on it, so a resumed run may use other workers.
    The train stage's code is in, exactly the package files it imports (its code deps in dvc.yaml): DVC reruns the
    stage after such a change, and a run killed under the old code must not be continued by the new one (the
    half-trained weights would pass for the new code's result). An edit of code it does not run (the report's)
    keeps the state.
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
    code = imported_package_files(code_dir / "training.py", code_dir) | {code_dir / "training.py"}
    for path in sorted(p for p in code if p.name not in NOT_CODE_DEPS or p.parent != code_dir):
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
