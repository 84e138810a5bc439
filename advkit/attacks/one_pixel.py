"""One Pixel Attack (Su, Vargas & Sakurai, 2019): differential evolution over a few pixels."""

from __future__ import annotations

import torch
from torch import Tensor

from advkit.attacks._decision import check_count
from advkit.attacks._population import PopulationAttack, evaluate, first_hit, left
from advkit.attacks._score import class_log_prob
from advkit.attacks.base import Oracle, Taxonomy
from advkit.threat import ThreatModel


def objective(logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
    """The paper's fitness, to maximise: the target's probability (targeted), or minus the
    true class's (untargeted), as log-probabilities.

    Differential evolution only compares candidates of the same image, so any increasing
    function of the paper's probabilities gives the same search; the logarithm keeps
    apart what float32 probabilities round to 1.0 on a confident model. Scores hidden by
    a top-k view are bounded as :func:`advkit.attacks._score.class_log_prob` does.
    """
    if targets is not None:
        return class_log_prob(logits, targets)
    return -class_log_prob(logits, y)


def others(n: int, size: int, k: int, device: torch.device,
           generator: torch.Generator | None) -> Tensor:
    """For each of ``size`` members of ``n`` populations, ``k`` distinct member indices
    other than its own, uniform: (n, size, k).

    Each draw picks uniformly among the indices not yet taken (a draw ``u`` in
    ``[0, size - taken)`` is mapped to the ``u``-th free index), so no rejection loop.
    """
    taken = torch.arange(size, device=device).view(1, size, 1).expand(n, size, 1)
    for j in range(k):
        u = torch.randint(0, size - 1 - j, (n, size), device=device, generator=generator)
        # Step over the taken indices in increasing order: u becomes the u-th free index.
        for column in taken.sort(dim=2).values.unbind(dim=2):
            u = u + (u >= column)
        taken = torch.cat([taken, u.unsqueeze(2)], dim=2)
    return taken[:, :, 1:]


class OnePixel(PopulationAttack):
    """Change ``pixels`` pixels, found by differential evolution on the model's scores.

    Su, Vargas, Sakurai. "One Pixel Attack for Fooling Deep Neural Networks", IEEE
    Transactions on Evolutionary Computation 2019. https://arxiv.org/abs/1710.08864

    Score-based black box (``advkit.models.scores_only(model)`` is enough). A candidate is
    ``pixels`` tuples ``(row, col, value per channel)``; its image is ``x`` with those
    pixels set to those values (all channels of a pixel). The search is the paper's
    differential evolution, DE/rand/1 without crossover: each generation, member ``i``
    proposes ``a + F (b - c)`` from three other members ``a, b, c`` drawn at random, and
    the proposal replaces it if its fitness is at least as good. Fitness: the paper's
    probabilities (:func:`objective`). The first population is the paper's: coordinates
    uniform over the image, values Gaussian around the middle of the box (mean and
    standard deviation half its width, as ``N(128, 127)`` on 0-255), clipped into it. A
    coordinate that leaves the image is drawn again uniformly (scipy's rule); a value
    that leaves the box is clipped.

    Threat model: an L0 attack, and advkit's threat models have no L0 norm, so the L0
    budget is ``pixels``; the threat model is ``linf`` and its eps caps the change of each
    value (``ThreatModel("linf", 1.0)``: any value, the paper's setting).
    ``result.extras["l0"]`` holds the number of pixels changed per sample (at most
    ``pixels``; fewer when two coincide).

    Batched: the proposals of every image still under attack go to the model in one
    oracle call per generation, each charged to its image; images leave as soon as one
    candidate reaches the goal (it is returned), or when the budget is spent (the fittest
    candidate is returned). A generation the budget cannot pay for in full evaluates the
    proposals it can pay for, so the whole budget is used.

    ``result.queries`` per sample: the first look at ``x`` (1) and the candidates evaluated,
    together at most ``max_queries``, then the final success pass (1): give
    ``scores_only(model, budget=max_queries + 1)`` at least.

    Args:
        threat: linf and the cap eps on each changed value (1.0: any value), bounds.
        pixels: the pixels changed, ``d`` (default 1; the paper also reports 3 and 5).
        max_queries: the queries per sample, in total (default 10,000).
        population: candidates per image (default 100; the paper's is 400, which leaves
            only 24 generations in 10,000 queries: on the MNIST test model 100 reached
            more images within every budget of 1,000 to 10,000).
        scale: the mutation factor ``F`` (default 0.5, the paper's).
        batch_size: the most images per model call (default 512).
        seed: seed of the population and the draws (same seed, same result).
    """

    paper = "Su, Vargas & Sakurai 2019, One Pixel Attack for Fooling Deep Neural Networks"
    taxonomy = Taxonomy(knowledge="black box (scores)")
    norms = ("linf",)

    def __init__(self, threat: ThreatModel, *, pixels: int = 1, max_queries: int = 10_000,
                 population: int = 100, scale: float = 0.5, batch_size: int | None = 512,
                 seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        self.pixels = check_count("pixels", pixels)
        self.max_queries = check_count("max_queries", max_queries, least=2)
        # DE/rand/1 draws three members besides the one it replaces.
        self.population = check_count("population", population, least=4)
        if not 0 < scale <= 2:
            raise ValueError(f"scale (DE's F) must be in (0, 2] (got {scale}); the paper "
                             "uses 0.5")
        self.scale = float(scale)
        self.batch_size = None if batch_size is None else check_count("batch_size", batch_size)

    def _extras(self, x: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        return {"l0": (x_adv != x).any(dim=1).flatten(1).sum(dim=1)}

    def _evolve(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
                idx: Tensor, out: Tensor, found_at: Tensor,
                generator: torch.Generator | None) -> None:
        size = self.population
        n = idx.numel()
        xa, ya = x[idx], y[idx]
        ta = targets[idx] if targets is not None else None
        pop = self._initial(n, x, generator)
        fit = torch.full((n, size), -torch.inf, device=x.device)
        candidates = pop
        while True:
            # Evaluate the first `count` candidates of each image: all of them while the
            # budget lasts, what it can pay for in the last generation.
            count = left(model, idx, self.max_queries).clamp(max=size)
            asked = torch.arange(size, device=x.device)[None, :] < count[:, None]
            value = torch.full((len(idx), size), -torch.inf, device=x.device)
            hit = torch.zeros((len(idx), size), dtype=torch.bool, device=x.device)
            owner = asked.nonzero()[:, 0]
            if owner.numel():
                logits, reached = evaluate(
                    model, self._render(xa[owner], candidates[asked]), idx[owner], ya[owner],
                    ta[owner] if ta is not None else None, self.batch_size)
                value[asked] = objective(logits, ya[owner],
                                         ta[owner] if ta is not None else None)
                hit[asked] = reached
            # Selection: a candidate replaces its parent when at least as fit (ties move
            # the population along plateaus of the fitness, as scipy's DE does).
            better = asked & (value >= fit)
            pop = torch.where(better[..., None, None], candidates, pop)
            fit = torch.where(better, value, fit)
            done, pick = first_hit(hit, value)
            rows = torch.arange(len(idx), device=x.device)
            best = torch.where(done[:, None, None], candidates[rows, pick],
                               pop[rows, fit.argmax(dim=1)])
            found_at[idx[done]] = model.queries[idx[done]]
            stop = done | (left(model, idx, self.max_queries) < 1)
            if stop.any():
                out[idx[stop]] = self._render(xa[stop], best[stop])
                keep = ~stop
                idx, xa, ya, pop, fit = (t[keep] for t in (idx, xa, ya, pop, fit))
                ta = ta[keep] if ta is not None else None
                if idx.numel() == 0:
                    return
            candidates = self._propose(pop, x, generator)

    def _initial(self, n: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The first population (n, size, pixels, 2 + C): rows, columns, values."""
        c, h, w = x.shape[1:]
        lo, hi = self.threat.bounds
        opts = {"device": x.device, "dtype": x.dtype, "generator": generator}
        shape = (n, self.population, self.pixels)
        where = torch.rand(*shape, 2, **opts) * torch.tensor([h, w], device=x.device,
                                                             dtype=x.dtype)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        values = (mid + half * torch.randn(*shape, c, **opts)).clamp(lo, hi)
        return torch.cat([where, values], dim=3)

    def _propose(self, pop: Tensor, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """DE/rand/1: ``a + F (b - c)`` for every member, from three others."""
        n, size = pop.shape[:2]
        h, w = x.shape[2:]
        abc = others(n, size, 3, pop.device, generator)
        rows = torch.arange(n, device=pop.device)[:, None]
        a, b, c = (pop[rows, abc[:, :, j]] for j in range(3))
        trial = a + self.scale * (b - c)
        where, values = trial[..., :2], trial[..., 2:]
        limit = torch.tensor([h, w], device=pop.device, dtype=pop.dtype)
        outside = (where < 0) | (where >= limit)
        fresh = torch.rand(where.shape, device=pop.device, dtype=pop.dtype,
                           generator=generator) * limit
        where = torch.where(outside, fresh, where)
        return torch.cat([where, values.clamp(*self.threat.bounds)], dim=-1)

    def _render(self, x: Tensor, candidates: Tensor) -> Tensor:
        """Images (m, C, H, W) of ``x`` (m, C, H, W) with each candidate's pixels set
        (``candidates``: (m, pixels, 2 + C)), each value kept within eps of the original."""
        m, c, h, w = x.shape
        image = x.flatten(2).clone()
        flat = x.flatten(2)
        rows = candidates[..., 0].long().clamp(0, h - 1)
        cols = candidates[..., 1].long().clamp(0, w - 1)
        where = (rows * w + cols).unsqueeze(1).expand(m, c, self.pixels)
        eps = self.threat.eps
        original = flat.gather(2, where)
        values = candidates[..., 2:].transpose(1, 2)
        values = torch.minimum(torch.maximum(values, original - eps), original + eps)
        # One pixel at a time: where two candidates' pixels coincide the later one wins on
        # every device (a scatter with repeated indices has no defined winner).
        for k in range(self.pixels):
            image.scatter_(2, where[:, :, k:k + 1], values[:, :, k:k + 1])
        return image.view_as(x)
