"""Bring-your-own data: image folders (one sub-folder per class) and ``.npz`` arrays.

Both return the library's image contract: float32 (N, C, H, W) in [0, 1] and int64 labels.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "load_image_folder", "load_npz"]

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})
"""File suffixes (case-insensitive) read by :func:`load_image_folder`; others are skipped."""


def load_image_folder(
    path: str | Path,
    *,
    size: tuple[int, int] | None = None,
    grayscale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load a folder with one sub-folder of PNG/JPEG images per class.

    Class ids follow the sorted sub-folder names; images are read in sorted file-name
    order, class after class. Hidden entries (names starting with ``.``) and files with
    other suffixes are skipped.

    Args:
        path: the folder holding the class sub-folders.
        size: ``(height, width)`` to resize every image to (bilinear). Without it all
            images must already share one size.
        grayscale: convert to one channel instead of RGB.

    Returns:
        ``(x, y, classes)``: float32 images (N, C, H, W) in [0, 1] with C = 1 or 3, int64
        labels (N,), and the class names (sub-folder names) indexed by label.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotADirectoryError: ``path`` is a file.
        ValueError: no class folders, a class without images, an unreadable image, or
            mixed sizes without ``size``; the message names the folder or file.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file; pass a folder with one sub-folder per class")
    if size is not None:
        if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
            raise ValueError(f"size must be (height, width) with positive ints (got {size!r})")
        size = (int(size[0]), int(size[1]))
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{root} has no class sub-folders; put each class's images in its own "
            f"sub-folder, e.g. {root / 'cat'}/0001.png"
        )
    mode = "L" if grayscale else "RGB"
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    first: tuple[Path, tuple[int, int]] | None = None
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ValueError(
                f"class folder {root / name} has no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove the folder"
            )
        for file in files:
            array = _read_image(file, mode, size)
            shape = array.shape[:2]
            if first is None:
                first = (file, shape)
            elif shape != first[1]:
                raise ValueError(
                    f"images differ in size: {file} is {shape[0]}x{shape[1]} but {first[0]} "
                    f"is {first[1][0]}x{first[1][1]} (height x width); pass "
                    "size=(height, width) to resize them all"
                )
            arrays.append(array)
            labels.append(label)
    stacked = np.stack(arrays)
    if stacked.ndim == 3:  # grayscale: (N, H, W)
        stacked = stacked[:, None]
    else:
        stacked = stacked.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(stacked)).to(torch.float32).div_(255.0)
    return x, torch.tensor(labels, dtype=torch.int64), classes


def _read_image(file: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    try:
        with Image.open(file) as img:
            img = img.convert(mode)  # also forces the full decode, so truncation shows here
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {file}: {exc}; fix or remove the file") from exc


def load_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load images and labels from a ``.npz`` file holding arrays ``x`` and ``y``.

    ``x`` may be uint8 (0..255, divided by 255) or floating point in [0, 1], laid out
    (N, C, H, W), (N, H, W, C) or (N, H, W). The layout is detected from the channel
    size: (N, C, H, W) when dimension 1 is 1 or 3, else (N, H, W, C) when dimension 3 is.
    ``y`` holds integer class ids, one per image. The file is read with
    ``allow_pickle=False``, so it cannot run code.

    Returns:
        ``(x, y)``: float32 images (N, C, H, W) in [0, 1] and int64 labels (N,).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: missing arrays, object arrays, wrong shapes or dtypes, NaN/inf or
            values outside [0, 1], negative labels, or a length mismatch.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        # numpy reports any file without the npy/npz magic as "needs pickle".
        raise ValueError(f"{path} is not a readable .npz file ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} holds a single array, not an .npz archive; save with "
            "np.savez(path, x=images, y=labels)"
        )
    with archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise ValueError(
                f"{path} lacks array(s) {', '.join(missing)} (found: "
                f"{', '.join(archive.files) or 'none'}); save with "
                "np.savez(path, x=images, y=labels)"
            )
        try:
            x, y = archive["x"], archive["y"]
        except ValueError as exc:
            raise ValueError(
                f"{path} holds object arrays, which need pickle and are refused; save plain "
                "numeric arrays instead"
            ) from exc
    return _images_to_tensor(x, path), _labels_to_tensor(y, len(x), path)


def _images_to_tensor(x: np.ndarray, path: Path) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3):
            if x.shape[3] not in (1, 3):
                raise ValueError(
                    f"{path}: x of shape {x.shape} has no channel dimension of size 1 or 3; "
                    "expected (N, C, H, W) or (N, H, W, C)"
                )
            x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            f"{path}: x must have 3 or 4 dimensions, (N, H, W), (N, C, H, W) or "
            f"(N, H, W, C) (got {x.ndim}, shape {x.shape})"
        )
    if len(x) == 0:
        raise ValueError(f"{path}: x holds no images")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"{path}: x must be uint8 (0..255) or float in [0, 1] (got {x.dtype}); convert "
            "with x.astype(np.uint8) or x.astype(np.float32) / 255"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: x holds {int((~np.isfinite(x)).sum())} NaN or inf values")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        hint = "; divide by 255 if it is on a 0..255 scale" if high > 1.0 else ""
        raise ValueError(f"{path}: x must lie in [0, 1] (got {low:g}..{high:g}){hint}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _labels_to_tensor(y: np.ndarray, n: int, path: Path) -> torch.Tensor:
    if y.ndim != 1:
        hint = "; for one-hot labels save y.argmax(1)" if y.ndim == 2 else ""
        raise ValueError(f"{path}: y must be 1-D class ids (got shape {y.shape}){hint}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: y must hold integer class ids (got {y.dtype})")
    if len(y) != n:
        raise ValueError(f"{path}: x has {n} images but y has {len(y)} labels")
    if y.min() < 0:
        raise ValueError(f"{path}: class ids must be >= 0 (got {y.min()})")
    return torch.from_numpy(y.astype(np.int64))
