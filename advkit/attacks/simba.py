"""SimBA (Guo et al., 2019): score-based, one orthonormal direction at a time, L2."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from advkit.attacks._score import ScoreAttack, ScoreSearch, class_log_prob
from advkit.attacks.base import Taxonomy
from advkit.threat import ThreatModel

BASES = ("dct", "pixel")


def dct_matrix(n: int, like: Tensor) -> Tensor:
    """The orthonormal DCT-II matrix (n, n): row ``u`` is the ``u``-th cosine of length n."""
    i = torch.arange(n, device=like.device, dtype=like.dtype)
    d = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


class SimBA(ScoreAttack):
    """Try one direction of an orthonormal basis at a time; keep a step that lowers the score.

    Guo, Gardner, You, Wilson, Weinberger. "Simple Black-box Adversarial Attacks",
    ICML 2019. https://arxiv.org/abs/1905.07121

    Needs only the model's scores (``advkit.models.scores_only(model)``). The searched
    quantity is the probability of the true class (targeted: minus the probability of the
    target), the softmax of the scores the model shows. Each iteration takes the next
    direction ``q`` of the sample's order and asks ``x + delta - epsilon q``; if the
    probability did not fall, it asks ``x + delta + epsilon q``; the first that lowers it
    becomes the new ``delta``. Directions never repeat within a pass over the basis (a
    random order per sample); after a full pass the same order starts again.

    - ``basis="dct"`` (the paper's SimBA-DCT): the 2-D DCT basis per channel, low
      frequencies first as in the paper: a random order of the ``freq_dims x freq_dims``
      lowest frequencies of every channel, then bands of ``stride`` higher frequencies,
      each band in random order.
    - ``basis="pixel"`` (SimBA with the standard basis): one pixel of one channel, all in
      random order.

    Every candidate is projected into the box and the L2 ball of radius eps around ``x``
    (the paper has no ball, only the box: give eps the box's diameter, ``sqrt(C H W)``, for
    none). A candidate that this projection leaves where the search already is (a pixel
    at the edge of the box pushed outwards) is not asked: it would cost a query and tell
    nothing.

    Queries, counted by the oracle (SimBA's reference code counted fewer than it made):
    the first evaluation at ``x`` costs one query, every candidate asked one more (so an
    iteration costs one or two), and the final success pass one. ``max_queries`` is the
    total per sample, the first evaluation included. Batched: every active sample's
    candidate goes to the model in one call, and the second candidates in one more. A
    sample stops as soon as it reaches its goal (SimBA's own stopping rule).

    ``result.extras``: ``norm_at_queries`` (N, K: the L2 norm of the first adversarial
    point within each budget of ``checkpoints``, ``inf`` where none) and
    ``queries_to_success`` (N; -1 where the goal was not reached).

    Args:
        threat: norm ``l2`` (the paper's), eps (the ball), bounds.
        max_queries: the queries per sample, in total (default 10,000).
        basis: ``"dct"`` (default) or ``"pixel"``.
        epsilon: the L2 length of one step (default 0.2, the paper's ImageNet setting in
            [0, 1] pixel units).
        freq_dims: the side of the first block of low frequencies (DCT; default None:
            an eighth of the image side, rounded up: 4 on MNIST, 28 on ImageNet's 224 as
            in the paper).
        stride: the width of each further band of frequencies (DCT; default None: a
            32nd of the side, at least 1: 7 on ImageNet as in the paper's code).
        checkpoints: the query budgets at which the norms are recorded (default 100,
            200, 500, 1000, 2000, 5000, ... below ``max_queries``, and ``max_queries``).
        batch_size: the most images per model call (default 512: larger calls ran slower
            per image on CPU).
        seed: seed of the orders (same seed, same result).
    """

    paper = "Guo et al. 2019, Simple Black-box Adversarial Attacks"
    taxonomy = Taxonomy(knowledge="black box (scores)")
    norms = ("l2",)

    def __init__(self, threat: ThreatModel, *, max_queries: int = 10_000, basis: str = "dct",
                 epsilon: float = 0.2, freq_dims: int | None = None, stride: int | None = None,
                 checkpoints: tuple[int, ...] | list[int] | None = None,
                 batch_size: int | None = 512, seed: int | None = 0) -> None:
        super().__init__(threat, max_queries=max_queries, checkpoints=checkpoints,
                         batch_size=batch_size, seed=seed)
        if basis not in BASES:
            raise ValueError(f"unknown basis {basis!r}: use one of {', '.join(BASES)}")
        if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon (the L2 length of one step) must be > 0 (got "
                             f"{epsilon!r})")
        for name, value in (("freq_dims", freq_dims), ("stride", stride)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, or None for the "
                                 f"default (got {value!r})")
        self.basis = basis
        self.epsilon = float(epsilon)
        self.freq_dims = freq_dims
        self.stride = stride

    def _order(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Per sample, the order of the basis directions (n, C*H*W): indices of (c, u, v)."""
        n, c, h, w = x.shape
        keys = torch.rand((n, c * h * w), device=x.device, generator=generator)
        if self.basis == "dct":
            first = self.freq_dims or math.ceil(min(h, w) / 8)
            stride = self.stride or max(1, min(h, w) // 32)
            u = torch.arange(h, device=x.device)[:, None]
            v = torch.arange(w, device=x.device)[None, :]
            # Band 0: both frequencies below `first`; band k: the k-th ring of width stride.
            band = ((torch.maximum(u, v) - first).clamp_min(-1) // stride + 1).flatten()
            keys = keys + band.repeat(c).to(keys.dtype)
        return keys.argsort(dim=1)

    def _directions(self, index: Tensor, x: Tensor) -> Tensor:
        """The unit basis images of ``index`` (m,), shaped like ``x[0]`` (m, C, H, W)."""
        m, (c, h, w) = len(index), x.shape[1:]
        if self.basis == "pixel":
            return torch.zeros(m, c * h * w, device=x.device, dtype=x.dtype).scatter_(
                1, index[:, None], 1.0).view(m, c, h, w)
        ch, u, v = index // (h * w), index // w % h, index % w
        rows, cols = dct_matrix(h, x), dct_matrix(w, x)
        q = torch.zeros(m, c, h, w, device=x.device, dtype=x.dtype)
        q[torch.arange(m, device=x.device), ch] = rows[u][:, :, None] * cols[v][:, None, :]
        return q

    def _score(self, search: ScoreSearch, scores: Tensor, rows: Tensor) -> Tensor:
        """What the search lowers: p(y), or -p(target)."""
        if search.targets is None:
            return class_log_prob(scores, search.y[rows]).exp()
        return -class_log_prob(scores, search.targets[rows]).exp()

    def _search(self, search: ScoreSearch, rows: Tensor, scores: Tensor,
                generator: torch.Generator | None, **options: Tensor | None) -> Tensor:
        x0 = search.x[rows]
        order = self._order(x0, generator)
        d = order.shape[1]
        current = x0.clone()
        value = self._score(search, scores, rows)
        active = torch.arange(len(rows), device=rows.device)
        k = 0
        while True:
            active = active[~search.found(rows[active]) & (search.left(rows[active]) > 0)]
            if active.numel() == 0:
                return current
            q = self._directions(order[active, k % d], x0)
            k += 1
            improved = torch.zeros(len(active), dtype=torch.bool, device=rows.device)
            for sign in (-1.0, 1.0):
                # A first candidate that reached the goal ends the sample's search, even
                # where its probability rose (another class overtook the true one).
                going = (~improved & ~search.found(rows[active])
                         & (search.left(rows[active]) > 0)).nonzero().squeeze(1)
                if going.numel() == 0:
                    break
                at = active[going]
                candidate = self.threat.project(current[at] + sign * self.epsilon * q[going],
                                                x0[at])
                moved = (candidate - current[at]).flatten(1).abs().amax(dim=1) > 0
                going, at, candidate = going[moved], at[moved], candidate[moved]
                if going.numel() == 0:
                    continue
                new = self._score(search, search.ask(candidate, rows[at]), rows[at])
                better = new < value[at]
                current[at[better]] = candidate[better]
                value[at[better]] = new[better]
                improved[going[better]] = True
