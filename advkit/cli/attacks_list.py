"""``advkit attacks``: every attack with the model access it needs, its taxonomy tags, norms
and paper."""

from __future__ import annotations

from advkit import attacks as attack_lib
from advkit.cli._common import JsonOpt, print_json, print_rows


def list_attacks(as_json: JsonOpt = False) -> None:
    """List every attack with the model access it needs (gradients, scores or labels), its
    taxonomy tags, norms and paper."""
    rows = []
    for _, cls in sorted(attack_lib.REGISTRY.items()):
        tags = cls.taxonomy
        rows.append({"attack": cls.name, "access": cls.access, "kind": cls.kind,
                     "norms": ",".join(cls.norms),
                     "falsification": tags.falsification, "knowledge": tags.knowledge,
                     "specificity": tags.specificity, "frequency": tags.frequency,
                     "scope": tags.scope, "perturbation": tags.perturbation,
                     "paper": cls.paper})
    if as_json:
        print_json(rows)
    else:
        print_rows(rows, "advkit attacks")
