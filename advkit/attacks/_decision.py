"""What the decision-based attacks (Boundary, HopSkipJump) share.

Both see the model through its top-1 label only, start from an adversarial point, walk
along the decision boundary towards the original image, and keep, per sample, the
closest adversarial point seen. This module holds that common part:

- :class:`DecisionAttack`: the configuration (``max_queries``, ``checkpoints``,
  ``init_tries``), the budget checks, the first look at ``x``, the starting points, and
  the result (the best point per sample and the norm reached at each query budget);
  a subclass writes only its walk (``_walk``).
- :class:`Search`: one call's state. Every query goes through :meth:`Search.ask`, which
  asks the oracle (the access layer counts; nothing here does), keeps the closest
  adversarial point of each sample, and records the norms at the checkpoints.
- :func:`to_boundary`: the binary search between ``x`` and an adversarial point.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod

import torch
from torch import Tensor

from advkit.attacks.base import Attack
from advkit.models.access import REJECT, Oracle, QueryBudgetExceeded
from advkit.threat import ThreatModel

#: Where a start is searched first when none is given (see :class:`DecisionAttack`).
START_FROM = ("noise", "inputs")


def default_checkpoints(max_queries: int) -> tuple[int, ...]:
    """The budgets 100, 200, 500, 1000, 2000, 5000, ... below ``max_queries``, and
    ``max_queries`` itself."""
    budgets, scale = [], 100
    while True:
        for step in (1, 2, 5):
            if step * scale >= max_queries:
                return (*budgets, max_queries)
            budgets.append(step * scale)
        scale *= 10


def check_count(name: str, value: object, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least} (got {value!r})")
    return value


def query_checkpoints(checkpoints: tuple[int, ...] | list[int] | None,
                      max_queries: int) -> tuple[int, ...]:
    """The query budgets at which an attack records its norms: sorted, checked, at most
    ``max_queries`` (None: :func:`default_checkpoints`)."""
    if checkpoints is None:
        checkpoints = default_checkpoints(max_queries)
    checkpoints = tuple(sorted(set(checkpoints)))
    for q in checkpoints:
        check_count("every checkpoint", q)
    if checkpoints[-1:] and checkpoints[-1] > max_queries:
        raise ValueError(f"checkpoints must be at most max_queries={max_queries} (got "
                         f"{checkpoints[-1]}); the attack spends no more")
    return checkpoints


def check_access_budget(name: str, model: Oracle, max_queries: int) -> None:
    """Refuse, before any query, an access whose per-sample budget cannot pay for
    ``max_queries`` and the final success pass."""
    budget = model.access.budget
    if budget is not None and max_queries + 1 > budget:
        raise QueryBudgetExceeded(
            f"{name} may spend max_queries={max_queries} queries per sample and the final "
            f"success pass one more, but the access allows {budget}: give the attack "
            f"max_queries={budget - 1} or the access a budget of {max_queries + 1}")


class Search:
    """One call of a decision-based attack: the queries, per sample, and what they found.

    Rows are always indices of the call's samples (the oracle's rows). ``best`` and
    ``best_norm`` hold, per sample, the closest point the model was seen to classify
    adversarially (``inf`` where none yet); ``norm_at`` (N, K) the value ``best_norm``
    had when the sample had spent at most ``checkpoints[k]`` queries.
    """

    def __init__(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
                 threat: ThreatModel, max_queries: int, checkpoints: tuple[int, ...],
                 batch_size: int | None = None) -> None:
        self.model, self.x, self.y, self.targets = model, x, y, targets
        self.threat, self.max_queries, self.batch_size = threat, max_queries, batch_size
        self.checkpoints = torch.tensor(checkpoints, device=x.device)
        self.best = x.clone()
        self.best_norm = torch.full((x.shape[0],), math.inf, device=x.device)
        self.norm_at = torch.full((x.shape[0], len(checkpoints)), math.inf, device=x.device)

    def left(self, rows: Tensor) -> Tensor:
        """Queries each of ``rows`` may still spend (the oracle's count against
        ``max_queries``)."""
        return self.max_queries - self.model.queries[rows]

    def adversarial(self, labels: Tensor, rows: Tensor) -> Tensor:
        """Whether ``labels`` reach the goal of the samples ``rows``; a rejected input (a
        pipeline's detector flagged it) never does."""
        if self.targets is not None:
            return labels == self.targets[rows]
        return (labels != self.y[rows]) & (labels != REJECT)

    def ask(self, points: Tensor, rows: Tensor) -> Tensor:
        """Whether the model classifies each of ``points`` (one query each, charged to the
        sample in ``rows``) adversarially; keeps the closest adversarial point per sample
        and records the norms at the checkpoints."""
        points = points.clamp(*self.threat.bounds)
        labels = self.model.labels(points, rows=rows, batch_size=self.batch_size)
        hit = self.adversarial(labels, rows)
        self.offer(points, rows, hit)
        return hit

    def offer(self, points: Tensor, rows: Tensor, hit: Tensor) -> None:
        """Keep the closest of ``points`` where ``hit`` (seen to be adversarial) per sample."""
        if hit.any():
            points, rows = points[hit], rows[hit]
            size = self.threat.norms(points - self.x[rows])
            closest = torch.full_like(self.best_norm, math.inf).scatter_reduce(
                0, rows, size, "amin")
            # Of the points at that smallest norm, the first one (deterministic).
            order = torch.arange(len(rows), device=rows.device)
            first = torch.full_like(self.best_norm, len(rows), dtype=torch.long).scatter_reduce(
                0, rows, torch.where(size == closest[rows], order, len(rows)), "amin")
            better = (closest < self.best_norm).nonzero().squeeze(1)
            self.best[better] = points[first[better]]
            self.best_norm[better] = closest[better]
        spent = self.model.queries[:, None] <= self.checkpoints[None, :]
        self.norm_at = torch.where(spent, torch.minimum(self.norm_at, self.best_norm[:, None]),
                                   self.norm_at)


def project(x: Tensor, adv: Tensor, alpha: Tensor, norm: str) -> Tensor:
    """The point at ``alpha`` between ``x`` and ``adv``: on the segment (L2, alpha in
    [0, 1]), or ``adv`` clipped to the Linf ball of radius ``alpha`` around ``x``."""
    a = alpha.view(-1, *([1] * (x.dim() - 1)))
    if norm == "l2":
        return x + a * (adv - x)
    return torch.minimum(torch.maximum(adv, x - a), x + a)


def to_boundary(search: Search, rows: Tensor, adv: Tensor, theta: float) -> Tensor:
    """Binary search from the adversarial ``adv`` towards ``x`` (HopSkipJump's, used by
    both attacks): the adversarial end of an interval that straddles the boundary.

    L2: along the segment, to a relative precision ``theta``; Linf: over the radius of
    the ball ``adv`` is clipped to, from its Linf distance down to a precision
    ``min(distance * theta, theta)``. One query per sample and halving, batched, each
    sample stopping at its precision or at the end of its budget.
    """
    x0, norm = search.x[rows], search.threat.norm
    if norm == "l2":
        high = torch.ones(len(rows), device=adv.device)
        precision = torch.full_like(high, theta)
    else:
        high = search.threat.norms(adv - x0)
        precision = (high * theta).clamp(max=theta)
    low = torch.zeros_like(high)
    while True:
        going = ((high - low) > precision) & (search.left(rows) > 0)
        if not going.any():
            break
        mid = (low + high) / 2
        hit = search.ask(project(x0[going], adv[going], mid[going], norm), rows[going])
        high[going] = torch.where(hit, mid[going], high[going])
        low[going] = torch.where(hit, low[going], mid[going])
    return project(x0, adv, high, norm)


class DecisionAttack(Attack):
    """A decision-based, minimal-norm attack: starts, budgets and the recorded norms.

    ``_run`` looks once at ``x`` (samples already at their goal are done: norm 0),
    finds a starting point for every other sample, hands them to the subclass's
    ``_walk``, and returns the closest adversarial point of each sample (``x`` where
    none was found) with ``extras["norm_at_queries"]``.

    Starting points, per sample not yet at its goal: ``starting_points=`` if given
    (each must be adversarial: checked, one query each); else two sources, one after
    the other: uniform noise (up to ``init_tries`` draws, one query each) and the
    closest input of the batch whose label (seen in the first look: no query) reaches
    the sample's goal. ``start_from`` says which comes first: ``"noise"`` (the papers'
    start; the default untargeted), ``"inputs"`` (the default targeted, where noise is
    seldom classified as the target). A sample with no start is returned unchanged,
    its norm ``inf``.
    """

    kind = "minimal"
    call_options = ("starting_points",)

    def __init__(self, threat: ThreatModel, *, max_queries: int,
                 checkpoints: tuple[int, ...] | list[int] | None, init_tries: int,
                 start_from: str | None, batch_size: int | None, seed: int | None) -> None:
        super().__init__(threat, seed=seed)
        self.max_queries = check_count("max_queries", max_queries)
        self.batch_size = None if batch_size is None else check_count("batch_size", batch_size)
        self.init_tries = check_count("init_tries", init_tries)
        if start_from not in (None, *START_FROM):
            raise ValueError(f"unknown start_from {start_from!r}: use one of "
                             f"{', '.join(START_FROM)}, or None (noise untargeted, inputs "
                             "targeted)")
        self.start_from = start_from
        self.checkpoints = query_checkpoints(checkpoints, max_queries)

    def _needs_clean_pass(self) -> bool:
        # The first look at x is the attack's own (labels only), in _run.
        return False

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None,
             starting_points: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        check_access_budget(self.name, model, self.max_queries)
        if starting_points is not None:
            starting_points = self._check_starts(starting_points, x)
        search = Search(model, x, y, targets, self.threat, self.max_queries, self.checkpoints,
                        self.batch_size)
        everyone = torch.arange(x.shape[0], device=x.device)
        labels = model.labels(x)
        search.offer(x, everyone, search.adversarial(labels, everyone))
        rows = (~search.adversarial(labels, everyone)).nonzero().squeeze(1)
        if rows.numel():
            rows, start = self._start(search, rows, labels, starting_points, generator)
            if rows.numel():
                self._walk(search, rows, start, generator)
        found = torch.isfinite(search.best_norm).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(found, search.best, x), {"norm_at_queries": search.norm_at}

    @abstractmethod
    def _walk(self, search: Search, rows: Tensor, start: Tensor,
              generator: torch.Generator | None) -> None:
        """Walk from the adversarial ``start`` of each of ``rows`` towards ``x``, every query
        through ``search.ask`` and within ``search.left``."""

    def _check_starts(self, starts: Tensor, x: Tensor) -> Tensor:
        if not isinstance(starts, Tensor) or starts.shape != x.shape:
            shape = tuple(starts.shape) if isinstance(starts, Tensor) else type(starts).__name__
            raise ValueError(f"starting_points must be a tensor of the shape of x, "
                             f"{tuple(x.shape)}: one adversarial image per sample (got "
                             f"{shape})")
        starts = starts.to(device=x.device, dtype=x.dtype)
        lo, hi = self.threat.bounds
        if not torch.isfinite(starts).all() or starts.min() < lo or starts.max() > hi:
            raise ValueError(f"starting_points must be finite and inside the bounds "
                             f"{self.threat.bounds}")
        return starts

    def _start(self, search: Search, rows: Tensor, labels: Tensor, given: Tensor | None,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The samples ``rows`` that got an adversarial starting point, and those points."""
        start = torch.zeros_like(search.x[rows])
        if given is not None:
            hit = search.ask(given[rows], rows)
            if not hit.all():
                bad = rows[~hit][:5].tolist()
                raise ValueError(
                    f"{int((~hit).sum())} starting points are not adversarial (samples "
                    f"{bad}{'...' if (~hit).sum() > 5 else ''}): the model "
                    + ("does not classify them as the target" if search.targets is not None
                       else "gives them the true label")
                    + "; pass adversarial images, or leave starting_points out to search")
            return rows, given[rows]
        found = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        first = self.start_from or ("inputs" if search.targets is not None else "noise")
        sources = (self._from_inputs, self._from_noise)
        for source in sources if first == "inputs" else sources[::-1]:
            if not found.all():
                source(search, rows, labels, start, found, generator)
        if not found.all():
            goal = "the target" if search.targets is not None else "another label"
            warnings.warn(
                f"{self.name} found no adversarial start for {int((~found).sum())} of "
                f"{len(found)} samples (no input of the batch has {goal}, and "
                f"{self.init_tries} noise draws did not): they stay unbroken (norm inf); pass "
                "starting_points= or raise init_tries", stacklevel=4)
        return rows[found], start[found]

    def _from_noise(self, search: Search, rows: Tensor, labels: Tensor, start: Tensor,
                    found: Tensor, generator: torch.Generator | None) -> None:
        lo, hi = self.threat.bounds
        for _ in range(self.init_tries):
            todo = (~found & (search.left(rows) > 0)).nonzero().squeeze(1)
            if todo.numel() == 0:
                return
            noise = lo + (hi - lo) * torch.rand(search.x[rows[todo]].shape,
                                                device=start.device, dtype=start.dtype,
                                                generator=generator)
            hit = search.ask(noise, rows[todo])
            start[todo[hit]] = noise[hit]
            found[todo[hit]] = True

    def _from_inputs(self, search: Search, rows: Tensor, labels: Tensor, start: Tensor,
                     found: Tensor, generator: torch.Generator | None) -> None:
        todo = (~found).nonzero().squeeze(1)
        # Input j is a start for sample i when its label (seen in the first look) reaches
        # i's goal: i's target, or any label but y_i (and not a rejection).
        goal = (search.targets[rows[todo]] if search.targets is not None else None)
        if goal is not None:
            fits = labels[None, :] == goal[:, None]
        else:
            fits = ((labels[None, :] != search.y[rows[todo]][:, None])
                    & (labels[None, :] != REJECT))
        p = 2.0 if self.threat.norm == "l2" else math.inf
        dist = torch.cdist(search.x[rows[todo]].flatten(1), search.x.flatten(1), p=p)
        dist = torch.where(fits, dist, math.inf)
        closest = dist.argmin(dim=1)
        ok = torch.isfinite(dist.min(dim=1).values)
        start[todo[ok]] = search.x[closest[ok]]
        found[todo[ok]] = True
        search.offer(start[todo[ok]], rows[todo[ok]], torch.ones_like(ok[ok]))
