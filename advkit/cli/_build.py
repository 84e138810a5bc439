"""Attacks built from command-line options (``advkit attack`` and ``advkit evaluate``)."""

from __future__ import annotations

import inspect
import math

from advkit import attacks as attack_lib
from advkit.threat import ThreatModel


def _options_for(classes: list[type[attack_lib.Attack]],
                 options: dict[str, object]) -> list[dict[str, object]]:
    """Each given option goes to the attacks that take it; one none of them takes is an
    error (a typo, or the wrong attack)."""
    accepted = [inspect.signature(cls.__init__).parameters for cls in classes]
    given = {k: v for k, v in options.items() if v is not None}
    unused = [k for k in given if not any(k in params for params in accepted)]
    if unused:
        shown = list(dict.fromkeys(cls.__name__ for cls in classes))
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ValueError(f"{', '.join(shown)} take{'s' if len(shown) == 1 else ''} "
                         f"no option {flags}")
    return [{k: v for k, v in given.items() if k in params} for params in accepted]


def build_attacks(names: list[str], norm: str, eps_list: list[float],
                  **options: object) -> list[attack_lib.Attack]:
    """One budgeted attack per name and eps; one uncapped run per minimal-norm attack
    (its curve gives every eps)."""
    classes = [attack_lib.get(name) for name in names]
    return [cls(ThreatModel(norm=norm, eps=eps), **opts)
            for cls, opts in zip(classes, _options_for(classes, options), strict=True)
            for eps in ([math.inf] if cls.kind == "minimal" else eps_list)]


def build_attack(name: str, norm: str, eps: float | None,
                 **options: object) -> attack_lib.Attack:
    """One attack; no eps means 0.3 for a budgeted attack and no cap for a minimal-norm one."""
    cls = attack_lib.get(name)
    if eps is None:
        eps = math.inf if cls.kind == "minimal" else 0.3
    return cls(ThreatModel(norm=norm, eps=eps), **_options_for([cls], options)[0])
