"""Tiny dataset archives for tests, in every layout the download stage reads (CIFAR-10 pickles, CIFAR-100 pickles,
image folders of any classes).

Each builder writes a .tar.gz and returns {'train': (images, labels), 'test': (images, labels)}: exactly the
arrays, in exactly the order, the download stage must produce from it. Import it from a test:
`from archives import make_pickle_archive`.
"""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def random_split(n: int, rng: np.random.Generator, classes: int = len(CLASSES)) -> tuple[np.ndarray, np.ndarray]:
    """n random RGB images with every class present (n >= classes), labels shuffled."""
    labels = rng.permutation(np.arange(n) % classes).astype(np.int64)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), labels


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"", **info) -> None:
    """Add a member; `info` sets TarInfo fields, e.g. type=tarfile.SYMTYPE, linkname='../x'."""
    member = tarfile.TarInfo(name)
    member.size = len(data)
    for key, value in info.items():
        setattr(member, key, value)
    tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


def write_tar(path: str | Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            add_file(tar, name, data)
    return Path(path)


# --- the official python-pickle layout ------------------------------------------------------------------------


def py2_pickle(obj) -> bytes:
    """Pickle `obj` as Python 2 wrote CIFAR-10's batches: str as byte strings, arrays through numpy.core.

    Handles what the batches hold: dict, list, bytes, int and uint8 ndarrays. Python 3's pickle cannot write
    these opcodes, and the official archive is not reachable offline, so this is how tests get real-format files.
    """

    def string(data: bytes) -> bytes:
        return b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<I", len(data)) + data

    def integer(n: int) -> bytes:
        if 0 <= n < 256:
            return b"K" + bytes([n])
        return b"J" + struct.pack("<i", n)

    def dump(value) -> bytes:
        if isinstance(value, dict):
            return b"}(" + b"".join(dump(k) + dump(v) for k, v in value.items()) + b"u"
        if isinstance(value, list):
            return b"](" + b"".join(dump(v) for v in value) + b"e"
        if isinstance(value, bytes):
            return string(value)
        if isinstance(value, int):
            return integer(value)
        if isinstance(value, np.ndarray) and value.dtype == np.uint8:
            # ndarray.__reduce__ as numpy 1.x on Python 2 wrote it: _reconstruct(ndarray, (0,), 'b') + state.
            dtype = b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"
            dtype += b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"
            shape = b"(" + b"".join(integer(n) for n in value.shape) + b"t"
            array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b")
            array += b"\x87R(" + integer(1) + shape + dtype + b"\x89" + string(value.tobytes()) + b"tb"
            return array
        raise TypeError(f"py2_pickle cannot write {type(value).__name__}")

    return b"\x80\x02" + dump(obj) + b"."


def pickle_batch(images: np.ndarray, labels: np.ndarray, **other_labels: np.ndarray) -> bytes:
    """One batch file: rows of 1024 red, 1024 green, 1024 blue values, as in the official archive. CIFAR-100's
    files name their labels fine_labels and coarse_labels: pass labels=None and those as keywords."""
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)
    batch = {
        b"batch_label": b"test batch",
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    if labels is not None:
        batch[b"labels"] = [int(x) for x in labels]
    for key, values in other_labels.items():
        batch[key.encode()] = [int(x) for x in values]
    return py2_pickle(batch)


def make_pickle_archive(
    path: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0, top_dir: str = "cifar-10-batches-py"
) -> Arrays:
    """The official layout: top_dir/data_batch_1..5 (train split in five batches), test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    train, test = random_split(n_train, rng), random_split(n_test, rng)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    files = {f"{top_dir}/batches.meta": py2_pickle(meta), f"{top_dir}/readme.html": b"<html></html>"}
    for i, chunk in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        files[f"{top_dir}/data_batch_{i}"] = pickle_batch(train[0][chunk], train[1][chunk])
    files[f"{top_dir}/test_batch"] = pickle_batch(*test)
    write_tar(path, files)
    return {"train": train, "test": test}


def cifar100_names(n: int, kind: str) -> list[str]:
    return [f"{kind}_{i:03d}" for i in range(n)]


def make_cifar100_archive(path: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> dict:
    """The official CIFAR-100 python layout: cifar-100-python/{train,test,meta}, 100 fine classes each in one of
    20 coarse ones (fine label i is in coarse class i % 20). Returns {'fine'|'coarse': (arrays, class names)}."""
    rng = np.random.default_rng(seed)
    fine_names, coarse_names = cifar100_names(100, "fine"), cifar100_names(20, "coarse")
    meta = {
        b"fine_label_names": [c.encode() for c in fine_names],
        b"coarse_label_names": [c.encode() for c in coarse_names],
    }
    files = {"cifar-100-python/meta": py2_pickle(meta)}
    fine: Arrays = {}
    palette = rng.integers(30, 225, size=(100, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        _, labels = random_split(n, rng, classes=100)
        # Each fine class a colour plus noise, as learnable_archive: a tiny model can learn it in a few steps.
        images = np.clip(palette[labels][:, None, None, :] + rng.normal(0, 25, size=(n, 32, 32, 3)), 0, 255)
        images = images.astype(np.uint8)
        files[f"cifar-100-python/{split}"] = pickle_batch(images, None, fine_labels=labels, coarse_labels=labels % 20)
        fine[split] = images, labels
    write_tar(path, files)
    coarse = {split: (images, labels % 20) for split, (images, labels) in fine.items()}
    return {"fine": (fine, fine_names), "coarse": (coarse, coarse_names)}


# --- the image-folder layout ----------------------------------------------------------------------------------


def encode_image(image: np.ndarray, ext: str = "png") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG" if ext in ("jpg", "jpeg") else ext.upper())
    return buffer.getvalue()


def image_folder_files(
    per_class_train: int = 2,
    per_class_test: int = 1,
    seed: int = 0,
    top_dir: str = "CIFAR-10-images",
    ext: str = "png",
    classes: tuple[str, ...] = CLASSES,
) -> tuple[dict[str, bytes], Arrays]:
    """({member name: bytes}, arrays) of [top_dir/]{train,test}/<class>/NNNN.<ext>, before any tar is written.

    The arrays are the decoded files (JPEG is lossy), sorted by class and then file name; `classes` must be given
    in sorted order, the label order the download stage gives them.
    """
    assert list(classes) == sorted(classes), "labels follow the sorted folder names"
    rng = np.random.default_rng(seed)
    prefix = f"{top_dir}/" if top_dir else ""
    files: dict[str, bytes] = {}
    arrays: Arrays = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        images, labels = [], []
        for label, cls in enumerate(classes):
            for i in range(per_class):
                data = encode_image(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), ext)
                files[f"{prefix}{split}/{cls}/{i:04d}.{ext}"] = data
                images.append(np.asarray(Image.open(io.BytesIO(data))))
                labels.append(label)
        arrays[split] = np.stack(images), np.array(labels, dtype=np.int64)
    return files, arrays


def make_image_folder_archive(
    path: str | Path,
    per_class_train: int = 2,
    per_class_test: int = 1,
    seed: int = 0,
    top_dir: str = "CIFAR-10-images",
    ext: str = "png",
    classes: tuple[str, ...] = CLASSES,
) -> Arrays:
    """The image-folder layout, members written in a shuffled order (the reader must sort them itself)."""
    files, arrays = image_folder_files(per_class_train, per_class_test, seed, top_dir, ext, classes)
    names = list(files)
    np.random.default_rng(seed).shuffle(names)
    write_tar(path, {name: files[name] for name in names})
    return arrays


# --- a learnable set: each class a colour plus noise ----------------------------------------------------------


def learnable_archive(
    path: Path, per_class_train: int = 20, per_class_test: int = 6, classes: tuple[str, ...] = CLASSES
) -> None:
    """An image-folder archive whose classes differ by colour, so a model can learn them in a few steps."""
    rng = np.random.default_rng(0)
    palette = rng.integers(30, 225, size=(len(classes), 3))
    files = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        for label, cls in enumerate(classes):
            for i in range(per_class):
                noise = rng.normal(0, 25, size=(32, 32, 3))
                image = np.clip(palette[label] + noise, 0, 255).astype(np.uint8)
                files[f"tiny/{split}/{cls}/{i:04d}.png"] = encode_image(image)
    write_tar(path, files)
