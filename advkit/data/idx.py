"""Reader for the IDX file format used by MNIST and Fashion-MNIST.

An IDX file is: two zero bytes, a type code, the number of dimensions ``d``, ``d``
big-endian uint32 sizes, then the values in row-major order, big-endian. See
http://yann.lecun.com/exdb/mnist/ (bottom of the page).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

__all__ = ["parse_idx", "read_idx"]

_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a writable, native-byte-order numpy array.

    Args:
        data: the uncompressed file content.
        source: a name for the data, used in error messages.

    Raises:
        ValueError: the header is malformed or the size does not match it.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source} is not an IDX file (bad magic {data[:4].hex() or 'empty'})")
    code, ndim = data[2], data[3]
    if code not in _TYPES:
        raise ValueError(f"{source} has unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source} is truncated inside its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _TYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{source} has {len(data)} bytes but its IDX header (shape {shape}, "
            f"{dtype.name}) implies {expected}; the file is truncated or corrupt"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    # frombuffer views the (read-only) bytes; a native-order copy is safe to hand to torch.
    return values.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed (``.gz``, detected by content) or not.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid gzip or IDX; the message names the file.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path} is not a valid gzip file ({exc})") from exc
    return parse_idx(data, source=str(path))
