"""The train stage's resume state: what lets a killed run continue after its last completed epoch.

After each epoch but the last, the whole state of the run (weights, optimizer, scheduler, grad scaler, history, RNG
states) goes atomically to .resume/train.pt with a fingerprint of the params, inputs and package source. A rerun
with the same fingerprint continues after the saved epoch and ends with the same weights and metrics as an
uninterrupted run; with another fingerprint it starts afresh. DVC has no checkpoints of its own: this is ours.
"""

from __future__ import annotations

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


def fingerprint(params: Params, max_lr: float, files: Iterable[str | Path], code_dir: str | Path = PACKAGE_DIR) -> str:
    """A hash of everything the train stage's result depends on: a resume state is only valid under the same one.

    data.num_workers is left out: the augmentations do not depend on it, so a resumed run may use other workers.
    The package's source is in: DVC reruns the stage after a code change, and a run killed under the old code must
    not be continued by the new one (the half-trained weights would pass for the new code's result).
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
    for path in sorted(code_dir.rglob("*.py")):  # by package-relative name, so a moved clone can still resume
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
