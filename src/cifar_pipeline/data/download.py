"""The download stage: any supported archive (CIFAR-10's pickle batches, CIFAR-100, or a folder of images per
class, tar/zip/gz) -> data/cifar10/{train,test}.npz + meta.json; and how one image file becomes a 32x32 RGB input
(`to_model_input`, shared with cifar-predict).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import pickle
import posixpath
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from cifar_pipeline.params import CIFAR10_CLASSES, CIFAR100_LABELS
from cifar_pipeline.paths import DATA_DIR
from cifar_pipeline.stage import PipelineError

# ---------------------------------------- images ----------------------------------------
# How any picture becomes a 32x32 RGB model input: the same for cifar-predict's files and the download stage's
# image-folder archives, so that a model sees its own data and a user's photos alike.
#
# Pillow reads the image (PNG, JPEG, or anything else Pillow knows), turns it upright by its EXIF orientation and
# converts it to RGB (grey and palette images too; an alpha channel is dropped). Then the largest centred square is
# cropped, so the object keeps its proportions, and resized to 32x32 with Pillow's bicubic filter, which averages over
# the pixels it shrinks so that a large photo does not alias. A 32x32 RGB image is used as it is.

IMAGE_SIZE = 32
ORIENTATION = 0x0112  # the EXIF tag; 1 is upright


def to_model_input(image: Image.Image) -> tuple[np.ndarray, bool]:
    """(uint8 (32, 32, 3) RGB array, whether the image had to be changed: another size, mode or orientation)."""
    rotated = image.getexif().get(ORIENTATION, 1) != 1
    changed = rotated or image.mode != "RGB"
    rgb = ImageOps.exif_transpose(image).convert("RGB")
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        side = min(rgb.size)
        left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        changed = True
    return np.asarray(rgb, dtype=np.uint8), changed


# ---------------------------------------- download ----------------------------------------
# The download stage: fetch the dataset's archive, check it, and write data/cifar10/{train,test}.npz + meta.json.
#
# The archive may be a URL (official host or a mirror), a file:// URL or a local path. Its layout is detected
# from its contents: the official CIFAR-10 python-pickle batches, the official CIFAR-100 python archive (fine or coarse
# labels, data.labels), or an image folder ([top/]train/<class>/*.png|jpg, test/<class>/*.png|jpg) with any number of
# classes. Members are read straight from the tar stream, never extracted, and pickles go through a restricted
# unpickler, so a hostile archive can neither write outside data/ nor run code. The output folder keeps its name,
# data/cifar10, whatever the dataset: meta.json says which classes it holds.
#
# An image folder's classes are its train/ folder names in sorted order (Python's sorted(): by Unicode code point, so
# "Zebra" comes before "ant"); for CIFAR-10's own folder names that is the official label order. Images of another size
# or mode become 32x32 RGB as cifar-predict makes them (to_model_input, above); files that are not PNG or JPEG are
# skipped, and the stage says how many of each. An image that cannot be decoded, a class folder without images,
# fewer than 2 classes, or train/ and test/ with different class folders stop the stage with one line naming what is
# wrong.
#
# The output is a function of the archive alone: the same archive gives byte-identical files (the npz members carry a
# fixed timestamp, and the stage's wall time goes to a file of its own), so rerunning the stage reruns nothing after it.

# The official label order: label i is CLASSES[i].
CLASSES = CIFAR10_CLASSES

SHARED_COPY_HINT = "../shared/datasets/cifar10-jpeg.tar.gz"
PICKLE_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
PICKLE_TEST = "test_batch"
PICKLE_META = "batches.meta"
CIFAR100_FILES = ("train", "test", "meta")  # in cifar-100-python/
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # the official cifar-100-python.tar.gz
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
CHUNK = 1 << 20


# --- fetching -------------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5(source: str, expected: str | None, actual: str) -> None:
    if expected is not None and actual != expected.lower():
        raise PipelineError(
            f"md5 mismatch for {source}: expected {expected.lower()} (data.md5), got {actual}. "
            "The file is corrupt, incomplete or another archive: fetch it again, or fix data.md5 in params.yaml"
        )


def local_source(url: str, root: Path) -> Path | None:
    """The file a `data.url` names on this machine, or None when it is an http(s) URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise PipelineError(f"data.url = {url!r}: unsupported scheme; use an http(s):// or file:// URL, or a path")
    else:
        # ~ too: a shell leaves it alone in `-S data.url=...`, and DVC's parser wants it quoted (docs/own-data.md).
        path = Path(url).expanduser()
    return path if path.is_absolute() else root / path


def _unreachable_message(url: str, tries: int, problem: str) -> str:
    return (
        f"cannot download {url} ({problem}; {tries} tries). Without access to that host, point data.url at a "
        f"local copy of the archive (a path relative to the project root, e.g. {SHARED_COPY_HINT}, or a file:// "
        f"URL) and set data.md5 to its md5 (or null): edit params.yaml and rerun dvc repro, or run "
        f"dvc exp run -S data.url=<path> -S data.md5=<md5>"
    )


def _http_get(url: str, part: Path, timeout_s: float) -> str:
    """Stream `url` into `part`; return its md5. A short body is an error, so a dropped connection is retried."""
    digest = hashlib.md5()
    received = 0
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(part, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        name = posixpath.basename(urllib.parse.urlparse(url).path) or "download"
        # disable=None: a progress bar on a terminal, nothing in logs and CI.
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client returns a short body without complaint when the server closes early.
    if total is not None and received < total:
        raise http.client.IncompleteRead(b"", total - received)
    return digest.hexdigest()


def download_url(
    url: str, md5: str | None, dest: Path, *, tries: int = 3, backoff_s: float = 2.0, timeout_s: float = 60.0
) -> str:
    """Download `url` to `dest` through `dest.part`; `dest` appears only once complete and matching `md5`.

    HTTP 5xx and dropped or refused connections are retried `tries` times with doubling backoff; other HTTP
    errors (404, 403) fail at once. Returns the md5 of the file.
    """
    part = dest.with_name(dest.name + ".part")
    problem, unreachable = "", False
    for attempt in range(1, tries + 1):
        if attempt > 1:
            time.sleep(backoff_s * 2 ** (attempt - 2))
        try:
            actual = _http_get(url, part, timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                part.unlink(missing_ok=True)
                raise PipelineError(
                    f"cannot download {url}: HTTP {exc.code} {exc.reason}. Check data.url in params.yaml"
                ) from None
            problem, unreachable = f"HTTP {exc.code} {exc.reason}", False
        except urllib.error.URLError as exc:  # no connection at all: DNS, refused, connect timeout
            problem, unreachable = str(exc.reason), True
        except (http.client.HTTPException, OSError) as exc:  # connection lost part-way
            problem, unreachable = f"connection lost: {exc!r}", False
        else:
            try:
                _check_md5(url, md5, actual)
            except PipelineError:
                part.unlink()
                raise
            os.replace(part, dest)
            return actual
    part.unlink(missing_ok=True)
    if unreachable:
        raise PipelineError(_unreachable_message(url, tries, problem))
    raise PipelineError(f"cannot download {url}: {problem} ({tries} tries). Try again later, or use a mirror")


# --- reading the archive --------------------------------------------------------------------------------------

# Everything the official pickles reference (numpy.core.* in the python 2 files, numpy._core.* when numpy 2
# writes them). Builtin dicts, lists, strings and ints come from opcodes, not globals.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch") from None


def load_pickle(data: bytes, name: str = "pickle") -> dict:
    """Unpickle a CIFAR-10 or CIFAR-100 file (python 2 pickle) without letting it import or call anything else."""
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # a hostile or corrupt pickle can fail in many ways; none is our bug
        raise PipelineError(f"{name}: not a valid CIFAR batch file: {exc}") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{name}: not a valid CIFAR batch file: holds a {type(obj).__name__}, not a dict")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in obj.items()}


def _batch_arrays(batch: dict, name: str, key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get("data"), batch.get(key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise PipelineError(f"{name}: 'data' is not a uint8 array of shape (N, 3072)")
    if not (isinstance(labels, list) and len(labels) == len(data) and all(isinstance(x, int) for x in labels)):
        raise PipelineError(f"{name}: '{key}' is not a list of {len(data)} integers")
    # Rows are 1024 red, then 1024 green, then 1024 blue values: to (N, 32, 32, 3) RGB.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.asarray(labels, dtype=np.int64)


def _safe_name(member: tarfile.TarInfo) -> str:
    """The member's normalised path; refuse absolute paths, '..' and links that lead outside the archive."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise PipelineError(f"archive member {name!r} has an absolute path: refusing a possibly hostile archive")
    if ".." in name.split("/"):
        raise PipelineError(f"archive member {name!r} contains '..': refusing a possibly hostile archive")
    if member.issym() or member.islnk():
        link = member.linkname
        # A symlink is relative to its own folder, a hard link to the archive root.
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), link) if member.issym() else link)
        if link.startswith("/") or target == ".." or target.startswith("../"):
            raise PipelineError(
                f"archive member {name!r} links to {link!r}, outside the archive: refusing a possibly hostile archive"
            )
    return posixpath.normpath(name)


def _is_data_file(name: str) -> bool:
    base = posixpath.basename(name)
    return base in (*PICKLE_TRAIN, PICKLE_TEST, PICKLE_META, *CIFAR100_FILES) or base.lower().endswith(IMAGE_SUFFIXES)


@dataclass
class Members:
    files: dict[str, bytes]  # the contents of every file that may hold data, by normalised path
    folders: set[str]  # every folder in the archive, listed or implied by a file's path
    others: list[str]  # the other files (skipped)


def read_members(path: Path) -> Members:
    """What the archive holds, read in one pass without extracting anything."""
    members = Members({}, set(), [])
    try:
        # Stream mode: one sequential pass over the gzip data, no extraction to disk.
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                name = _safe_name(member)
                parent = posixpath.dirname(name)
                while parent:
                    members.folders.add(parent)
                    parent = posixpath.dirname(parent)
                if member.isdir():
                    members.folders.add(name)
                    continue
                if not _is_data_file(name):
                    members.others.append(name)
                    continue
                if member.issym() or member.islnk():
                    raise PipelineError(f"archive member {name!r} is a link: the archive must hold the file itself")
                if member.isfile():
                    members.files[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise PipelineError(f"{path} is not a readable .tar.gz archive (truncated or corrupt?): {exc}") from None
    return members


@dataclass
class Dataset:
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # 'train' and 'test': (uint8 (N, 32, 32, 3), int64 (N,))
    classes: list[str]  # label i is classes[i]
    layout: str  # pickle | cifar100 | image_folder
    converted: int = 0  # image_folder: images resized or converted to 32x32 RGB
    skipped: list[str] = field(default_factory=list)  # image_folder: files that are not PNG or JPEG


def _label_names(meta: dict, key: str, name: str) -> list[str]:
    names = meta.get(key)
    decoded = [x.decode() if isinstance(x, bytes) else x for x in names] if isinstance(names, list) else None
    if not decoded or not all(isinstance(x, str) for x in decoded):
        raise PipelineError(f"{name}: no list of class names under {key!r}")
    return decoded


def _check_labels(splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], where: str) -> None:
    for split, (_, labels) in splits.items():
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise PipelineError(f"{split} labels outside 0..{len(classes) - 1} in the archive's {where}")


def _one_folder(names: list[str], what: str) -> str:
    folders = sorted({posixpath.dirname(name) for name in names})
    if len(folders) > 1:
        raise PipelineError(f"{what} files in several folders of the archive: {', '.join(folders)}")
    return folders[0]


def _read_pickle_layout(files: dict[str, bytes], batch_names: list[str]) -> Dataset:
    folder = _one_folder(batch_names, "CIFAR-10 batch")
    missing = [b for b in (*PICKLE_TRAIN, PICKLE_TEST) if posixpath.join(folder, b) not in files]
    if missing:
        raise PipelineError(f"the archive's {folder or '.'}/ lacks {', '.join(missing)}: incomplete CIFAR-10 archive")
    meta_name = posixpath.join(folder, PICKLE_META)
    if meta_name in files:
        decoded = _label_names(load_pickle(files[meta_name], meta_name), "label_names", meta_name)
        if decoded != list(CLASSES):
            raise PipelineError(f"{meta_name}: label_names {decoded} are not the CIFAR-10 classes {list(CLASSES)}")

    def read(batches: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        arrays = [_batch_arrays(load_pickle(files[n], n), n) for n in (posixpath.join(folder, b) for b in batches)]
        return np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays])

    splits = {"train": read(PICKLE_TRAIN), "test": read((PICKLE_TEST,))}
    _check_labels(splits, list(CLASSES), f"{folder or '.'}/")
    return Dataset(splits, list(CLASSES), "pickle")


def _read_cifar100(files: dict[str, bytes], names: list[str], labels: str) -> Dataset:
    """The official CIFAR-100 python archive: cifar-100-python/{train,test,meta}, fine (100) or coarse (20) labels."""
    folder = _one_folder(names, "CIFAR-100")
    missing = [b for b in CIFAR100_FILES if posixpath.join(folder, b) not in files]
    if missing:
        raise PipelineError(f"the archive's {folder or '.'}/ lacks {', '.join(missing)}: incomplete CIFAR-100 archive")
    meta_name = posixpath.join(folder, "meta")
    classes = _label_names(load_pickle(files[meta_name], meta_name), f"{labels}_label_names", meta_name)
    splits = {}
    for split in SPLITS:
        name = posixpath.join(folder, split)
        splits[split] = _batch_arrays(load_pickle(files[name], name), name, key=f"{labels}_labels")
    _check_labels(splits, classes, f"{folder or '.'}/")
    return Dataset(splits, classes, "cifar100")


def _decode_image(name: str, data: bytes) -> tuple[np.ndarray, bool]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_model_input(image)
    except Image.DecompressionBombError:
        raise PipelineError(f"{name}: too large to decode safely (over Pillow's pixel limit)") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{name}: cannot decode the image: {exc}") from None


def _read_image_folder(members: Members, image_names: list[str]) -> Dataset:
    tops = sorted({"/".join(name.split("/")[:-3]) for name in image_names})
    if len(tops) > 1:
        shown = ", ".join(t or "(archive root)" for t in tops)
        raise PipelineError(f"train/ and test/ images under several top-level folders of the archive: {shown}")
    top = tops[0]

    def at(*parts: str) -> str:
        return posixpath.join(top, *parts)

    # The class folders, empty ones included: every folder right under train/ and test/.
    folders = {
        split: sorted(posixpath.basename(f) for f in members.folders if posixpath.dirname(f) == at(split))
        for split in SPLITS
    }
    for split in SPLITS:
        if not folders[split]:
            raise PipelineError(f"the archive has no {at(split)}/<class>/ folders: both train/ and test/ are needed")
    if folders["train"] != folders["test"]:
        only_train = sorted(set(folders["train"]) - set(folders["test"]))
        only_test = sorted(set(folders["test"]) - set(folders["train"]))
        raise PipelineError(
            "train/ and test/ must hold the same class folders: "
            + "; ".join(
                f"only in {where}/: {', '.join(names)}"
                for where, names in (("train", only_train), ("test", only_test))
                if names
            )
        )
    classes = folders["train"]
    if len(classes) < 2:
        raise PipelineError(f"an image-folder archive needs at least 2 class folders; {at('train')}/ has {classes}")
    by_split: dict[str, list[tuple[int, str, str]]] = {split: [] for split in SPLITS}
    for name in image_names:
        split, cls, base = name.split("/")[-3:]
        by_split[split].append((classes.index(cls), base, name))
    empty = [
        at(split, cls)
        for split in SPLITS
        for label, cls in enumerate(classes)
        if not any(entry[0] == label for entry in by_split[split])
    ]
    if empty:
        raise PipelineError(f"class folders without a PNG or JPEG image: {', '.join(f + '/' for f in empty)}")
    splits, converted = {}, 0
    for split, entries in by_split.items():
        entries.sort()  # by class, then file name: a stable order across machines
        images = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
        for i, (_, _, name) in enumerate(entries):
            images[i], changed = _decode_image(name, members.files[name])
            converted += changed
        splits[split] = images, np.array([label for label, _, _ in entries], dtype=np.int64)
    # Files inside the class folders that are not PNG or JPEG (notes, .DS_Store, other formats) are skipped.
    skipped = sorted(n for n in members.others if n.startswith(tuple(at(split, "") for split in SPLITS)))
    return Dataset(splits, classes, "image_folder", converted, skipped)


def read_archive(path: Path, labels: str = "fine") -> Dataset:
    """The dataset in a .tar.gz of any supported layout (module docstring). `labels` picks CIFAR-100's fine or coarse
    labels; the other layouts have one kind only."""
    members = read_members(path)
    files = members.files
    batch_names = [n for n in files if posixpath.basename(n) in (*PICKLE_TRAIN, PICKLE_TEST)]
    image_names = [
        n
        for n in files
        if n.lower().endswith(IMAGE_SUFFIXES) and len(n.split("/")) in (3, 4) and n.split("/")[-3] in SPLITS
    ]
    cifar100_names = [n for n in files if posixpath.basename(n) in CIFAR100_FILES and n.split("/")[-2:-1] != ["train"]]
    if labels not in CIFAR100_LABELS:
        raise PipelineError(f"data.labels = {labels!r}: expected one of {', '.join(CIFAR100_LABELS)}")
    found = [
        kind
        for kind, names in (
            ("CIFAR-10 pickle batches", batch_names),
            ("CIFAR-100 files", cifar100_names),
            ("train/test image folders", image_names),
        )
        if names
    ]
    if len(found) > 1:
        raise PipelineError(f"{path} holds {' and '.join(found)}: ambiguous")
    if labels != "fine" and not cifar100_names:
        raise PipelineError(f"data.labels = {labels!r} applies to the CIFAR-100 archive only; this one has one kind")
    if batch_names:
        return _read_pickle_layout(files, batch_names)
    if cifar100_names:
        return _read_cifar100(files, cifar100_names, labels)
    if image_names:
        return _read_image_folder(members, image_names)
    shown = ", ".join(sorted(files)[:5]) or "no data files"
    raise PipelineError(
        f"{path} is not a dataset archive this pipeline reads: expected cifar-10-batches-py/data_batch_1..5 + "
        f"test_batch, cifar-100-python/train + test + meta, or [top-dir/]train/<class>/*.png|jpg and "
        f"test/<class>/*.png|jpg (found: {shown})"
    )


# --- the stage ------------------------------------------------------------------------------------------------


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez, byte for byte the same for the same arrays: np.savez stamps each member with the current time.
    Uncompressed, so loading is fast; np.load reads it as any npz."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(member, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def _write_output(out_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
    """Write the whole folder beside `out_dir`, then rename it into place: never half an output."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for split, (images, labels) in splits.items():
            save_npz(tmp / f"{split}.npz", images=images, labels=labels)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def download(
    url: str,
    md5: str | None,
    out_dir: Path = DATA_DIR,
    *,
    labels: str = "fine",
    root: Path = Path("."),
    tries: int = 3,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> dict:
    """Fetch and check the archive named by `url`, write `out_dir`/{train,test}.npz and meta.json; return the meta.
    `labels`: CIFAR-100's fine or coarse labels (data.labels).

    A local path (relative to `root`) or file:// URL is read in place; an http(s) download goes to a scratch
    folder beside `out_dir` that is removed afterwards.
    """
    out_dir = Path(out_dir)
    scratch = out_dir.with_name(f".{out_dir.name}.download")
    shutil.rmtree(scratch, ignore_errors=True)  # a killed earlier run's .part is never reused
    try:
        path = local_source(url, Path(root))
        if path is None:
            scratch.mkdir(parents=True)
            name = posixpath.basename(urllib.parse.urlparse(url).path) or "archive.tar.gz"
            path = scratch / name
            actual = download_url(url, md5, path, tries=tries, backoff_s=backoff_s, timeout_s=timeout_s)
        else:
            if not path.is_file():
                raise PipelineError(
                    f"data.url = {url!r}: {path} does not exist. Give a path relative to the project root "
                    f"(e.g. {SHARED_COPY_HINT}), a file:// URL, or an http(s) URL"
                )
            actual = _md5(path)
            _check_md5(str(path), md5, actual)
        dataset = read_archive(path, labels)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    classes, splits = dataset.classes, dataset.splits
    meta = {
        "classes": classes,
        "layout": dataset.layout,
        "source": url,
        "md5": actual,
        "counts": {split: int(len(y)) for split, (_, y) in splits.items()},
        "class_counts": {
            split: {cls: int(n) for cls, n in zip(classes, np.bincount(y, minlength=len(classes)), strict=True)}
            for split, (_, y) in splits.items()
        },
    }
    if dataset.layout == "cifar100":
        meta["labels"] = labels
    if dataset.layout == "image_folder":
        meta["converted_to_32x32_rgb"] = dataset.converted
        meta["skipped_files"] = dataset.skipped
    _write_output(out_dir, splits, meta)
    return meta
