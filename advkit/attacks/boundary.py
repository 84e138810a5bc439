"""The Boundary Attack (Brendel, Rauber & Bethge, 2018): decision-based, L2."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from advkit.attacks._decision import DecisionAttack, Search, to_boundary
from advkit.attacks.base import Taxonomy
from advkit.threat import ThreatModel


class _Window:
    """The last ``size`` outcomes of a trial, per sample: a success rate once full."""

    def __init__(self, n: int, size: int, device: torch.device) -> None:
        self.hits = torch.zeros(n, size, device=device)
        self.count = torch.zeros(n, dtype=torch.long, device=device)

    def push(self, rows: Tensor, hit: Tensor) -> None:
        slot = self.count[rows] % self.hits.shape[1]
        self.hits[rows, slot] = hit.to(self.hits.dtype)
        self.count[rows] += 1

    def rate(self) -> Tensor:
        """Success rate per sample, NaN while the window is not full."""
        full = self.count >= self.hits.shape[1]
        return torch.where(full, self.hits.mean(dim=1), math.nan)

    def clear(self, which: Tensor) -> None:
        self.count[which] = 0

    def keep(self, which: Tensor) -> None:
        self.hits, self.count = self.hits[which], self.count[which]


class Boundary(DecisionAttack):
    """A random walk along the decision boundary that shrinks the distance to ``x``.

    Brendel, Rauber, Bethge. "Decision-Based Adversarial Attacks: Reliable Attacks
    Against Black-Box Machine Learning Models", ICLR 2018.
    https://arxiv.org/abs/1712.04248

    Needs only the model's top-1 label (``advkit.models.labels_only(model)``). From an
    adversarial start (as :class:`HopSkipJump`, then a binary search to the boundary on
    the segment to ``x``), each step proposes, per sample, one point and keeps it if it
    is adversarial (one query):

    1. an orthogonal step: Gaussian noise of length ``spherical_step * ||x_k - x||``,
       made orthogonal to ``x - x_k``, added to ``x_k`` and projected back onto the
       sphere of radius ``||x_k - x||`` around ``x``, then clipped into the box;
    2. a step towards ``x``: the point on the ray from ``x`` through it at distance
       ``(1 - source_step) ||x_k - x||``.

    The step sizes adapt per sample, as in the paper (with Foolbox's thresholds): every
    ``stats_every`` steps the orthogonal point alone is also asked (one more query);
    once ``window`` such checks are in, a rate above 50% multiplies both steps by
    ``step_adaptation`` and one below 20% divides them; once ``window`` proposals are
    in, a rate above 25% multiplies the step towards ``x`` and one below 10% divides it.
    A sample stops when its step towards ``x`` falls below ``1e-7`` (converged) or its
    budget is spent. Batched over samples: one model call per step.

    L2 only: the walk moves on spheres around ``x``; for Linf use :class:`HopSkipJump`.
    Minimal-norm: eps is a cap (``float("inf")`` for none), ``result.norms`` the smallest
    perturbations found, ``result.norms_at(q)`` / ``result.curve(eps_list, queries=q)``
    the same after ``q`` queries per sample, for each ``q`` in ``checkpoints``.
    ``starting_points=``, targets and the query count as for :class:`HopSkipJump`: at
    most ``max_queries`` per sample, plus the final success pass.

    Args:
        threat: norm ``l2``, eps (a cap, ``float("inf")`` for none), bounds.
        max_queries: the queries per sample, in total (default 5000).
        spherical_step: the first orthogonal step, relative to the distance (default
            0.01, the paper's).
        source_step: the first step towards ``x``, relative to the distance (default
            0.01, the paper's).
        step_adaptation: the factor the steps grow or shrink by (default 1.5, the paper's).
        stats_every: a step that also asks the orthogonal point, every this many
            (default 5).
        window: the checks and proposals a success rate is read over (default 10).
        checkpoints: the query budgets at which the norms are recorded (default 100,
            200, 500, 1000, 2000, 5000, ... below ``max_queries``, and ``max_queries``).
        init_tries: the most noise draws per sample when searching a start (default 100).
        start_from: ``"noise"`` or ``"inputs"``: the start searched first (default None:
            noise untargeted, inputs targeted).
        batch_size: the most images per model call (default 512: on CPU one call of
            thousands ran at half the speed; None sends each batch of queries whole).
        seed: seed of the walk and the noise (same seed, same result).
    """

    paper = ("Brendel, Rauber & Bethge 2018, Decision-Based Adversarial Attacks: Reliable "
             "Attacks Against Black-Box Machine Learning Models")
    taxonomy = Taxonomy(knowledge="black box (decisions)", perturbation="optimized")
    norms = ("l2",)

    #: The step towards x below which a sample has converged (Foolbox's).
    converged = 1e-7

    def __init__(self, threat: ThreatModel, *, max_queries: int = 5000,
                 spherical_step: float = 0.01, source_step: float = 0.01,
                 step_adaptation: float = 1.5, stats_every: int = 5, window: int = 10,
                 checkpoints: tuple[int, ...] | list[int] | None = None,
                 init_tries: int = 100, start_from: str | None = None,
                 batch_size: int | None = 512, seed: int | None = 0) -> None:
        if isinstance(threat, ThreatModel) and threat.norm != "l2":
            raise ValueError(f"Boundary is an L2 attack: its steps move on spheres around x "
                             f"(got norm {threat.norm!r}); for linf use HopSkipJump")
        super().__init__(threat, max_queries=max_queries, checkpoints=checkpoints,
                         init_tries=init_tries, start_from=start_from,
                         batch_size=batch_size, seed=seed)
        for name, value in (("spherical_step", spherical_step), ("source_step", source_step)):
            if not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1) (got {value}); it is relative to "
                                 "the distance to x")
        if not step_adaptation > 1:
            raise ValueError(f"step_adaptation must be > 1 (got {step_adaptation})")
        for name, value in (("stats_every", stats_every), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
        self.spherical_step = spherical_step
        self.source_step = source_step
        self.step_adaptation = step_adaptation
        self.stats_every = stats_every
        self.window = window

    def _walk(self, search: Search, rows: Tensor, start: Tensor,
              generator: torch.Generator | None) -> None:
        d = search.x[0].numel()
        # The start goes to the boundary first (HopSkipJump's search, its precision).
        x_k = to_boundary(search, rows, start, 1 / (d * math.sqrt(d)))
        spherical = torch.full((len(rows),), self.spherical_step, device=x_k.device)
        source = torch.full_like(spherical, self.source_step)
        orthogonal_hits = _Window(len(rows), self.window, x_k.device)
        step_hits = _Window(len(rows), self.window, x_k.device)
        step = 0
        while True:
            step += 1
            check = step % self.stats_every == 0
            going = (search.left(rows) >= (2 if check else 1)) & (source >= self.converged)
            if not going.all():
                rows, x_k, spherical, source = (t[going] for t in (rows, x_k, spherical, source))
                orthogonal_hits.keep(going)
                step_hits.keep(going)
            if rows.numel() == 0:
                return
            orthogonal, candidate = self._propose(search.x[rows], x_k, spherical, source,
                                                  generator)
            n = len(rows)
            asked = torch.cat([candidate, orthogonal]) if check else candidate
            hit = search.ask(asked, torch.cat([rows, rows]) if check else rows)
            # Numerically a proposal may land a hair farther than x_k: keep only closer ones.
            closer = (self.threat.norms(candidate - search.x[rows])
                      < self.threat.norms(x_k - search.x[rows]))
            x_k = torch.where((hit[:n] & closer).view(-1, *([1] * (x_k.dim() - 1))),
                              candidate, x_k)
            everyone = torch.arange(n, device=rows.device)
            step_hits.push(everyone, hit[:n])
            if check:
                orthogonal_hits.push(everyone, hit[n:])
            spherical, source = self._adapt(orthogonal_hits, step_hits, spherical, source)

    def _propose(self, x: Tensor, x_k: Tensor, spherical: Tensor, source: Tensor,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The orthogonal (spherical) point and the proposal, one of each per sample."""
        lo, hi = self.threat.bounds
        towards = (x - x_k).flatten(1)
        dist = towards.norm(dim=1, keepdim=True)
        unit = towards / dist.clamp_min(1e-12)
        eta = torch.randn(towards.shape, device=x.device, dtype=x.dtype, generator=generator)
        eta = eta / eta.norm(dim=1, keepdim=True) * spherical[:, None] * dist
        eta = eta - (eta * unit).sum(dim=1, keepdim=True) * unit
        # Back onto the sphere of radius dist around x, then into the box.
        off = x_k.flatten(1) + eta - x.flatten(1)
        orthogonal = (x.flatten(1) + off * dist / off.norm(dim=1, keepdim=True)).clamp(lo, hi)
        # Towards x along the ray through the orthogonal point, to (1 - source) dist. The
        # box may have pulled that point in already; a point inside stays where it is
        # (both ends of the segment are in the box, so no clipping is needed).
        ray = orthogonal - x.flatten(1)
        length = ray.norm(dim=1, keepdim=True).clamp_min(1e-12)
        shrink = ((1 - source[:, None]) * dist / length).clamp(max=1)
        candidate = x.flatten(1) + shrink * ray
        return orthogonal.view_as(x), candidate.view_as(x)

    def _adapt(self, orthogonal_hits: _Window, step_hits: _Window, spherical: Tensor,
               source: Tensor) -> tuple[Tensor, Tensor]:
        """The paper's step-size control: keep the orthogonal step near the boundary's local
        curvature (about half its points adversarial) and the step towards x as long as
        some proposals still succeed."""
        grow = self.step_adaptation
        rate = orthogonal_hits.rate()
        up, down = rate > 0.5, rate < 0.2
        factor = torch.where(up, grow, torch.where(down, 1 / grow, 1.0))
        spherical, source = spherical * factor, source * factor
        orthogonal_hits.clear(up | down)
        rate = step_hits.rate()
        up, down = rate > 0.25, rate < 0.1
        source = source * torch.where(up, grow, torch.where(down, 1 / grow, 1.0))
        step_hits.clear(up | down)
        return spherical.clamp(max=1.0), source.clamp(max=0.5)
