"""AutoAE (Liu, Peng & Tang, AAAI 2023): an attack ensemble built greedily on data.

    suite, picks = build_suite(model, x, y, threat, candidates)

Liu, Peng, Tang. "Reliable Robustness Evaluation via Automatically Constructed Attack
Ensembles", AAAI 2023. https://arxiv.org/abs/2211.12713

AutoAE adds to the ensemble, one at a time, the candidate attack (an attack with its number
of iterations) that breaks the most images the ensemble does not break yet, per gradient
pass it adds, and stops when no candidate adds anything (or the ensemble's cost reaches a
cap). That greedy choice is within a constant factor of the best ensemble for the data it
is built on (the paper's Theorem 1; the objective, images broken, is submodular).

Here each candidate runs once, on every calibration image the model classifies correctly,
and the greedy works on what it broke and what it cost:

- a candidate's *gain* is the number of images it broke that no chosen stage broke;
- its *cost* is what it would spend in the suite: the gradient passes (backward passes)
  per image on the images it did not break (a stage of a budgeted suite attacks only the
  images the earlier stages left, and those it does not break cost it its whole run),
  times the images left;
- the pick is the candidate with the highest gain per cost; ties go to the cheaper one.

Calibrate on images the final figures are not measured on (the benchmark uses held-out
test images). The resulting :class:`~advkit.evaluation.suites.Suite` runs the picks in the
order they were picked (each on the images the earlier ones left), and ``picks`` records
each pick's gain and cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advkit.evaluation.suites import Stage, Suite
from advkit.threat import ThreatModel


@dataclass(frozen=True)
class Pick:
    """One greedy step: the stage chosen, the calibration images it added (broken by no
    earlier pick), and the gradient passes per image it costs on the images it leaves."""

    stage: Stage
    gain: int
    cost_per_image: float
    left_after: int


def measure(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
            candidates: Sequence[Stage], *, seed: int = 0,
            log: Callable[[str], None] | None = None) -> dict[str, tuple[Tensor, float]]:
    """Each candidate on every image of ``x`` the model classifies correctly: the images it
    broke (a bool mask over ``x``) and its gradient passes per image on the ones it did not
    (its forward passes count as half a gradient pass each, so a gradient-free stage has a
    cost too)."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    rows = correct.nonzero().squeeze(1)
    out = {}
    for stage in candidates:
        attack = stage.build(threat, seed)
        result = attack(model, x[rows], y[rows])
        broken = torch.zeros(len(x), dtype=torch.bool)
        broken[rows[result.success.cpu()]] = True
        standing = ~result.success.cpu()
        # Per-sample queries are forward + backward passes; on the images left standing.
        spent = result.queries.cpu()[standing].double()
        per_image = float(spent.mean()) / 2 if standing.any() else float(result.queries.double()
                                                                          .mean()) / 2
        out[stage.name] = (broken, per_image)
        if log:
            log(f"autoae: {stage.name}: broke {int(result.success.sum())} of {len(rows)}, "
                f"{per_image:.1f} gradient passes per image left standing")
    return out


def greedy(measured: dict[str, tuple[Tensor, float]], stages: Sequence[Stage], n_attacked: int,
           *, max_cost: float | None = None) -> list[Pick]:
    """AutoAE's greedy on measured candidates: the best gain per cost, until no candidate
    gains an image or the picks' cost per image would pass ``max_cost``."""
    by_name = {s.name: s for s in stages}
    broken = torch.zeros_like(next(iter(measured.values()))[0])
    left = n_attacked
    spent = 0.0
    picks: list[Pick] = []
    remaining = dict(measured)
    while remaining:
        best = None
        for name, (mask, cost) in remaining.items():
            gain = int((mask & ~broken).sum())
            if gain == 0:
                continue
            if max_cost is not None and spent + cost > max_cost:
                continue
            score = gain / max(cost * left, 1e-9)
            key = (score, -cost)
            if best is None or key > best[0]:
                best = (key, name, gain, cost)
        if best is None:
            break
        _, name, gain, cost = best
        mask = remaining.pop(name)[0]
        broken |= mask
        left -= gain
        spent += cost
        picks.append(Pick(by_name[name], gain, cost, left))
    return picks


def build_suite(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                candidates: Sequence[Stage], *, name: str = "autoae",
                max_cost: float | None = None, seed: int = 0,
                log: Callable[[str], None] | None = None) -> tuple[Suite, list[Pick]]:
    """The AutoAE ensemble of ``candidates`` for ``model`` on calibration images ``(x, y)``:
    a budgeted :class:`Suite` of the picks, in the order picked, and the picks."""
    if not candidates:
        raise ValueError("build_suite needs at least one candidate stage")
    names = [s.name for s in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate stage names must be unique (got {names})")
    measured = measure(model, x, y, threat, candidates, seed=seed, log=log)
    with torch.no_grad():
        n_attacked = int((model(x).argmax(1) == y).sum())
    picks = greedy(measured, candidates, n_attacked, max_cost=max_cost)
    if not picks:
        raise ValueError("no candidate broke any calibration image: the ensemble would be "
                         "empty; calibrate on more images or at a larger eps")
    return Suite(name, tuple(p.stage for p in picks)), picks
