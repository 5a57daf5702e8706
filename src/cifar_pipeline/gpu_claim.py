"""Which GPU a training process takes when several run at once, as `dvc queue start -j N` does on N GPUs.

Without this every queue worker would train on cuda:0. With `train.device: auto` and CUDA present, lr-find and train
each take the first GPU that no other run of this pipeline on the machine holds: an exclusive lock (flock) on
`<lock dir>/gpu-<id>.lock`, held until the process exits. The kernel drops the lock when the process ends in any way,
so a killed run never leaves a GPU claimed. When every GPU is taken the process waits for one and says so. The lock
dir is $CIFAR_PIPELINE_GPU_LOCKS, else `<temp dir>/cifar-pipeline-gpu-locks`: one for every clone and every queue
worker on the machine. A GPU's id is its entry in CUDA_VISIBLE_DEVICES when that is set (so that two workers shown
different GPUs never share a lock), else its index. `train.device: cuda` claims nothing and uses cuda:0.

Why flock and not a library: the claim must die with the process however it dies (a kill, an out-of-memory kill),
which a lock file with a PID in it cannot promise; flock is in the standard library on Linux and macOS.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; every run takes the first GPU, as before
    fcntl = None

LOCK_DIR_ENV = "CIFAR_PIPELINE_GPU_LOCKS"
_claim: dict[str, int] = {}  # once this process holds a GPU: its index and the lock's file descriptor (kept open)


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "cifar-pipeline-gpu-locks")


def gpu_ids(count: int) -> list[str]:
    """The ids of the `count` GPUs this process sees, as the machine knows them."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:count] if len(visible) >= count else [str(i) for i in range(count)]


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a curious `cat`
    return fd


def claim_gpu(
    count: int, *, folder: Path | None = None, poll_s: float = 2.0, say: Callable[[str], None] = print
) -> int:
    """The index (0..count-1) of the first GPU no other process holds, now held by this one until it exits.
    Waits while all are taken. A process that already holds one gets the same one again."""
    if _claim:
        return _claim["index"]
    if fcntl is None or count < 1:
        return 0
    folder = folder or lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    ids = gpu_ids(count)
    waited_since = None
    while True:
        for index, gpu in enumerate(ids):
            fd = _try_lock(folder / f"gpu-{gpu}.lock")
            if fd is not None:
                _claim.update(index=index, fd=fd)
                waited = f" after waiting {time.monotonic() - waited_since:.0f} s" if waited_since else ""
                say(f"claimed GPU {gpu} (cuda:{index}) for this process{waited}; lock {folder / f'gpu-{gpu}.lock'}")
                return index
        if waited_since is None:
            waited_since = time.monotonic()
            say(f"all {count} GPUs are held by other runs of this pipeline (locks in {folder}): waiting for one")
        time.sleep(poll_s)
