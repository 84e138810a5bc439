"""Measurements kept beside the training run they measure.

A benchmark that trains a recipe and then measures it (``defenses.py``, ``smoothing.py``,
``certified_training.py``) keeps each row in a JSON file in the run's folder, under the key
of everything the row depends on (the weights' fingerprint, the images, the settings).
Rerunning the script to add one recipe then reuses the others' rows instead of measuring
them again, and the section says which rows were reused and when they were measured.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

from advkit._files import atomic_write


def now() -> str:
    """The local time, to the second, as the sections print it."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def reuse(path: Path, key: dict, log: Callable[[str], None]) -> dict | None:
    """The row kept at ``path`` under exactly ``key`` (marked ``reused``), or None when
    there is none, it was measured under another key, or the file is unreadable."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != key \
            or not isinstance(saved.get("row"), dict):
        return None
    log(f"reusing the measurement of {saved['row'].get('measured')} ({path})")
    return saved["row"] | {"reused": True}


def keep(path: Path, key: dict, row: dict) -> dict:
    """Write ``row`` under ``key`` at ``path`` (atomically); return it marked not reused."""
    atomic_write(path, json.dumps({"key": key, "row": row}, indent=1))
    return row | {"reused": False}
