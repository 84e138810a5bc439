"""Atomic file writes: a reader finds the old file or the new one, never half of one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; on a clean exit its file replaces ``path``.

    Write the temporary file with anything that takes a file name (``torch.save``,
    safetensors' ``save_file``, ``open``). It is flushed to disk and then renamed over
    ``path``: in the same directory, so the rename never crosses file systems and stays
    atomic. On an error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name, created exclusively: concurrent writers of one path never share a
    # temporary file. Mode 0o666 lets the umask set the permissions, as for a plain open();
    # tempfile's private 0o600 would carry over to the final file.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        # Flushed before the rename: after a crash the new name never points at a file
        # whose contents had not reached the disk.
        descriptor = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8 with ``\\n`` line ends) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(data)
        else:
            tmp.write_bytes(data)
    return Path(path)
