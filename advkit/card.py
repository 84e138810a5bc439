"""Model cards: what a trained model is and how robust it measured, in one JSON file.

``advkit train`` writes one beside every checkpoint it installs
(``<name>.card.json``): recipe, data, seed, wall time, device, and clean and robust
accuracy under an evaluation suite with the verdicts of its masking checks (the
evaluation run is kept in the result store, so ``advkit report RUN`` shows the card
as a section of the run's report).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from advkit._files import atomic_write

CARD_FORMAT = "advkit-model-card"
CARD_VERSION = 1


def card_path(checkpoint: str | Path) -> Path:
    """Where the card of ``checkpoint`` lives: ``model.safetensors`` -> ``model.card.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".card.json")


def build_card(*, checkpoint: str | Path, metadata: dict, seconds: float, device: str,
               evaluation) -> dict:
    """The card of a trained model: its training record (checkpoint ``metadata``) and an
    :class:`~advkit.evaluation.EvaluationReport` of it."""
    config = metadata.get("config", {})
    recipe_params = config.get("recipe_params") or {}
    return {
        "format": CARD_FORMAT, "version": CARD_VERSION,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"checkpoint": str(checkpoint), "arch": metadata.get("architecture"),
                  "fingerprint": metadata.get("fingerprint")},
        "training": {"recipe": metadata.get("recipe", config.get("recipe")),
                     "recipe_params": recipe_params, "dataset": config.get("dataset"),
                     "train_limit": config.get("train_limit"), "epochs": config.get("epochs"),
                     "seed": config.get("seed"), "wall_seconds": round(seconds, 1),
                     "device": device, "metrics": metadata.get("metrics", {})},
        "evaluation": {
            "suite": evaluation.suite, "norm": evaluation.threat.norm,
            "eps": evaluation.threat.eps, "images": evaluation.n,
            "clean_accuracy": evaluation.clean_accuracy,
            "robust_accuracy": evaluation.robust_accuracy,
            "reliable": evaluation.reliable,
            "checks": {c.name: c.status for c in evaluation.checks},
            "run": evaluation.run_id, "store": evaluation.store,
        },
    }


def write_card(card: dict, path: str | Path) -> Path:
    """Write ``card`` as JSON, atomically (a reader never sees half a card)."""
    return atomic_write(path, json.dumps(card, indent=2) + "\n")


def read_card(path: str | Path) -> dict:
    """A card written by :func:`write_card`; a clear error for anything else."""
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable model card ({err})") from err
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{path} is not an advkit model card")
    return card


def card_rows(card: dict) -> list[dict[str, str]]:
    """The card flattened into (field, value) rows for a report table."""
    rows = []
    for section in ("model", "training", "evaluation"):
        for key, value in card.get(section, {}).items():
            if isinstance(value, float):
                value = f"{value:.2%}" if key.endswith("accuracy") else f"{value:g}"
            elif isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
            rows.append({"field": f"{section}: {key.replace('_', ' ')}", "value": str(value)})
    return rows
