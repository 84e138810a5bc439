"""Named datasets: MNIST (shipped in the package), Fashion-MNIST, CIFAR-10 and a lossy
JPEG copy of CIFAR-10 for smoke tests.

Every file is md5-checked before it is decoded. Decoded splits are cached in memory as
uint8 tensors, so repeated loads only pay for the float conversion, and what a caller gets
back is always a fresh tensor that cannot alter the cache.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
import pickle
import tarfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .download import download as download_file
from .download import resolve_url, verify_md5
from .idx import read_idx

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "MD5S",
    "SPLITS",
    "URLS",
    "class_names",
    "clear_cache",
    "load",
    "num_classes",
    "resolve_data_dir",
]

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "cifar10-jpeg-lossy")
"""Names accepted by :func:`load` (``_`` may be written for ``-``, case is ignored)."""

SPLITS: tuple[str, ...] = ("train", "test")

DATA_DIR_ENV = "ADVKIT_DATA_DIR"
"""Environment variable naming the data directory when ``data_dir`` is not given."""

_PACKAGE_DIR = Path(__file__).resolve().parent  # holds mnist/, laid out like a data dir

_CLASSES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
}  # fmt: skip
_CLASSES["cifar10-jpeg-lossy"] = _CLASSES["cifar10"]

URLS: dict[str, str] = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}
"""Canonical base URL of each downloadable dataset (``ADVKIT_DATA_MIRROR`` overrides)."""

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CIFAR_TAR = "cifar10/cifar-10-python.tar.gz"
_CIFAR_FOLDER = "cifar-10-batches-py"  # the folder inside the tarball
_CIFAR_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_LOSSY_ZIP = "cifar10-jpeg-lossy/cifar10_yoongikim_jpeg_q75.zip"

MD5S: dict[str, str] = {
    "mnist/train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "mnist/train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "mnist/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "mnist/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "fashion-mnist/train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    _CIFAR_TAR: "c58f30108f718f92721af3b95e74349a",
    f"cifar10/{_CIFAR_FOLDER}/data_batch_1": "c99cafc152244af753f735de768cd75f",
    f"cifar10/{_CIFAR_FOLDER}/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    f"cifar10/{_CIFAR_FOLDER}/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    f"cifar10/{_CIFAR_FOLDER}/data_batch_4": "634d18415352ddfa80567beed471001a",
    f"cifar10/{_CIFAR_FOLDER}/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    f"cifar10/{_CIFAR_FOLDER}/test_batch": "40351d587109b95175f43aff81a1287e",
    _LOSSY_ZIP: "54d84455567d40ea359757ce42859f9a",
}
"""Expected md5 of every file, keyed by its path inside the data directory (MNIST: inside
the package). Every file is checked against this table before use; tests inject entries
for the small files they generate."""

_MNIST_FIX = "the copy shipped inside advkit is damaged: reinstall advkit"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Return the data directory: ``data_dir`` if given, else ``$ADVKIT_DATA_DIR``, else
    ``~/.cache/advkit/data``. The directory is not created here."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "advkit" / "data"


def class_names(name: str) -> list[str]:
    """Return the class names of dataset ``name``, indexed by label id."""
    return list(_CLASSES[_canonical_name(name)])


def num_classes(name: str) -> int:
    """Return the number of classes of dataset ``name``."""
    return len(_CLASSES[_canonical_name(name)])


def load(
    name: str,
    split: str = "test",
    limit: int | None = None,
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset split as float images in [0, 1] and integer labels.

    Sources:
        - ``"mnist"``: the canonical files shipped inside advkit (``data_dir`` is ignored).
        - ``"fashion-mnist"`` (or ``"fashion_mnist"``):
          ``<data_dir>/fashion-mnist/<canonical .gz names>``, downloaded if missing.
        - ``"cifar10"``: ``<data_dir>/cifar10/cifar-10-batches-py/`` if that folder exists,
          else ``<data_dir>/cifar10/cifar-10-python.tar.gz``, downloaded if missing. The
          batches are pickles, read with an unpickler that only builds numpy arrays.
        - ``"cifar10-jpeg-lossy"``: ``<data_dir>/cifar10-jpeg-lossy/
          cifar10_yoongikim_jpeg_q75.zip``, never downloaded. It is a JPEG (quality 75)
          re-encoding whose pixel errors are as large as typical attack budgets, so it is
          for smoke tests and demos only; loading it emits a ``UserWarning``. Its images
          are interleaved by class (image k of every class in turn), so any prefix is
          balanced.

    Every file is md5-checked; a corrupt file raises
    :class:`~advkit.data.download.ChecksumError` naming it and is never deleted.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        limit: keep only the first ``limit`` samples (all of them if the split is smaller).
        data_dir: the data directory; default ``$ADVKIT_DATA_DIR``, else
            ``~/.cache/advkit/data``.
        download: fetch missing files from their canonical location, or from
            ``$ADVKIT_DATA_MIRROR`` (a base URL laid out like the data directory).

    Returns:
        ``(x, y)``: float32 images of shape (N, C, H, W) in [0, 1] ((N, 1, 28, 28) for the
        MNISTs, (N, 3, 32, 32) for CIFAR-10) and int64 labels of shape (N,). Both are new
        tensors; changing them does not affect later loads.

    Raises:
        ValueError: unknown ``name`` or ``split``, or ``limit < 1``.
        TypeError: ``limit`` is not an int.
        FileNotFoundError: a file is missing and cannot be downloaded.
        ChecksumError: a file on disk has the wrong md5.
        DownloadError: a download failed; nothing was left behind.
    """
    key = _canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise TypeError(f"limit must be an int or None (got {type(limit).__name__})")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None for the whole split (got {limit})")
    if key == "cifar10-jpeg-lossy":
        warnings.warn(
            "cifar10-jpeg-lossy is a LOSSY JPEG (quality 75) copy of CIFAR-10 whose pixel "
            "errors (mean 6/255, max 70/255) are as large as typical attack budgets: use "
            "it only for smoke tests and demos, never for reported accuracy or robustness",
            UserWarning,
            stacklevel=2,
        )
    root = _PACKAGE_DIR if key == "mnist" else resolve_data_dir(data_dir).resolve()
    images, labels = _load_split(key, split, str(root), download and key in URLS)
    end = len(labels) if limit is None else limit
    # The cache holds uint8; .to() and .clone() always return new storage.
    return images[:end].to(torch.float32).div_(255.0), labels[:end].clone()


def clear_cache() -> None:
    """Forget every decoded split, e.g. after files in the data directory changed."""
    _load_split.cache_clear()


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} "
            "(or load your own data with load_image_folder or load_npz)"
        )
    return key


@functools.lru_cache(maxsize=8)
def _load_split(key: str, split: str, root: str, download: bool) -> tuple[torch.Tensor, ...]:
    """Decode a whole split into (uint8 NCHW images, int64 labels), checking every file."""
    base = Path(root)
    if key in ("mnist", "fashion-mnist"):
        images, labels = _load_idx(base, key, split, download)
    elif key == "cifar10":
        images, labels = _load_cifar(base, split, download)
    else:
        images, labels = _load_jpeg_zip(base, split)
    _check_labels(labels, len(images), len(_CLASSES[key]), f"{key} {split}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _require(root: Path, relpath: str, *, download: bool, fix: str | None = None) -> Path:
    """Return ``root/relpath`` after an md5 check, downloading it first if allowed."""
    path = root / relpath
    md5 = MD5S[relpath]
    if path.is_file():
        return verify_md5(path, md5, fix=fix)
    dataset, _, filename = relpath.partition("/")
    if dataset == "mnist":
        raise FileNotFoundError(f"{path} is missing; {_MNIST_FIX}")
    if dataset not in URLS:
        raise FileNotFoundError(
            f"{path} not found; {dataset} is never downloaded: put {relpath} under the "
            f"data directory, or point data_dir= or ${DATA_DIR_ENV} at one that holds it"
        )
    url = resolve_url(URLS[dataset] + filename, relpath)
    if not download:
        raise FileNotFoundError(
            f"{path} not found; pass download=True to fetch it from {url}, or point "
            f"data_dir= or ${DATA_DIR_ENV} at a directory holding {relpath}"
        )
    return download_file(url, path, md5)


def _load_idx(root: Path, key: str, split: str, download: bool) -> tuple[np.ndarray, ...]:
    fix = _MNIST_FIX if key == "mnist" else None
    image_file, label_file = (f"{key}/{f}" for f in _IDX_FILES[split])
    images = read_idx(_require(root, image_file, download=download, fix=fix))
    labels = read_idx(_require(root, label_file, download=download, fix=fix))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{root / image_file} must hold uint8 images of shape (N, H, W) "
            f"(got {images.dtype} {images.shape})"
        )
    return images[:, None], labels


def _load_cifar(root: Path, split: str, download: bool) -> tuple[np.ndarray, ...]:
    names = _CIFAR_BATCHES[split]
    folder = root / "cifar10" / _CIFAR_FOLDER
    blobs: dict[str, bytes] = {}  # where each batch came from -> its bytes, in order
    if folder.is_dir():
        for name in names:
            relpath = f"cifar10/{_CIFAR_FOLDER}/{name}"
            if not (root / relpath).is_file():
                raise FileNotFoundError(
                    f"{root / relpath} not found in the extracted CIFAR-10 folder; restore "
                    f"it, or remove {folder} to read {root / _CIFAR_TAR} instead"
                )
            blobs[str(root / relpath)] = _require(root, relpath, download=False).read_bytes()
    else:
        tar_path = _require(root, _CIFAR_TAR, download=download)
        members = _read_tar_members(tar_path, names)
        blobs = {f"{tar_path}:{_CIFAR_FOLDER}/{name}": members[name] for name in names}
    batches = [_parse_cifar_batch(blob, source) for source, blob in blobs.items()]
    images = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[1] for b in batches])
    return images, labels


def _read_tar_members(tar_path: Path, names: Sequence[str]) -> dict[str, bytes]:
    """Read the named batch files from the tarball into memory, without extracting."""
    wanted = {f"{_CIFAR_FOLDER}/{name}": name for name in names}
    found: dict[str, bytes] = {}
    with tarfile.open(tar_path, "r:gz") as archive:
        for member in archive:
            if member.name in wanted and member.isfile():
                handle = archive.extractfile(member)
                assert handle is not None  # a regular file always has content
                found[wanted[member.name]] = handle.read()
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"{tar_path} lacks {', '.join(missing)} under {_CIFAR_FOLDER}/")
    return found


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    A pickle can call any importable function while it loads; CIFAR-10 batches need only
    numpy's array reconstruction, so every other global is refused before it is imported.
    """

    _RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, wherever it lives
    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, data: bytes, source: str) -> None:
        # encoding="bytes" keeps Python 2 strings (dict keys, array buffers) as bytes.
        super().__init__(io.BytesIO(data), encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from {self._source}: CIFAR-10 batches "
                "hold only numpy arrays, so this is not a genuine CIFAR-10 file; delete it "
                "and download the dataset again"
            ) from None


def _parse_cifar_batch(blob: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _NumpyOnlyUnpickler(blob, source).load()
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{source} is not a CIFAR-10 batch (no b'data' and b'labels' entries)")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise ValueError(f"{source}: b'data' must be a 2-D uint8 array")
    if data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{source}: rows must hold 3072 values (got {data.shape[1]})")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: b'labels' must be a list of integers")
    return data, labels


def _load_jpeg_zip(root: Path, split: str) -> tuple[np.ndarray, ...]:
    path = _require(root, _LOSSY_ZIP, download=False)
    classes = _CLASSES["cifar10"]
    per_class: dict[str, list[str]] = {c: [] for c in classes}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            parts = member.split("/")
            if len(parts) == 3 and parts[0] == split and parts[1] in per_class:
                per_class[parts[1]].append(member)
        columns = [sorted(per_class[c]) for c in classes]
        # Interleave the classes so that load(..., limit=n) is class-balanced.
        order = [
            (member, label)
            for row in itertools.zip_longest(*columns)
            for label, member in enumerate(row)
            if member is not None
        ]
        if not order:
            raise ValueError(f"{path} holds no {split}/<class>/*.jpg images")
        images = np.empty((len(order), 32, 32, 3), dtype=np.uint8)
        for i, (member, _) in enumerate(order):
            with Image.open(io.BytesIO(archive.read(member))) as img:
                if img.size != (32, 32):
                    raise ValueError(f"{path}:{member} is {img.size}, expected 32x32")
                images[i] = np.asarray(img.convert("RGB"))
    labels = np.array([label for _, label in order], dtype=np.int64)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


def _check_labels(labels: np.ndarray, n_images: int, n_classes: int, source: str) -> None:
    if labels.ndim != 1 or len(labels) != n_images:
        raise ValueError(
            f"{source}: {n_images} images but labels of shape {labels.shape}; "
            "the files do not belong together"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"{source}: labels must lie in [0, {n_classes - 1}] "
            f"(got {labels.min()}..{labels.max()})"
        )
