"""Headless Chromium for the tests that check what a person sees (Debian's `chromium`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str:
    """The browser binary; skip without one, except in CI (CI=true), where that fails."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        reason = "chromium is not installed; run scripts/install_chromium.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the browser rendering test must run in CI)")
        pytest.skip(reason)
    return binary


def run_chromium(page: Path | str, profile: Path, *arguments: str,
                 window: tuple[int, int] = (1280, 2000)) -> subprocess.CompletedProcess:
    """Open ``page`` (a file, or a URL) headless with ``arguments`` (``--screenshot=...``,
    ``--dump-dom``)."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={window[0]},{window[1]}", *arguments,
               page.as_uri() if isinstance(page, Path) else page]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
