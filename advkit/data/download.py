"""Checked, atomic downloads of dataset files.

A download goes to a temporary file beside its destination, its md5 is checked, and only
then is it moved into place (:func:`advkit._files.atomic_path`: atomic on one file system). An
interrupted or corrupt transfer therefore never leaves a half-written file where a later
load would trust it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from advkit._files import atomic_path

__all__ = [
    "MIRROR_ENV",
    "ChecksumError",
    "DownloadError",
    "download",
    "file_md5",
    "resolve_url",
    "verify_md5",
]

MIRROR_ENV = "ADVKIT_DATA_MIRROR"
"""Environment variable holding a base URL that replaces the canonical download locations."""

_CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A download failed (network error, dropped connection or md5 mismatch).

    Nothing is left at the destination when this is raised.
    """


class ChecksumError(RuntimeError):
    """A file already on disk does not have the expected md5."""


def file_md5(path: str | Path) -> str:
    """Return the hex md5 digest of the file at ``path``."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str | Path, md5: str, *, fix: str | None = None) -> Path:
    """Check that the file at ``path`` has the md5 ``md5`` and return its path.

    Args:
        path: the file to check.
        md5: the expected hex digest.
        fix: what the user should do on a mismatch; the default suggests deleting the file
            so that it is fetched again. The file itself is never deleted here.

    Raises:
        ChecksumError: the digests differ.
    """
    path = Path(path)
    got = file_md5(path)
    if got != md5.lower():
        hint = fix or f"delete it (rm '{path}') and load again to download a fresh copy"
        raise ChecksumError(
            f"{path} is corrupt or not the expected file: md5 expected {md5.lower()}, "
            f"got {got}; {hint}"
        )
    return path


def resolve_url(canonical_url: str, relative_path: str) -> str:
    """Return where to fetch a file: the canonical URL, or the mirror when one is set.

    A mirror (environment variable ``ADVKIT_DATA_MIRROR``) is a base URL laid out like the
    data directory, so ``<mirror>/<relative_path>`` (e.g. ``<mirror>/fashion-mnist/
    t10k-images-idx3-ubyte.gz``) is fetched instead of ``canonical_url``. Any data
    directory served over HTTP is therefore a valid mirror.
    """
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return canonical_url
    return f"{mirror.rstrip('/')}/{relative_path.lstrip('/')}"


def download(
    url: str,
    dest: str | Path,
    md5: str,
    *,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download ``url`` to ``dest``, check its md5, and move it into place atomically.

    The bytes go to a temporary file in ``dest``'s directory; only a complete transfer with
    the right md5 replaces ``dest``. On any failure, including Ctrl-C, the temporary file is
    removed and ``dest`` is left untouched.

    Args:
        url: an ``http://`` or ``https://`` URL.
        dest: the destination file; its parent directories are created.
        md5: the expected hex md5 of the whole file.
        progress: show a rich progress bar on stderr.
        timeout: seconds to wait for the connection and for each read.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        DownloadError: the transfer failed or the file had the wrong md5.
        ValueError: the URL scheme is not http or https.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"download URL must be http:// or https:// (got {url!r})")
    dest = Path(dest)
    try:
        with atomic_path(dest) as tmp:
            with open(tmp, "wb") as out:
                got = _fetch(url, out, progress=progress, timeout=timeout, label=dest.name)
            if got != md5.lower():
                raise DownloadError(
                    f"md5 mismatch for {url}: expected {md5.lower()}, got {got}; nothing was "
                    f"written to {dest}. The server sent a different file: retry, check that "
                    f"{MIRROR_ENV} (if set) points at a faithful mirror, or place a verified "
                    f"copy at {dest} yourself."
                )
    except BaseException as exc:
        if isinstance(exc, DownloadError) or not isinstance(exc, Exception):
            raise
        raise DownloadError(
            f"download of {url} failed: {_describe(exc)}; nothing was written to {dest}. "
            f"Check the network and retry, set {MIRROR_ENV} to a reachable mirror, or "
            f"place the file at {dest} yourself."
        ) from exc
    return dest


def _describe(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect ({exc.reason})"
    if isinstance(exc, ConnectionError):
        return str(exc)
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection dropped before the whole file arrived ({exc!r})"
    return f"{type(exc).__name__}: {exc}"


def _fetch(url: str, out: BinaryIO, *, progress: bool, timeout: float, label: str) -> str:
    """Stream ``url`` into ``out`` and return the md5 of what was received."""
    digest = hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(url, headers={"User-Agent": "advkit"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with _progress_bar(label, total, enabled=progress) as advance:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                advance(len(chunk))
    # http.client usually raises IncompleteRead itself; this also covers servers that close
    # early in ways it does not notice.
    if total is not None and received != total:
        raise ConnectionError(f"connection dropped after {received} of {total} bytes")
    return digest.hexdigest()


@contextmanager
def _progress_bar(
    label: str, total: int | None, *, enabled: bool
) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(f"downloading {label}", total=total)
        yield lambda n: bar.advance(task, n)
