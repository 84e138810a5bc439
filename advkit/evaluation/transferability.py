"""The transferability matrix: for each crafting attack and source model, the success rate
on each target model of the examples crafted on the source.

A cell is judged on the images its target classifies correctly (so every cell reads as
"of the images this model gets right, the fraction the source's examples break"); the
diagonal is the white-box success. Examples are crafted once per (attack, source) and
judged by a fresh forward pass of every target. Leave-one-out ensembles (MEA) craft on
every model but the target, once per target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from advkit.attacks.base import Attack
from advkit.attacks.transfer import Transfer
from advkit.threat import ThreatModel

#: The source name of a leave-one-out ensemble's row.
OTHERS = "all others"


@dataclass
class TransferMatrix:
    """Success rates ``success[(attack, source)][target]`` in [0, 1] (NaN: not measured),
    with the number of images each target classifies correctly (``correct``) and the
    seconds each row's crafting took."""

    threat: ThreatModel
    models: list[str]
    success: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    n: int = 0

    def rate(self, attack: str, source: str, target: str) -> float:
        return self.success[(attack, source)].get(target, math.nan)

    def rows(self) -> list[dict[str, object]]:
        """One row per (attack, source): the success rate on each target (a column per
        model), the mean over the targets other than the source, and the crafting time."""
        rows = []
        for (attack, source), rates in self.success.items():
            others = [r for t, r in rates.items() if t != source and not math.isnan(r)]
            rows.append({"attack": attack, "source": source,
                         **{t: rates.get(t, math.nan) for t in self.models},
                         "transfer_rate": sum(others) / len(others) if others else math.nan,
                         "seconds": self.seconds[(attack, source)]})
        return rows

    def to_dict(self) -> dict[str, object]:
        return {"threat": {"norm": self.threat.norm, "eps": self.threat.eps},
                "models": self.models, "n": self.n, "correct": self.correct,
                "rows": self.rows()}


def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(part).argmax(1) for part in x.split(batch_size)])


def transferability_matrix(
    models: Mapping[str, nn.Module], x: Tensor, y: Tensor, threat: ThreatModel, *,
    sources: Mapping[str, Callable[[ThreatModel], Attack]],
    ensembles: Mapping[str, Callable[[ThreatModel, list[nn.Module]], Transfer]] | None = None,
    batch_size: int = 500, log: Callable[[str], None] | None = None,
) -> TransferMatrix:
    """Craft on each model with each attack, judge on every model.

    Args:
        models: name -> classifier (eval mode), all for the same task.
        x, y: the images and labels (every model sees the same ones).
        threat: the threat model of every attack.
        sources: attack name -> ``factory(threat)`` building a configured white-box attack
            (e.g. ``lambda t: PGD(t, steps=40, early_exit=False)``).
        ensembles: name -> ``factory(threat, surrogates)`` building a transfer attack on
            several models (e.g. ``lambda t, ms: MEA(t, ms)``), run leave-one-out: for each
            target, on all the other models (row source :data:`OTHERS`).
        batch_size: images per judging forward pass.
        log: called with one line per finished row.
    """
    if len(models) < 1:
        raise ValueError("models is empty: give at least one name -> model")
    if ensembles and len(models) < 2:
        raise ValueError("a leave-one-out ensemble needs at least two models")
    names = list(models)
    correct = {t: _predict(models[t], x, batch_size) == y for t in names}
    matrix = TransferMatrix(threat, names, correct={t: int(c.sum()) for t, c in correct.items()},
                            n=len(y))

    def judge(x_adv: Tensor, target: str) -> float:
        keep = correct[target]
        if not keep.any():
            return math.nan
        fooled = _predict(models[target], x_adv[keep], batch_size) != y[keep]
        return fooled.float().mean().item()

    for attack_name, factory in sources.items():
        for source in names:
            start = time.perf_counter()
            x_adv = Transfer(threat, [models[source]], factory(threat)).craft(x, y).x_adv
            matrix.seconds[(attack_name, source)] = time.perf_counter() - start
            matrix.success[(attack_name, source)] = {t: judge(x_adv, t) for t in names}
            if log:
                log(f"{attack_name} on {source}: {matrix.seconds[(attack_name, source)]:.1f} s")
    for attack_name, factory in (ensembles or {}).items():
        start, rates = time.perf_counter(), {}
        for target in names:
            others = [models[m] for m in names if m != target]
            rates[target] = judge(factory(threat, others).craft(x, y).x_adv, target)
        matrix.seconds[(attack_name, OTHERS)] = time.perf_counter() - start
        matrix.success[(attack_name, OTHERS)] = rates
        if log:
            log(f"{attack_name} leave-one-out: {matrix.seconds[(attack_name, OTHERS)]:.1f} s")
    return matrix
