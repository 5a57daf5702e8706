"""Checkpoints written off the training thread.

The train stage's resume state and models/best.pt hold the weights and Adam's moments: about 75 MB each for
custom_resnet. Written on the training thread after every epoch they would cost a large share of a GPU epoch of about
a second (benchmarks/RESULTS.md, "Checkpoint writes"). Here the training thread only copies the tensors into buffers
kept from the last epoch (where they lie: on the GPU, a device-side copy), and one background thread moves the copies
to the CPU and writes the files, in order, each atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from cifar_pipeline.checkpoint import save_plain


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
