"""Datasets for advkit: every loader returns float32 images (N, C, H, W) in [0, 1] and int64
labels, the library's model contract.

- :func:`load` reads a named dataset: ``"mnist"`` (shipped inside the package, works
  offline), ``"fashion-mnist"``, ``"cifar10"`` (from the data directory or downloaded with
  md5 checks) and ``"cifar10-jpeg-lossy"`` (a lossy copy for smoke tests only).
- :func:`load_image_folder` and :func:`load_npz` read your own data.
- :func:`download` is the checked, atomic downloader the loaders use.

Example::

    from advkit import data
    x, y = data.load("mnist", split="test", limit=1000)   # (1000, 1, 28, 28), (1000,)
"""

from .arrays import load_image_folder, load_npz
from .datasets import (
    DATA_DIR_ENV,
    DATASETS,
    SPLITS,
    class_names,
    clear_cache,
    load,
    num_classes,
    resolve_data_dir,
)
from .download import MIRROR_ENV, ChecksumError, DownloadError, download

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "MIRROR_ENV",
    "SPLITS",
    "ChecksumError",
    "DownloadError",
    "class_names",
    "clear_cache",
    "download",
    "load",
    "load_image_folder",
    "load_npz",
    "num_classes",
    "resolve_data_dir",
]
