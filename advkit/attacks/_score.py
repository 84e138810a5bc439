"""What the score-based attacks with a per-sample query budget (SimBA, NES, ZOO, Bandits)
share.

Each sees the model through its scores only (NES's label-only setting: its labels), spends
at most ``max_queries`` queries per sample (counted by the oracle: the access layer, never
the attack), and keeps, per sample, the adversarial points it was shown. This module holds
the common part:

- :class:`ScoreAttack`: the configuration (``max_queries``, ``checkpoints``, ``batch_size``),
  the budget check before any query, the first look at ``x`` (samples already at their goal
  are done and never queried again), and the result: the adversarial point found per sample
  (else the attack's last iterate), with the norm reached at each query budget and the
  queries each sample took to reach its goal. A subclass writes only its search
  (``_search``).
- :class:`ScoreSearch`: one call's state, the decision-based :class:`Search` asked for
  scores: every query goes through :meth:`ScoreSearch.ask` (or, for NES's label-only
  setting, :meth:`ScoreSearch.ask_labels`), which asks the oracle in batches of at most
  ``batch_size`` images, keeps the closest point at the goal per sample, the queries a
  sample took to reach it, and records the norms at the checkpoints.
- :func:`class_log_prob`: the log-probability of one class as far as the scores show it
  (the objective of SimBA and NES).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor

from advkit.attacks._decision import (
    Search,
    check_access_budget,
    check_count,
    query_checkpoints,
)
from advkit.attacks.base import Attack, goal_reached
from advkit.models.access import Oracle
from advkit.threat import ThreatModel


def class_log_prob(scores: Tensor, cls: Tensor) -> Tensor:
    """Per row, ``log p(cls)`` from scores (logits or log-probabilities; ``-inf`` hidden).

    The softmax runs over the scores the black box shows, so a top-k view gives the
    probability renormalised over its k classes. Where ``cls`` itself is hidden its log
    probability is at most the lowest shown one: that bound stands in for it, so an
    estimate built from these values stays finite.
    """
    log_p = scores.log_softmax(dim=1)
    lowest = torch.where(torch.isfinite(log_p), log_p, math.inf).amin(dim=1)
    own = log_p.gather(1, cls[:, None]).squeeze(1)
    return torch.where(torch.isfinite(own), own, lowest)


class ScoreSearch(Search):
    """One call of a score-based attack: its queries and what they found, per sample.

    As :class:`Search`, with scores: ``best`` / ``best_norm`` hold the closest point seen at
    the goal (``inf``: none yet), ``norm_at`` the norms at the checkpoints. ``found_at``
    (int64, N): the sample's query count after the call in which it was first seen at its
    goal (-1: never). ``in_ball``: only points inside the threat model's eps-ball count
    (a budgeted attack); otherwise every point does and eps is a cap the result applies.
    """

    def __init__(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
                 threat: ThreatModel, max_queries: int, checkpoints: tuple[int, ...],
                 batch_size: int | None, in_ball: bool) -> None:
        super().__init__(model, x, y, targets, threat, max_queries, checkpoints, batch_size)
        self.in_ball = in_ball
        #: The first look at ``x``, once asked: every sample's scores, or (an attack that
        #: asks labels only) their labels.
        self.first_scores: Tensor | None = None
        self.first_labels: Tensor | None = None
        self.found_at = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)

    def ask(self, points: Tensor, rows: Tensor) -> Tensor:
        """The scores of ``points`` (one query each, charged to the sample in ``rows``)."""
        points = points.clamp(*self.threat.bounds)
        scores = self.model.logits(points, rows=rows, batch_size=self.batch_size)
        targets = self.targets[rows] if self.targets is not None else None
        self._record(points, rows, goal_reached(scores, self.y[rows], targets))
        return scores

    def ask_labels(self, points: Tensor, rows: Tensor) -> Tensor:
        """The labels of ``points`` (one query each, charged to the sample in ``rows``), for
        a search that asks no scores (NES's label-only setting); kept as :meth:`ask` keeps
        its points."""
        points = points.clamp(*self.threat.bounds)
        labels = self.model.labels(points, rows=rows, batch_size=self.batch_size)
        self._record(points, rows, self.adversarial(labels, rows))
        return labels

    def _record(self, points: Tensor, rows: Tensor, hit: Tensor) -> None:
        """Keep the ``points`` seen at their goal (``hit``; inside the ball if budgeted),
        and the query count of a sample's first."""
        if self.in_ball:
            # A relative tolerance: a projected point lands on the sphere up to rounding.
            size = self.threat.norms(points - self.x[rows])
            hit = hit & (size <= self.threat.eps * (1 + 1e-5) + 1e-7)
        self.offer(points, rows, hit)
        if hit.any():
            first = rows[hit]
            self.found_at[first] = torch.where(self.found_at[first] < 0,
                                               self.model.queries[first], self.found_at[first])

    def found(self, rows: Tensor) -> Tensor:
        """Whether each of ``rows`` has a point at its goal (inside the ball if budgeted)."""
        return torch.isfinite(self.best_norm[rows])


class ScoreAttack(Attack):
    """A score-based attack with a total query budget per sample.

    ``_run`` looks once at ``x`` (one query per sample; samples already at their goal are
    done, with norm 0), hands the other samples to the subclass's ``_search``, and returns
    per sample the point found at the goal (the closest one; ``_search``'s last iterate
    where none was), with ``extras["norm_at_queries"]`` (N, K: the smallest norm at the
    goal within each budget of ``checkpoints``, ``inf`` where none) and
    ``extras["queries_to_success"]`` (N: the queries a sample had spent when first seen at
    its goal, the first look included; -1 where never).

    ``result.queries`` per sample: the first look, the search (together at most
    ``max_queries``) and the final success pass (1): an access with a budget needs at least
    ``max_queries + 1``, which is checked before any query.
    """

    call_options: tuple[str, ...] = ()
    #: Whether only points inside the eps-ball count (budgeted attacks).
    in_ball = True

    def __init__(self, threat: ThreatModel, *, max_queries: int,
                 checkpoints: tuple[int, ...] | list[int] | None, batch_size: int | None,
                 seed: int | None) -> None:
        super().__init__(threat, seed=seed)
        self.max_queries = check_count("max_queries", max_queries)
        self.batch_size = None if batch_size is None else check_count("batch_size", batch_size)
        self.checkpoints = query_checkpoints(checkpoints, max_queries)

    def _needs_clean_pass(self) -> bool:
        # The first look at x is the attack's own (counted in max_queries), in _run.
        return False

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None,
             **options: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        check_access_budget(self.name, model, self.max_queries)
        search = ScoreSearch(model, x, y, targets, self.threat, self.max_queries,
                             self.checkpoints, self.batch_size, self.in_ball)
        everyone = torch.arange(x.shape[0], device=x.device)
        if self._asks_labels(model.level):
            first = search.first_labels = search.ask_labels(x, everyone)
        else:
            first = search.first_scores = search.ask(x, everyone)
        rows = (~search.found(everyone)).nonzero().squeeze(1)
        last = x.clone()
        if rows.numel():
            last[rows] = self._search(search, rows, first[rows], generator, **options)
        found = search.found(everyone).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(found, search.best, last), {
            "norm_at_queries": search.norm_at, "queries_to_success": search.found_at}

    def _asks_labels(self, level: str) -> bool:
        """Whether a call on a model given with ``level`` access asks it for labels only
        (NES's label-only setting): the first look is then ``search.ask_labels``, and
        ``_search`` gets labels instead of scores."""
        return False

    @abstractmethod
    def _search(self, search: ScoreSearch, rows: Tensor, scores: Tensor,
                generator: torch.Generator | None, **options: Tensor | None) -> Tensor:
        """Search from ``x`` for the samples ``rows`` (``scores``: theirs at ``x``; their
        labels where :meth:`_asks_labels`), every query through ``search.ask`` (or
        ``search.ask_labels``) and within ``search.left``; return the last iterate of each
        (inside the threat model)."""
