"""What the population attacks (GenAttack, OnePixel) share.

Both evolve a population of candidates per image and see the model through its scores
only. Each generation, the candidates of every image still under attack go to the model
in one oracle call (``rows=`` names the image each candidate belongs to, so the access
layer counts the queries per image); nothing here counts. An image leaves the search as
soon as one of its candidates reaches the goal, or when its budget cannot pay for
another generation.

``max_queries`` is a total per image: the first look at ``x`` and every candidate
evaluated, never more; the final success pass is one more.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from advkit.attacks._decision import check_access_budget
from advkit.attacks.base import Attack, Oracle, goal_reached


def left(model: Oracle, rows: Tensor, max_queries: int) -> Tensor:
    """Queries each of the samples ``rows`` may still spend."""
    return max_queries - model.queries[rows]


def evaluate(model: Oracle, images: Tensor, rows: Tensor, y: Tensor, targets: Tensor | None,
             batch_size: int | None) -> tuple[Tensor, Tensor]:
    """Scores (m, classes) of candidate ``images`` (m, C, H, W), each charged to the sample
    in ``rows`` (oracle indices), in one oracle call; and whether each reaches the goal of
    its sample (``y``, ``targets``: per candidate)."""
    logits = model.logits(images, rows=rows, batch_size=batch_size)
    return logits, goal_reached(logits, y, targets)


def first_hit(hit: Tensor, fitness: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample (rows of ``hit``, (n, P)): whether a member reached the goal, and the
    member to keep: the fittest of those that did, else the fittest of all."""
    score = torch.where(hit, fitness, -torch.inf)
    done = hit.any(dim=1)
    pick = torch.where(done, score.argmax(dim=1), fitness.argmax(dim=1))
    return done, pick


class PopulationAttack(Attack):
    """A population attack: the budget check, the first look at ``x``, the result.

    ``_run`` refuses an access budget that cannot pay for ``max_queries`` (before any
    query), looks once at ``x`` (one query per sample, counted in ``max_queries``; samples
    already at their goal are done and never queried again), and hands the others to the
    subclass's ``_evolve``. ``extras["queries_to_success"]`` (int64, N): the queries a
    sample had spent when a candidate first reached its goal, the first look included (-1:
    never).
    """

    max_queries: int

    def _needs_clean_pass(self) -> bool:
        # The first look at x is the attack's own, after the budget check, in _run.
        return False

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None,
             ) -> tuple[Tensor, dict[str, Tensor]]:
        check_access_budget(self.name, model, self.max_queries)
        reached = goal_reached(model.logits(x), y, targets)
        found_at = torch.where(reached, model.queries, -1)
        out = x.clone()
        idx = (~reached).nonzero().squeeze(1)
        if idx.numel():
            self._evolve(model, x, y, targets, idx, out, found_at, generator)
        return out, {"queries_to_success": found_at, **self._extras(x, out)}

    @abstractmethod
    def _evolve(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
                idx: Tensor, out: Tensor, found_at: Tensor,
                generator: torch.Generator | None) -> None:
        """Search for the samples ``idx``: write each one's result into ``out`` and, where a
        candidate reached the goal, its query count then into ``found_at``."""

    def _extras(self, x: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        return {}
