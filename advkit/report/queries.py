"""Query efficiency for the report: how small a perturbation a query-based black-box attack
has found after each query budget (median norm versus queries), and optionally robust
accuracy at one eps versus queries.

The numbers come from attacks that record the norm reached at each budget of their
``checkpoints`` (HopSkipJump, Boundary, SimBA, NES, ZOO, Bandits: ``result.norms_at(q)``),
or from a benchmark that measured them itself.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from advkit.attacks.base import AttackResult

Points = Mapping[str, Sequence[tuple[int, float]]]


@dataclass(frozen=True, eq=False)
class QueryEfficiency:
    """Per attack, the median norm after each query budget (and, optionally, robust accuracy).

    An image with no adversarial example yet counts as infinitely far (``inf``), and the
    median is over every image, so it is itself ``inf`` (drawn as a gap) until at least
    half the images are broken: a median over the broken images alone would look better
    the fewer images an attack broke.

    Attributes:
        median_norm: attack name -> points ``(queries per image, median norm)``; the norm
            may be ``inf``.
        norm: the threat model's norm (``"l2"``, ``"linf"``...), for the axis label.
        robust_acc: attack name -> points ``(queries per image, robust accuracy in [0, 1]
            at eps)``; empty for none.
        eps: the budget of ``robust_acc`` (required with it).

    Raises:
        ValueError: on construction, if any field is malformed.
    """

    median_norm: Points
    norm: str
    robust_acc: Points = field(default_factory=dict)
    eps: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.norm, str) or not self.norm:
            raise ValueError(f"QueryEfficiency.norm must be a norm name such as 'l2' "
                             f"(got {self.norm!r})")
        if self.robust_acc and self.eps is None:
            raise ValueError("QueryEfficiency.robust_acc needs the eps it was measured at "
                             "(eps=...)")
        if self.eps is not None and not (isinstance(self.eps, numbers.Real)
                                         and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"QueryEfficiency.eps must be a finite number >= 0 "
                             f"(got {self.eps!r})")
        # Frozen: store sorted, checked copies (drawn as lines, so in query order).
        object.__setattr__(self, "median_norm", _points(self.median_norm, "median_norm",
                                                        fraction=False))
        object.__setattr__(self, "robust_acc", _points(self.robust_acc, "robust_acc",
                                                       fraction=True))
        if not self.median_norm:
            raise ValueError("QueryEfficiency.median_norm must hold at least one attack")

    @classmethod
    def from_results(cls, results: Sequence[AttackResult],
                     eps: float | None = None) -> QueryEfficiency | None:
        """The query efficiency of every result that recorded its norms per query budget.

        Args:
            results: attack results; those without ``checkpoints`` are left out.
            eps: also compute robust accuracy at this eps after each budget
                (``result.curve([eps], queries=q)``); None for none.

        Returns:
            None when no result recorded norms per budget (a white-box run), else one
            line per such result, named after its attack (with its eps when the attack
            is budgeted, so two runs at different eps stay apart). The median is
            ``torch.median`` over every image (the lower of the two middle values for an
            even count), ``inf`` included.
        """
        recorded = [r for r in results if r.checkpoints]
        if not recorded:
            return None
        norms = {r.threat.norm for r in recorded}
        median_norm: dict[str, list[tuple[int, float]]] = {}
        robust_acc: dict[str, list[tuple[int, float]]] = {}
        for r in recorded:
            name = r.attack if r.kind == "minimal" else f"{r.attack} (eps={r.threat.eps:g})"
            if len(norms) > 1:
                name += f" ({r.threat.norm})"
            median_norm[name] = [(q, r.norms_at(q).median().item()) for q in r.checkpoints]
            if eps is not None:
                robust_acc[name] = [(q, r.curve([eps], queries=q)[0][1])
                                    for q in r.checkpoints]
        return cls(median_norm, norms.pop() if len(norms) == 1 else "norm", robust_acc,
                   None if eps is None else float(eps))

    def as_dict(self) -> dict[str, object]:
        """JSON-ready values (``inf`` stays a float; the JSON writer maps it to null)."""
        return {"norm": self.norm, "eps": self.eps,
                "median_norm": {k: [list(p) for p in v] for k, v in self.median_norm.items()},
                "robust_acc": {k: [list(p) for p in v] for k, v in self.robust_acc.items()}}


def _points(curves: object, name: str, *, fraction: bool) -> dict[str, list[tuple[int, float]]]:
    if not isinstance(curves, Mapping):
        raise ValueError(f"QueryEfficiency.{name} must be a dict: attack name -> "
                         f"[(queries, value), ...] (got {type(curves).__name__})")
    checked = {}
    for attack, points in curves.items():
        where = f"QueryEfficiency.{name}[{attack!r}]"
        if not isinstance(attack, str):
            raise ValueError(f"QueryEfficiency.{name} keys must be attack names (got {attack!r})")
        if isinstance(points, str | bytes) or not isinstance(points, Sequence) or not points:
            raise ValueError(f"{where} must be a non-empty list of (queries, value) pairs "
                             f"(got {points!r})")
        pairs = []
        for point in points:
            if not isinstance(point, Sequence) or len(point) != 2:
                raise ValueError(f"{where} must hold (queries, value) pairs (got {point!r})")
            queries, value = point
            if isinstance(queries, bool) or not isinstance(queries, numbers.Integral) \
                    or queries < 1:
                raise ValueError(f"{where}: queries must be an integer >= 1 (got {queries!r})")
            value = value.item() if isinstance(value, torch.Tensor) else value
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or math.isnan(value) or value < 0:
                raise ValueError(f"{where}: values must be numbers >= 0 (got {value!r})")
            if fraction and value > 1:
                raise ValueError(f"{where}: robust accuracy must be a fraction in [0, 1] "
                                 f"(got {value!r}); divide percentages by 100")
            pairs.append((int(queries), float(value)))
        checked[attack] = sorted(pairs)
    return checked
