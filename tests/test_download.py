"""The download stage: every source kind, a flaky server, every bad archive, hostile archives, the stage script."""

import hashlib
import http.server
import json
import os
import pickle
import shlex
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from archives import (
    CLASSES,
    add_file,
    encode_image,
    image_folder_files,
    make_cifar100_archive,
    make_image_folder_archive,
    make_pickle_archive,
    pickle_batch,
    py2_pickle,
    write_tar,
)
from conftest import ROOT

from cifar_pipeline.data.dataset import compute_stats, load_split
from cifar_pipeline.data.download import download, download_url, load_pickle
from cifar_pipeline.params import DataParams
from cifar_pipeline.stage import PipelineError
from cifar_pipeline.use.predict import read_image

SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
SHARED_MD5 = "61471a7f964ebfeacc418be171470386"
FAST = {"backoff_s": 0.01, "timeout_s": 5.0}


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_output(out: Path, arrays: dict) -> dict:
    """The written folder holds exactly `arrays`, with the documented dtypes; returns meta.json."""
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz"]
    for split, (images, labels) in arrays.items():
        with np.load(out / f"{split}.npz") as npz:
            assert npz["images"].dtype == np.uint8 and npz["labels"].dtype == np.int64
            np.testing.assert_array_equal(npz["images"], images)
            np.testing.assert_array_equal(npz["labels"], labels)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES)
    for split, (_, labels) in arrays.items():
        assert meta["counts"][split] == len(labels)
        assert list(meta["class_counts"][split].values()) == np.bincount(labels, minlength=10).tolist()
    return meta


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def pickle_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("archives") / "cifar-10-python.tar.gz"
    return path, make_pickle_archive(path, n_train=50, n_test=20, seed=1)


# --- local sources --------------------------------------------------------------------------------------------


def test_pickle_layout_from_a_local_path(tmp_path, pickle_archive):
    path, arrays = pickle_archive
    meta = download(str(path), md5_of(path), tmp_path / "cifar10")
    assert assert_output(tmp_path / "cifar10", arrays) == meta
    assert meta["layout"] == "pickle" and meta["source"] == str(path) and meta["md5"] == md5_of(path)
    assert "wall_time_s" not in meta  # a time would make every rerun look like new data to DVC
    assert leftovers(tmp_path) == ["cifar10"]  # no scratch or temporary folders left behind


@pytest.mark.parametrize(("top_dir", "ext"), [("CIFAR-10-images", "png"), ("", "jpg"), ("imgs", "jpeg")])
def test_image_folder_layout_sorted_by_class_then_name(tmp_path, top_dir, ext):
    path = tmp_path / "images.tar.gz"
    arrays = make_image_folder_archive(path, per_class_train=3, per_class_test=2, seed=2, top_dir=top_dir, ext=ext)
    meta = download(path.as_uri(), None, tmp_path / "cifar10")  # a file:// URL
    assert assert_output(tmp_path / "cifar10", arrays)["layout"] == "image_folder"
    assert meta["counts"] == {"train": 30, "test": 20}
    assert np.all(np.diff(arrays["train"][1]) >= 0)  # the helper's order is the documented one


def test_an_image_folder_of_any_classes_takes_them_from_its_folder_names_in_sorted_order(tmp_path):
    classes = ("Zebra", "ant", "bee")  # sorted() order: upper case first
    files, arrays = image_folder_files(per_class_train=2, per_class_test=1, top_dir="", classes=classes)
    write_tar(tmp_path / "mine.tar.gz", {name: files[name] for name in reversed(files)})
    meta = download(str(tmp_path / "mine.tar.gz"), None, tmp_path / "cifar10")
    assert meta["classes"] == ["Zebra", "ant", "bee"] and meta["layout"] == "image_folder"
    assert meta["class_counts"] == {"train": {"Zebra": 2, "ant": 2, "bee": 2}, "test": {"Zebra": 1, "ant": 1, "bee": 1}}
    for split, (images, labels) in arrays.items():
        with np.load(tmp_path / "cifar10" / f"{split}.npz") as npz:
            np.testing.assert_array_equal(npz["images"], images)
            np.testing.assert_array_equal(npz["labels"], labels)
    assert meta["converted_to_32x32_rgb"] == 0 and meta["skipped_files"] == []


def test_images_of_another_size_or_mode_become_32x32_rgb_as_cifar_predict_makes_them(tmp_path):
    big = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    files, _ = image_folder_files(per_class_train=1, per_class_test=1, top_dir="top", classes=("a", "b"))
    files |= {
        "top/train/a/big.jpg": encode_image(big, "jpg"),
        "top/train/b/grey.png": encode_image(np.full((32, 32), 200, np.uint8)),
        "top/test/a/rgba.png": encode_image(np.zeros((32, 32, 4), np.uint8)),
        "top/train/a/notes.txt": b"not an image",
        "top/test/b/.DS_Store": b"junk",
    }
    write_tar(tmp_path / "mixed.tar.gz", files)
    meta = download(str(tmp_path / "mixed.tar.gz"), None, tmp_path / "cifar10")
    assert meta["converted_to_32x32_rgb"] == 3
    assert meta["skipped_files"] == ["top/test/b/.DS_Store", "top/train/a/notes.txt"]
    assert meta["counts"] == {"train": 4, "test": 3}
    with np.load(tmp_path / "cifar10/train.npz") as npz:
        images = npz["images"]
    assert images.shape == (4, 32, 32, 3)
    (tmp_path / "big.jpg").write_bytes(files["top/train/a/big.jpg"])
    np.testing.assert_array_equal(images[1], read_image(tmp_path / "big.jpg"))  # a/0000.png, a/big.jpg, b/...
    assert (images[3] == 200).all()  # grey to RGB


@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_the_cifar100_archive_with_fine_or_coarse_labels(tmp_path, labels):
    made = make_cifar100_archive(tmp_path / "cifar-100-python.tar.gz", n_train=200, n_test=100)
    arrays, names = made[labels]
    meta = download(str(tmp_path / "cifar-100-python.tar.gz"), None, tmp_path / "cifar10", labels=labels)
    assert meta["layout"] == "cifar100" and meta["labels"] == labels and meta["classes"] == names
    assert len(names) == {"fine": 100, "coarse": 20}[labels]
    for split, (images, split_labels) in arrays.items():
        with np.load(tmp_path / "cifar10" / f"{split}.npz") as npz:
            np.testing.assert_array_equal(npz["images"], images)
            np.testing.assert_array_equal(npz["labels"], split_labels)


def test_coarse_labels_need_the_cifar100_archive(tmp_path, pickle_archive):
    with pytest.raises(PipelineError, match="data.labels = 'coarse' applies to the CIFAR-100 archive only"):
        download(str(pickle_archive[0]), None, tmp_path / "cifar10", labels="coarse")
    assert not (tmp_path / "cifar10").exists()


def test_a_relative_path_is_taken_from_the_project_root(tmp_path, pickle_archive):
    path, arrays = pickle_archive
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "copy.tar.gz").write_bytes(path.read_bytes())
    download("../datasets/copy.tar.gz", None, project / "data" / "cifar10", root=project)
    assert_output(project / "data" / "cifar10", arrays)


def test_a_tilde_in_data_url_is_the_home_folder(tmp_path, pickle_archive, monkeypatch):
    """As docs/own-data.md says: DVC's parser rejects a bare ~ in `-S`, takes it quoted, and writes it as is."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    path, arrays = pickle_archive
    (tmp_path / "home").mkdir()
    (tmp_path / "home/cifar.tar.gz").write_bytes(path.read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  url: elsewhere\n")
    with pytest.raises(InvalidArgumentError):
        apply_overrides(params, ["data.url=~/cifar.tar.gz"])
    apply_overrides(params, ["data.url='~/cifar.tar.gz'"])
    url = yaml.safe_load(params.read_text())["data"]["url"]
    assert url == "~/cifar.tar.gz"
    download(url, None, tmp_path / "project/data/cifar10", root=tmp_path / "project")
    assert_output(tmp_path / "project/data/cifar10", arrays)


def test_missing_local_file_names_data_url(tmp_path):
    with pytest.raises(PipelineError, match=r"data.url = 'nowhere.tar.gz': .*nowhere.tar.gz does not exist"):
        download("nowhere.tar.gz", None, tmp_path / "cifar10", root=tmp_path)


def test_local_md5_mismatch_gives_both_md5s_and_writes_nothing(tmp_path, pickle_archive):
    path, _ = pickle_archive
    with pytest.raises(PipelineError, match=f"expected {'0' * 32} \\(data.md5\\), got {md5_of(path)}"):
        download(str(path), "0" * 32, tmp_path / "cifar10")
    assert leftovers(tmp_path) == []


def test_a_new_run_replaces_the_previous_output(tmp_path, pickle_archive):
    path, arrays = pickle_archive
    out = tmp_path / "cifar10"
    make_image_folder_archive(tmp_path / "other.tar.gz", seed=5)
    download(str(tmp_path / "other.tar.gz"), None, out)
    download(str(path), None, out)
    assert_output(out, arrays)
    assert leftovers(tmp_path) == ["cifar10", "other.tar.gz"]


# --- HTTP -----------------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.routes[path]`: a list of steps, the last one repeating. A step is an HTTP status to fail
    with, the bytes to send, or ('drop', bytes): announce all of it, send half, close the connection."""

    def do_GET(self):
        self.server.hits[self.path] += 1
        plan = self.server.routes.get(self.path, [404])
        step = plan.pop(0) if len(plan) > 1 else plan[0]
        if isinstance(step, int):
            self.send_error(step)
            return
        drop = isinstance(step, tuple)
        body = step[1] if drop else step
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if drop else body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def serve(http_server, pickle_archive):
    """serve(*steps) -> URL of the archive on the test server, answering with those steps."""
    http_server.routes, http_server.hits = {}, Counter()

    def add(*steps):
        http_server.routes["/cifar-10-python.tar.gz"] = list(steps)
        return f"http://127.0.0.1:{http_server.server_port}/cifar-10-python.tar.gz"

    add.hits = lambda: http_server.hits["/cifar-10-python.tar.gz"]
    add.body = pickle_archive[0].read_bytes()
    add.md5 = md5_of(pickle_archive[0])
    add.arrays = pickle_archive[1]
    return add


def test_http_download_checks_the_md5_and_cleans_up(tmp_path, serve):
    url = serve(serve.body)
    meta = download(url, serve.md5, tmp_path / "cifar10", **FAST)
    assert_output(tmp_path / "cifar10", serve.arrays)
    assert meta["source"] == url and meta["md5"] == serve.md5 and serve.hits() == 1
    assert leftovers(tmp_path) == ["cifar10"]


def test_http_md5_mismatch_gives_both_md5s_and_keeps_no_part_file(tmp_path, serve):
    url = serve(serve.body)
    with pytest.raises(PipelineError, match=f"md5 mismatch for {url}: expected {'a' * 32} .*got {serve.md5}"):
        download(url, "a" * 32, tmp_path / "cifar10", **FAST)
    assert leftovers(tmp_path) == []


def test_http_404_fails_at_once(tmp_path, serve):
    url = serve(404)
    with pytest.raises(PipelineError, match="HTTP 404 Not Found. Check data.url"):
        download(url, None, tmp_path / "cifar10", **FAST)
    assert serve.hits() == 1 and leftovers(tmp_path) == []


def test_http_500_is_retried(tmp_path, serve):
    download(serve(500, 503, serve.body), serve.md5, tmp_path / "cifar10", **FAST)
    assert serve.hits() == 3
    assert_output(tmp_path / "cifar10", serve.arrays)


def test_http_500_every_time_gives_up_after_the_tries(tmp_path, serve):
    with pytest.raises(PipelineError, match=r"HTTP 500 Internal Server Error \(3 tries\)"):
        download(serve(500), None, tmp_path / "cifar10", **FAST)
    assert serve.hits() == 3 and leftovers(tmp_path) == []


def test_a_connection_dropped_mid_file_is_retried(tmp_path, serve):
    download(serve(("drop", serve.body), serve.body), serve.md5, tmp_path / "cifar10", **FAST)
    assert serve.hits() == 2
    assert_output(tmp_path / "cifar10", serve.arrays)


def test_a_connection_dropped_every_time_is_a_clear_error(tmp_path, serve):
    with pytest.raises(PipelineError, match=r"connection lost: IncompleteRead.* \(2 tries\)"):
        download(serve(("drop", serve.body)), None, tmp_path / "cifar10", tries=2, **FAST)
    assert serve.hits() == 2 and leftovers(tmp_path) == []


def test_a_partial_file_never_becomes_the_archive(tmp_path, serve):
    """download_url renames .part into place only once complete and matching; a killed run's leftovers are ignored."""
    dest = tmp_path / "archive.tar.gz"
    with pytest.raises(PipelineError, match="connection lost"):
        download_url(serve(("drop", serve.body)), None, dest, tries=1, **FAST)
    assert leftovers(tmp_path) == []
    with pytest.raises(PipelineError, match="md5 mismatch"):
        download_url(serve(serve.body), "c" * 32, dest, tries=1, **FAST)
    assert leftovers(tmp_path) == []
    assert download_url(serve(serve.body), serve.md5, dest, **FAST) == serve.md5
    assert leftovers(tmp_path) == ["archive.tar.gz"] and dest.read_bytes() == serve.body
    dest.unlink()
    scratch = tmp_path / ".cifar10.download"  # what a download killed part-way leaves
    scratch.mkdir()
    (scratch / "cifar-10-python.tar.gz.part").write_bytes(serve.body[:100])
    (scratch / "cifar-10-python.tar.gz").write_bytes(b"stale")
    download(serve(serve.body), None, tmp_path / "cifar10", **FAST)
    assert_output(tmp_path / "cifar10", serve.arrays)
    assert leftovers(tmp_path) == ["cifar10"]


def test_an_unreachable_host_says_how_to_use_a_local_copy(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PipelineError) as info:
        download(f"http://127.0.0.1:{port}/cifar.tar.gz", None, tmp_path / "cifar10", tries=2, **FAST)
    message = str(info.value)
    assert f"cannot download http://127.0.0.1:{port}/cifar.tar.gz" in message and "refused" in message
    assert "point data.url at a local copy" in message and "../shared/datasets/cifar10-jpeg.tar.gz" in message
    assert "dvc exp run -S data.url=" in message
    assert leftovers(tmp_path) == []


# --- bad archives ---------------------------------------------------------------------------------------------


def _image_folder(tmp_path, change=None, drop=None, **images) -> Path:
    """A small valid image-folder archive, with members changed (name -> bytes) or dropped (name prefix)."""
    files, _ = image_folder_files(per_class_train=1, per_class_test=1, top_dir="top")
    files = {n: b for n, b in files.items() if not (drop and n.startswith(drop))}
    files.update(change or {})
    return write_tar(tmp_path / "bad.tar.gz", files)


def _with_members(tmp_path, folder: str, replaced: dict) -> Path:
    """good.tar.gz rewritten as bad.tar.gz with members of `folder` replaced (name -> bytes) or dropped (None)."""
    with tarfile.open(tmp_path / "good.tar.gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name, data in replaced.items():
        if data is None:
            del files[f"{folder}/{name}"]
        else:
            files[f"{folder}/{name}"] = data
    return write_tar(tmp_path / "bad.tar.gz", files)


def _pickle_archive(tmp_path, **batches) -> Path:
    make_pickle_archive(tmp_path / "good.tar.gz", n_train=20, n_test=10)
    return _with_members(tmp_path, "cifar-10-batches-py", batches)


def _cifar100(tmp_path, **replaced) -> Path:
    make_cifar100_archive(tmp_path / "good.tar.gz", n_train=100, n_test=100)
    return _with_members(tmp_path, "cifar-100-python", replaced)


def _truncated(tmp_path):
    make_pickle_archive(tmp_path / "good.tar.gz", n_train=20, n_test=10)
    data = (tmp_path / "good.tar.gz").read_bytes()
    (tmp_path / "bad.tar.gz").write_bytes(data[: len(data) // 2])
    return tmp_path / "bad.tar.gz"


def _raw(tmp_path, data: bytes) -> Path:
    (tmp_path / "bad.tar.gz").write_bytes(data)
    return tmp_path / "bad.tar.gz"


def _plain_tar(tmp_path):
    with tarfile.open(tmp_path / "bad.tar.gz", "w") as tar:  # not gzipped
        add_file(tar, "cifar-10-batches-py/test_batch", b"x")
    return tmp_path / "bad.tar.gz"


GRAY = encode_image(np.zeros((32, 32), np.uint8))
RGBA = encode_image(np.zeros((32, 32, 4), np.uint8))
SMALL = encode_image(np.zeros((28, 28, 3), np.uint8))

BAD_ARCHIVES = {
    "truncated": (_truncated, "not a readable .tar.gz archive"),
    "html page": (lambda t: _raw(t, b"<html>Not here</html>"), "not a readable .tar.gz archive"),
    "plain tar": (_plain_tar, "not a readable .tar.gz archive"),
    "neither layout": (
        lambda t: write_tar(t / "bad.tar.gz", {"readme.txt": b"hi", "pics/cat.png": GRAY}),
        r"not a dataset archive this pipeline reads: expected .* \(found: pics/cat.png\)",
    ),
    "both layouts": (
        lambda t: _image_folder(t, change={"top/cifar-10-batches-py/test_batch": b"x"}),
        "holds CIFAR-10 pickle batches and train/test image folders: ambiguous",
    ),
    "missing split": (lambda t: _image_folder(t, drop="top/test/"), "no top/test/<class>/ folders"),
    "class missing from test": (
        lambda t: _image_folder(t, drop="top/test/truck/"),
        "train/ and test/ must hold the same class folders: only in train/: truck$",
    ),
    "class only in train": (
        lambda t: _image_folder(t, change={"top/train/kitten/0000.png": SMALL}),
        "same class folders: only in train/: kitten$",
    ),
    "different class sets": (
        lambda t: _image_folder(t, drop="top/train/cat/", change={"top/train/kitten/0000.png": SMALL}),
        "same class folders: only in train/: kitten; only in test/: cat$",
    ),
    "empty class": (
        lambda t: _image_folder(t, change={"top/train/zebra/notes.txt": b"hi", "top/test/zebra/0000.gif": b"GIF8"}),
        "class folders without a PNG or JPEG image: top/train/zebra/, top/test/zebra/$",
    ),
    "one class": (
        lambda t: write_tar(t / "bad.tar.gz", {"train/cat/0.png": SMALL, "test/cat/0.png": SMALL}),
        r"needs at least 2 class folders; train/ has \['cat'\]",
    ),
    "two top folders": (
        lambda t: _image_folder(t, change={"other/train/cat/0000.png": SMALL}),
        "several top-level folders of the archive: other, top",
    ),
    "corrupt image": (
        lambda t: _image_folder(t, change={"top/train/cat/0000.png": b"\x89PNG garbage"}),
        "top/train/cat/0000.png: cannot decode the image",
    ),
    "cifar-100 without meta": (lambda t: _cifar100(t, meta=None), "cifar-100-python/ lacks meta: incomplete CIFAR-100"),
    "cifar-100 labels out of range": (
        lambda t: _cifar100(
            t, test=pickle_batch(np.zeros((2, 32, 32, 3), np.uint8), None, fine_labels=[3, 100], coarse_labels=[0, 1])
        ),
        "test labels outside 0..99",
    ),
    "cifar-100 without fine labels": (
        lambda t: _cifar100(t, test=pickle_batch(np.zeros((2, 32, 32, 3), np.uint8), [1, 2])),
        "cifar-100-python/test: 'fine_labels' is not a list of 2 integers",
    ),
    "missing batch": (lambda t: _pickle_archive(t, data_batch_3=None), "lacks data_batch_3: incomplete"),
    "batch of the wrong shape": (
        lambda t: _pickle_archive(t, test_batch=py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]})),
        r"test_batch: 'data' is not a uint8 array of shape \(N, 3072\)",
    ),
    "labels out of range": (
        lambda t: _pickle_archive(t, test_batch=pickle_batch(np.zeros((2, 32, 32, 3), np.uint8), [3, 10])),
        "test labels outside 0..9",
    ),
    "not a pickle": (lambda t: _pickle_archive(t, data_batch_2=b"hello"), "data_batch_2: not a valid CIFAR batch"),
    "other label names": (
        lambda t: _pickle_archive(t, **{"batches.meta": py2_pickle({b"label_names": [b"apple", b"pear"]})}),
        "label_names .* are not the CIFAR-10 classes",
    ),
}


@pytest.mark.parametrize("case", BAD_ARCHIVES)
def test_a_bad_archive_is_a_clear_error_and_writes_nothing(tmp_path, case):
    build, message = BAD_ARCHIVES[case]
    archive = build(tmp_path)
    with pytest.raises(PipelineError, match=message):
        download(str(archive), None, tmp_path / "out" / "cifar10")
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


# --- hostile archives -----------------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _RunsCode(f"touch {shlex.quote(str(sentinel))}")}, protocol=4)
    archive = _pickle_archive(tmp_path, data_batch_1=payload)
    with pytest.raises(PipelineError, match=r"data_batch_1: not a valid CIFAR batch.*refusing to load posix.system"):
        download(str(archive), None, tmp_path / "cifar10")
    assert not sentinel.exists()
    with pytest.raises(PipelineError, match="refusing to load builtins.eval"):
        load_pickle(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    # The payload is live: a plain unpickler does run it.
    pickle.loads(payload)
    assert sentinel.exists()


@pytest.mark.parametrize(
    ("name", "info", "message"),
    [
        ("/tmp/evil.png", {}, "has an absolute path"),
        ("../evil.png", {}, "contains '..'"),
        ("top/train/cat/../../../evil.png", {}, "contains '..'"),
        ("top/train/cat/link.png", {"type": tarfile.SYMTYPE, "linkname": "../../../../etc/passwd"}, "outside"),
        ("top/notes", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "outside"),
        ("top/hard", {"type": tarfile.LNKTYPE, "linkname": "../outside"}, "outside"),
        ("top/train/cat/copy.png", {"type": tarfile.SYMTYPE, "linkname": "0000.png"}, "is a link"),
    ],
)
def test_unsafe_members_are_refused(tmp_path, name, info, message):
    files, _ = image_folder_files(per_class_train=1, per_class_test=1, top_dir="top")
    with tarfile.open(tmp_path / "bad.tar.gz", "w:gz") as tar:
        for member, data in files.items():
            add_file(tar, member, data)
        add_file(tar, name, b"" if info else GRAY, **info)
    with tarfile.open(tmp_path / "bad.tar.gz") as tar:
        assert name in tar.getnames()  # the hostile name really is in the archive as written
    with pytest.raises(PipelineError, match=message):
        download(str(tmp_path / "bad.tar.gz"), None, tmp_path / "out" / "cifar10")
    assert leftovers(tmp_path) == ["bad.tar.gz"]


# --- the stage script -----------------------------------------------------------------------------------------


def run_stage(script: str, project: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / script)], cwd=project, env=env, capture_output=True, text=True
    )


def test_download_stage_script_end_to_end(tmp_path, pickle_archive):
    path, arrays = pickle_archive
    (tmp_path / "params.yaml").write_text(f"data:\n  url: {path}\n  md5: {md5_of(path)}\n")
    result = run_stage("download.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "data/cifar10: 50 train, 20 test images of 10 classes (airplane, automobile, " in result.stdout
    assert "); pickle layout, md5 " in result.stdout
    assert_output(tmp_path / "data" / "cifar10", arrays)
    assert json.loads((tmp_path / "reports/download_time.json").read_text())["wall_time_s"] > 0

    # The same archive again: byte-identical files (no time in meta.json, fixed npz timestamps), so DVC sees the
    # same data/cifar10 and reruns nothing after it.
    first = {p.name: p.read_bytes() for p in (tmp_path / "data/cifar10").iterdir()}
    time.sleep(2.1)  # zip timestamps have a resolution of two seconds
    assert run_stage("download.py", tmp_path).returncode == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "data/cifar10").iterdir()} == first
    assert b"wall_time_s" not in first["meta.json"]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "params.yaml").write_text(f"data:\n  url: {path}\n  md5: {'b' * 32}\n")
    result = run_stage("download.py", bad)
    assert result.returncode == 2
    assert result.stderr.startswith("error: md5 mismatch") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert leftovers(bad) == ["params.yaml"]


@pytest.mark.parametrize("others", [["top/train/a/notes.txt"], ["top/train/a/notes.txt", "top/test/b/x.gif"]])
def test_download_stage_names_the_files_it_skipped(tmp_path, others):
    files, _ = image_folder_files(per_class_train=1, per_class_test=1, top_dir="top", classes=("a", "b"))
    write_tar(tmp_path / "own.tar.gz", files | dict.fromkeys(others, b"not an image"))
    (tmp_path / "params.yaml").write_text(f"data:\n  url: {tmp_path / 'own.tar.gz'}\n  md5: null\n")
    result = run_stage("download.py", tmp_path)
    assert result.returncode == 0, result.stderr
    what = "a file that is" if len(others) == 1 else f"{len(others)} files that are"
    assert f"  skipped {what} not PNG or JPEG: {', '.join(sorted(others))}\n" in result.stdout


# --- the shared real copy -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_copy(tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "cifar10"
    return out, download(str(SHARED_CIFAR), SHARED_MD5, out)


@pytest.mark.shared_data
def test_shared_copy_has_every_image(shared_copy):
    out, meta = shared_copy
    assert meta["layout"] == "image_folder" and meta["md5"] == SHARED_MD5
    assert meta["counts"] == {"train": 50_000, "test": 10_000}
    assert meta["class_counts"]["train"] == dict.fromkeys(CLASSES, 5000)
    assert meta["class_counts"]["test"] == dict.fromkeys(CLASSES, 1000)
    images, labels = load_split(out, "test")
    assert images.shape == (10_000, 32, 32, 3) and np.array_equal(np.bincount(labels), [1000] * 10)


@pytest.mark.shared_data
def test_shared_copy_mean_and_std(shared_copy, tmp_path):
    out, _ = shared_copy
    stats = compute_stats(out, DataParams(), seed=42, path=tmp_path / "stats.json")
    assert stats["count"] == 50_000
    np.testing.assert_allclose(stats["mean"], (0.49125, 0.48209, 0.44652), atol=5e-4)
    np.testing.assert_allclose(stats["std"], (0.24523, 0.24278, 0.26063), atol=5e-4)
