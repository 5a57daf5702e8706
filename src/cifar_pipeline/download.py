"""The download stage: fetch the CIFAR-10 archive, check it, and write data/cifar10/{train,test}.npz + meta.json.

The archive may be a URL (official host or a mirror), a file:// URL or a local path. Its layout is detected
from its contents: the official python-pickle batches, or an image folder ([top/]train/<class>/*.png|jpg).
Members are read straight from the tar stream, never extracted, and pickles go through a restricted unpickler,
so a hostile archive can neither write outside data/ nor run code.

The output is a function of the archive alone: the same archive gives byte-identical files (the npz members carry a
fixed timestamp, and the stage's wall time goes to a file of its own), so rerunning the stage reruns nothing after it.
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
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cifar_pipeline.errors import PipelineError
from cifar_pipeline.paths import DATA_DIR

# The official label order: label i is CLASSES[i].
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

SHARED_COPY_HINT = "../shared/datasets/cifar10-jpeg.tar.gz"
PICKLE_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
PICKLE_TEST = "test_batch"
PICKLE_META = "batches.meta"
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
        # ~ too: a shell leaves it alone in `-S data.url=...`, and DVC's parser wants it quoted (README).
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
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch") from None


def load_pickle(data: bytes, name: str = "pickle") -> dict:
    """Unpickle a CIFAR-10 batch (python 2 pickle) without letting it import or call anything else."""
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # a hostile or corrupt pickle can fail in many ways; none is our bug
        raise PipelineError(f"{name}: not a valid CIFAR-10 batch file: {exc}") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{name}: not a valid CIFAR-10 batch file: holds a {type(obj).__name__}, not a dict")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in obj.items()}


def _batch_arrays(batch: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get("data"), batch.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise PipelineError(f"{name}: 'data' is not a uint8 array of shape (N, 3072)")
    if not (isinstance(labels, list) and len(labels) == len(data) and all(isinstance(x, int) for x in labels)):
        raise PipelineError(f"{name}: 'labels' is not a list of {len(data)} integers")
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
    return base in (*PICKLE_TRAIN, PICKLE_TEST, PICKLE_META) or base.lower().endswith(IMAGE_SUFFIXES)


def read_members(path: Path) -> dict[str, bytes]:
    """The contents of every file in the archive that may hold CIFAR-10 data, by normalised path."""
    files: dict[str, bytes] = {}
    try:
        # Stream mode: one sequential pass over the gzip data, no extraction to disk.
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                name = _safe_name(member)
                if not _is_data_file(name) or member.isdir():
                    continue
                if member.issym() or member.islnk():
                    raise PipelineError(f"archive member {name!r} is a link: the archive must hold the file itself")
                if member.isfile():
                    files[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise PipelineError(f"{path} is not a readable .tar.gz archive (truncated or corrupt?): {exc}") from None
    return files


def _read_pickle_layout(files: dict[str, bytes], batch_names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folders = sorted({posixpath.dirname(name) for name in batch_names})
    if len(folders) > 1:
        raise PipelineError(f"CIFAR-10 batch files in several folders of the archive: {', '.join(folders)}")
    folder = folders[0]
    missing = [b for b in (*PICKLE_TRAIN, PICKLE_TEST) if posixpath.join(folder, b) not in files]
    if missing:
        raise PipelineError(f"the archive's {folder or '.'}/ lacks {', '.join(missing)}: incomplete CIFAR-10 archive")
    meta_name = posixpath.join(folder, PICKLE_META)
    if meta_name in files:
        names = load_pickle(files[meta_name], meta_name).get("label_names")
        decoded = [x.decode() if isinstance(x, bytes) else x for x in names] if isinstance(names, list) else names
        if decoded != list(CLASSES):
            raise PipelineError(f"{meta_name}: label_names {decoded} are not the CIFAR-10 classes {list(CLASSES)}")

    def read(batches: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        arrays = [_batch_arrays(load_pickle(files[n], n), n) for n in (posixpath.join(folder, b) for b in batches)]
        return np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays])

    splits = {"train": read(PICKLE_TRAIN), "test": read((PICKLE_TEST,))}
    for split, (_, labels) in splits.items():
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise PipelineError(f"{split} labels outside 0..{len(CLASSES) - 1} in the archive's {folder or '.'}/")
    return splits


def _decode_image(name: str, data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            # Checked before decoding: a wrong size or mode is an error, never silently converted.
            if image.size != (32, 32) or image.mode != "RGB":
                raise PipelineError(
                    f"{name}: expected a 32x32 RGB image, got {image.size[0]}x{image.size[1]} {image.mode}"
                )
            return np.asarray(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{name}: cannot decode the image: {exc}") from None


def _read_image_folder(files: dict[str, bytes], image_names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tops = sorted({"/".join(name.split("/")[:-3]) for name in image_names})
    if len(tops) > 1:
        shown = ", ".join(t or "(archive root)" for t in tops)
        raise PipelineError(f"train/ and test/ images under several top-level folders of the archive: {shown}")
    by_split: dict[str, list[tuple[int, str, str]]] = {split: [] for split in SPLITS}
    unknown = set()
    for name in image_names:
        split, cls, base = name.split("/")[-3:]
        if cls not in CLASSES:
            unknown.add(f"{split}/{cls}")
            continue
        by_split[split].append((CLASSES.index(cls), base, name))
    if unknown:
        raise PipelineError(
            f"unknown class folders in the archive: {', '.join(sorted(unknown))}; expected {', '.join(CLASSES)}"
        )
    splits = {}
    for split, entries in by_split.items():
        if not entries:
            raise PipelineError(f"the archive has no {split}/<class>/ images: both train/ and test/ are needed")
        present = {label for label, _, _ in entries}
        missing = [cls for label, cls in enumerate(CLASSES) if label not in present]
        if missing:
            raise PipelineError(f"the archive's {split}/ has no images of class {', '.join(missing)}")
        entries.sort()  # by class (official order), then file name: a stable order across machines
        images = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
        for i, (_, _, name) in enumerate(entries):
            images[i] = _decode_image(name, files[name])
        splits[split] = images, np.array([label for label, _, _ in entries], dtype=np.int64)
    return splits


def read_archive(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """({'train': (images, labels), 'test': ...}, layout) from a CIFAR-10 .tar.gz of either layout."""
    files = read_members(path)
    batch_names = [n for n in files if posixpath.basename(n) in (*PICKLE_TRAIN, PICKLE_TEST)]
    image_names = [
        n
        for n in files
        if n.lower().endswith(IMAGE_SUFFIXES) and len(n.split("/")) in (3, 4) and n.split("/")[-3] in SPLITS
    ]
    if batch_names and image_names:
        raise PipelineError(f"{path} holds both CIFAR-10 pickle batches and train/test image folders: ambiguous")
    if batch_names:
        return _read_pickle_layout(files, batch_names), "pickle"
    if image_names:
        return _read_image_folder(files, image_names), "image_folder"
    shown = ", ".join(sorted(files)[:5]) or "no data files"
    raise PipelineError(
        f"{path} is not a CIFAR-10 archive: expected cifar-10-batches-py/data_batch_1..5 + test_batch, or "
        f"[top-dir/]train/<class>/*.png|jpg and test/<class>/*.png|jpg (found: {shown})"
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
    root: Path = Path("."),
    tries: int = 3,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> dict:
    """Fetch and check the archive named by `url`, write `out_dir`/{train,test}.npz and meta.json; return the meta.

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
        splits, layout = read_archive(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    meta = {
        "classes": list(CLASSES),
        "layout": layout,
        "source": url,
        "md5": actual,
        "counts": {split: int(len(labels)) for split, (_, labels) in splits.items()},
        "class_counts": {
            split: {cls: int(n) for cls, n in zip(CLASSES, np.bincount(labels, minlength=len(CLASSES)), strict=True)}
            for split, (_, labels) in splits.items()
        },
    }
    _write_output(out_dir, splits, meta)
    return meta
