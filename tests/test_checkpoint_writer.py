"""The background checkpoint writer: copies that training cannot change, files written in order off the calling
thread, and errors that reach the calling thread."""

import threading

import pytest
import torch

from cifar_pipeline.training import resume
from cifar_pipeline.training.resume import CheckpointWriter, copy_into


def test_a_snapshot_is_a_copy_kept_in_the_same_buffers_every_time():
    weights = torch.arange(6.0).reshape(2, 3).contiguous(memory_format=torch.contiguous_format)
    state = {"model": {"w": weights}, "betas": (0.9, 0.99), "steps": [torch.tensor(1.0)], "name": "x"}
    writer = CheckpointWriter()
    try:
        first = writer.snapshot(state)
        weights.add_(100)  # training goes on in place
        assert torch.equal(first["model"]["w"], torch.arange(6.0).reshape(2, 3))
        assert first["betas"] == (0.9, 0.99) and first["name"] == "x" and first["steps"][0].item() == 1.0

        buffer = first["model"]["w"]
        second = writer.snapshot(state)
        assert second["model"]["w"] is buffer  # reused, not allocated again
        assert torch.equal(buffer, weights) and buffer is not weights
    finally:
        writer.close()


def test_copy_into_allocates_where_a_buffer_does_not_fit():
    old = {"a": torch.zeros(3), "b": torch.zeros(2)}
    new = copy_into({"a": torch.ones(3), "b": torch.ones(4), "c": torch.ones(1)}, old)
    assert new["a"] is old["a"] and torch.equal(new["a"], torch.ones(3))
    assert new["b"] is not old["b"] and torch.equal(new["b"], torch.ones(4)) and torch.equal(old["b"], torch.zeros(2))
    assert torch.equal(new["c"], torch.ones(1))


def test_files_are_written_in_order_on_another_thread(tmp_path, monkeypatch):
    release = threading.Event()
    written: list[tuple[str, str]] = []
    save = resume.save_plain

    def slow_save(path, obj):
        release.wait(timeout=30)
        written.append((path.name, threading.current_thread().name))
        save(path, obj)

    monkeypatch.setattr(resume, "save_plain", slow_save)
    writer = CheckpointWriter()
    try:
        writer.write([(tmp_path / "best.pt", {"epoch": 1}), (tmp_path / "train.pt", {"epoch": 1})])
        assert written == [] and not (tmp_path / "best.pt").exists()  # write() returned before the files were written
        release.set()
        writer.wait()
        assert (tmp_path / "best.pt").is_file() and (tmp_path / "train.pt").is_file()
    finally:
        writer.close()
    assert [name for name, _ in written] == ["best.pt", "train.pt"]
    assert all(thread.startswith("checkpoint-writer") for _, thread in written)
    assert torch.load(tmp_path / "train.pt", weights_only=True) == {"epoch": 1}


def test_a_failed_write_raises_on_the_calling_thread(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    writer = CheckpointWriter()
    writer.write([(tmp_path / "file" / "train.pt", {"epoch": 1})])
    with pytest.raises(OSError):
        writer.close()
