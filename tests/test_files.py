"""Atomic writes: a reader finds the old file or the new one, never half of one, and a
write leaves no temporary file behind."""

from __future__ import annotations

import os
import stat

import pytest

from advkit._files import atomic_path, atomic_write


def test_a_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "new-folder" / "card.json"
    atomic_write(path, "old")
    atomic_write(path, "new\n")
    assert path.read_bytes() == b"new\n"
    assert os.listdir(path.parent) == ["card.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "model.safetensors"
    atomic_write(path, b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_permissions_follow_the_umask_as_for_a_plain_open(tmp_path):
    plain = tmp_path / "plain.html"
    plain.write_text("x")
    written = atomic_write(tmp_path / "report.html", "x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
