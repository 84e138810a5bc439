"""HopSkipJumpAttack (Chen, Jordan & Wainwright, 2020): decision-based, L2 and Linf."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from advkit.attacks._decision import DecisionAttack, Search, to_boundary
from advkit.attacks.base import Taxonomy
from advkit.threat import ThreatModel

#: How many times the step size may be halved before an iteration gives up its step (the
#: paper's search halves until the step lands on the adversarial side, which a point on the
#: boundary always does for a small enough step; the cap only guards against a model that
#: is not locally constant there).
_HALVINGS = 25


class HopSkipJump(DecisionAttack):
    """Estimate the gradient at the boundary from labels, step along it, search back.

    Chen, Jordan, Wainwright. "HopSkipJumpAttack: A Query-Efficient Decision-Based
    Attack", IEEE S&P 2020. https://arxiv.org/abs/1904.02144

    Needs only the model's top-1 label (``advkit.models.labels_only(model)``). From an
    adversarial start (see below) a binary search finds the boundary point ``x_t`` on
    the segment to ``x`` (Linf: on the shrinking Linf balls around ``x``). Each
    iteration ``t = 1, 2, ...`` then

    1. estimates the gradient direction of the decision at ``x_t`` from
       ``B_t = min(init_evals * sqrt(t), max_evals)`` probes ``x_t + delta_t u_b`` (``u_b``
       uniform on the unit sphere: Gaussian directions for L2, uniform in the cube then
       normalised for Linf): the mean of ``(phi_b - mean phi) u_b``, ``phi_b = +-1`` for an
       adversarial / non-adversarial probe (the paper's baseline-corrected estimate);
       ``delta_1`` is a tenth of the box, then ``delta_t = d theta ||x_t - x||`` with
       ``theta = gamma / d^(3/2)`` (L2) or ``gamma / d^2`` (Linf), ``d`` pixels;
    2. steps from ``x_t`` along the estimate (L2: normalised; Linf: its sign) by
       ``||x_t - x|| / sqrt(t)``, halved until the point is adversarial;
    3. binary-searches from there back to the boundary towards ``x`` (precision
       ``theta``): the next ``x_t``.

    Batched: the probes of every active sample go to the model in one call per
    iteration, each charged to its sample. ``max_queries`` is a total per sample, not
    the paper's per-iteration ``max_num_evals`` (here ``max_evals``): a sample stops when
    what it has left cannot pay a gradient estimate, a step and a binary search, and it
    never spends more than ``max_queries``. Every point the model was seen to classify
    adversarially (probes included) is a candidate, and the closest one per sample is
    returned, so the norm never grows with queries.

    Minimal-norm: eps is only a cap (``float("inf")`` for none); the search ignores it.
    ``result.norms`` are the smallest perturbations found; ``result.norms_at(q)`` and
    ``result.curve(eps_list, queries=q)`` give them after ``q`` queries per sample, for
    every ``q`` in ``checkpoints`` (``result.extras["norm_at_queries"]``, (N, K)).

    Starts: ``attack(model, x, y, starting_points=s)`` starts from ``s`` (N, C, H, W; each
    must be adversarial, which costs one query to check). Without it: untargeted, the
    paper's uniform noise (up to ``init_tries`` draws, one query each), then the closest
    input of the batch with another label; targeted (``targets=``), the closest input of
    the batch that the model classifies as the target (no query: its label was seen in
    the first look), then noise (``start_from="inputs"`` / ``"noise"`` changes the
    order). A sample with no start keeps ``x`` and norm ``inf``. On the MNIST test CNN
    (20 test images, L2) the closest other input is the better start: median L2 2.51
    after 1,000 queries and 1.99 after 5,000, against 3.19 and 2.17 from noise.

    ``result.queries`` per sample: the first look at ``x`` (1), the start, the search
    (together at most ``max_queries``), and the final success pass (1): give
    ``labels_only(model, budget=max_queries + 1)`` at least.

    Args:
        threat: norm (``l2`` or ``linf``), eps (a cap, ``float("inf")`` for none), bounds.
        max_queries: the queries per sample, in total (default 5000).
        init_evals: the probes of the first gradient estimate (default 100, the paper's).
        max_evals: the most probes of one estimate (default 10,000, the paper's).
        gamma: scales the probe radius and the binary search's precision ``theta``
            (default 1.0, the paper's).
        steps: the most iterations (default None: until the budget is spent).
        checkpoints: the query budgets at which the norms are recorded (default 100,
            200, 500, 1000, 2000, 5000, ... below ``max_queries``, and ``max_queries``).
        init_tries: the most noise draws per sample when searching a start (default 100).
        start_from: ``"noise"`` or ``"inputs"``: the start searched first (default None:
            noise untargeted, inputs targeted).
        batch_size: the most images per model call (default 512: on CPU one call of
            thousands ran at half the speed; None sends each batch of queries whole).
        seed: seed of the probes and the noise (same seed, same result).
    """

    paper = ("Chen, Jordan & Wainwright 2020, HopSkipJumpAttack: A Query-Efficient "
             "Decision-Based Attack")
    taxonomy = Taxonomy(knowledge="black box (decisions)", perturbation="optimized")
    norms = ("l2", "linf")

    def __init__(self, threat: ThreatModel, *, max_queries: int = 5000, init_evals: int = 100,
                 max_evals: int = 10_000, gamma: float = 1.0, steps: int | None = None,
                 checkpoints: tuple[int, ...] | list[int] | None = None,
                 init_tries: int = 100, start_from: str | None = None,
                 batch_size: int | None = 512, seed: int | None = 0) -> None:
        super().__init__(threat, max_queries=max_queries, checkpoints=checkpoints,
                         init_tries=init_tries, start_from=start_from,
                         batch_size=batch_size, seed=seed)
        for name, value in (("init_evals", init_evals), ("max_evals", max_evals)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0 (got {gamma})")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise ValueError(f"steps must be an integer >= 1, or None to run until the "
                             f"budget is spent (got {steps!r})")
        self.init_evals = init_evals
        self.max_evals = max_evals
        self.gamma = gamma
        self.steps = steps

    def _walk(self, search: Search, rows: Tensor, start: Tensor,
              generator: torch.Generator | None) -> None:
        d = search.x[0].numel()
        theta = self.gamma / (d * math.sqrt(d) if self.threat.norm == "l2" else d * d)
        lo, hi = self.threat.bounds
        x_t = to_boundary(search, rows, start, theta)
        t = 0
        while self.steps is None or t < self.steps:
            t += 1
            dist = self.threat.norms(x_t - search.x[rows])
            # A sample takes part only if it can pay for a binary search and one step
            # after its estimate; the estimate gets what is left, up to B_t.
            evals = torch.clamp(search.left(rows) - self._search_cost(dist, theta) - 1,
                                max=min(int(self.init_evals * math.sqrt(t)), self.max_evals))
            going = evals >= 1
            rows, x_t, dist, evals = rows[going], x_t[going], dist[going], evals[going]
            if rows.numel() == 0:
                return
            # The probe radius: d theta ||x_t - x|| is sqrt(d) theta ||.||_2 for L2 and
            # d theta ||.||_inf for Linf in the paper; both come to ||.|| / d here.
            scale = math.sqrt(d) if self.threat.norm == "l2" else d
            delta = (torch.full_like(dist, 0.1 * (hi - lo)) if t == 1
                     else scale * theta * dist)
            update = self._direction(search, rows, x_t, delta, evals, generator)
            moved, x_new = self._step(search, rows, x_t, update, dist / math.sqrt(t))
            x_t[moved] = to_boundary(search, rows[moved], x_new[moved], theta)

    def _search_cost(self, dist: Tensor, theta: float) -> Tensor:
        """Queries a binary search to precision ``theta`` takes (see :func:`to_boundary`)."""
        if self.threat.norm == "l2":
            return torch.full_like(dist, math.ceil(math.log2(1 / theta)), dtype=torch.long)
        ratio = dist / (dist * theta).clamp(max=theta)
        return ratio.clamp_min(1).log2().ceil().long()

    def _direction(self, search: Search, rows: Tensor, x_t: Tensor, delta: Tensor,
                   evals: Tensor, generator: torch.Generator | None) -> Tensor:
        """The estimated gradient direction of the decision at each ``x_t``: one batched
        call for the ``evals`` probes of every sample."""
        m = len(rows)
        owners = torch.repeat_interleave(torch.arange(m, device=rows.device), evals)
        shape = (len(owners), *x_t.shape[1:])
        opts = {"device": x_t.device, "dtype": x_t.dtype, "generator": generator}
        u = torch.randn(shape, **opts) if self.threat.norm == "l2" else torch.rand(
            shape, **opts) * 2 - 1
        u = u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (u.dim() - 1)))
        r = delta[owners].view(-1, *([1] * (u.dim() - 1)))
        probes = (x_t[owners] + r * u).clamp(*self.threat.bounds)
        u = (probes - x_t[owners]) / r  # the direction each probe really took (box clipped)
        phi = search.ask(probes, rows[owners]).to(x_t.dtype) * 2 - 1
        count = evals.to(x_t.dtype)
        mean = torch.zeros(m, device=x_t.device, dtype=x_t.dtype).index_add_(0, owners, phi)
        mean = mean / count
        # Subtracting the mean (the paper's baseline) lowers the variance, but leaves nothing
        # when every probe agrees: then the plain mean of +-u is the estimate.
        weights = phi - torch.where(mean.abs() < 1, mean, 0.0)[owners]
        grad = torch.zeros(m, u[0].numel(), device=x_t.device, dtype=x_t.dtype).index_add_(
            0, owners, weights[:, None] * u.flatten(1))
        if self.threat.norm == "linf":
            return grad.sign().view_as(x_t)
        return (grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(x_t)

    def _step(self, search: Search, rows: Tensor, x_t: Tensor, update: Tensor,
              size: Tensor) -> tuple[Tensor, Tensor]:
        """The geometric step search: from ``x_t`` along ``update`` by ``size``, halved until
        adversarial. Returns which samples moved and where to."""
        size = size.clone()
        x_new = x_t.clone()
        moved = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for _ in range(_HALVINGS):
            going = (~moved & (search.left(rows) > 0)).nonzero().squeeze(1)
            if going.numel() == 0:
                break
            candidate = (x_t[going] + size[going].view(-1, *([1] * (x_t.dim() - 1)))
                         * update[going]).clamp(*self.threat.bounds)
            hit = search.ask(candidate, rows[going])
            x_new[going[hit]] = candidate[hit]
            moved[going[hit]] = True
            size[going[~hit]] /= 2
        return moved, x_new
