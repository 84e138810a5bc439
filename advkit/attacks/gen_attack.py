"""GenAttack (Alzantot et al., 2019): score-based genetic search in the Linf ball."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from advkit.attacks._decision import check_count
from advkit.attacks._population import PopulationAttack, evaluate, first_hit, left
from advkit.attacks.base import Oracle, Taxonomy
from advkit.threat import ThreatModel

#: Fitness values are clipped to this magnitude: a score the black box hides (-inf) makes
#: a log-probability infinite, and the selection's softmax needs finite values.
_FITNESS_CAP = 1e4


def fitness(logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
    """GenAttack's fitness from the log-probabilities, to maximise (per row).

    Targeted (the paper's): ``log p_t - log sum_{j != t} p_j``. Untargeted, the mirror
    image: ``log sum_{j != y} p_j - log p_y``. Both are positive exactly where the class
    holds more than half of the probability (targeted) or less than half (untargeted).
    """
    logp = logits.log_softmax(dim=1)
    cls = (targets if targets is not None else y).view(-1, 1)
    mine = logp.gather(1, cls).squeeze(1)
    # log of the others' total, summed in log space: log1p(-p) loses everything once the
    # class holds all but 1e-8 of the probability, which a confident model often does.
    others = logp.scatter(1, cls, -math.inf).logsumexp(dim=1)
    value = mine - others if targets is not None else others - mine
    return value.clamp(-_FITNESS_CAP, _FITNESS_CAP)


class GenAttack(PopulationAttack):
    """A genetic algorithm over Linf perturbations, guided by the model's scores.

    Alzantot, Sharma, Chakraborty, Zhang, Hsieh, Srivastava. "GenAttack: Practical
    Black-box Attacks with Gradient-Free Optimization", GECCO 2019.
    https://arxiv.org/abs/1805.11090

    Score-based black box (``advkit.models.scores_only(model)`` is enough). Per image, a
    population of ``population`` perturbations starts uniform in the eps-ball. Each
    generation (the paper's Algorithm 1):

    1. every member's :func:`fitness` comes from the log-probabilities (one query each);
    2. the fittest member (the elite) passes on unchanged, and its fitness is known, so
       it costs no query again: a generation costs ``population - 1`` queries, the first
       ``population``;
    3. the other members are children of two parents drawn with probabilities
       ``softmax(fitness / temperature)``; a child takes each value from the first parent
       with probability ``p1 / (p1 + p2)`` (the parents' selection probabilities, as the
       authors' code does), else from the second;
    4. each value of a child mutates with probability ``rho`` by ``U(-alpha eps, alpha
       eps)``; the child is projected onto the ball and the box.

    Adaptive parameter scaling (``adaptive=True``, the paper's): ``rho = max(rho_min, 0.5 *
    0.9^k)`` and ``alpha = max(alpha_min, 0.4 * 0.9^k)``, where ``k`` counts the plateaus:
    stretches of ``plateau`` generations in which the image's best fitness did not rise.
    Early generations explore widely; later ones refine. Without it, ``rho`` and ``alpha``
    stay at ``mutation_probability`` and ``mutation_range``.

    Dimensionality reduction (the paper's for ImageNet): ``reduced_size=(h, w)`` evolves
    perturbations of that size, upsampled bilinearly to the image (a convex combination,
    so still inside the ball) before they are added.

    Batched: the children of every image still under attack go to the model in one oracle
    call per generation, each charged to its image. An image leaves as soon as a member
    reaches its goal (that member is returned; the fittest one if several do) or when its
    budget cannot pay another generation (its elite is returned). Samples the model gets
    wrong already cost only the first look.

    ``result.queries`` per sample: the first look at ``x`` (1) and the members evaluated, together
    at most ``max_queries``, then the final success pass (1): give
    ``scores_only(model, budget=max_queries + 1)`` at least.

    Args:
        threat: linf, eps (the paper: 0.3 on MNIST, 0.05 on CIFAR-10 and ImageNet), bounds.
        max_queries: the queries per sample, in total (default 10,000).
        population: members per image, the elite included (default 6, the paper's).
        mutation_probability: ``rho_min``, the least probability that a value mutates
            (default 0.05).
        mutation_range: ``alpha_min``, the least mutation size as a fraction of eps
            (default 0.15, the paper's).
        temperature: ``tau``, the selection's softmax temperature (default 0.3).
        adaptive: scale ``rho`` and ``alpha`` down at each plateau (default True).
        plateau: generations without a rise of the best fitness that make a plateau
            (default 100).
        reduced_size: ``(h, w)`` (or one int for both) of the evolved perturbation, or None
            (default) for the image's own size.
        batch_size: the most images per model call (default 512).
        seed: seed of the population and the genetic operators (same seed, same result).
    """

    paper = ("Alzantot et al. 2019, GenAttack: Practical Black-box Attacks with "
             "Gradient-Free Optimization")
    taxonomy = Taxonomy(knowledge="black box (scores)")
    norms = ("linf",)

    def __init__(self, threat: ThreatModel, *, max_queries: int = 10_000, population: int = 6,
                 mutation_probability: float = 0.05, mutation_range: float = 0.15,
                 temperature: float = 0.3, adaptive: bool = True, plateau: int = 100,
                 reduced_size: int | tuple[int, int] | None = None,
                 batch_size: int | None = 512, seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        self.population = check_count("population", population, least=2)
        self.max_queries = check_count("max_queries", max_queries)
        if max_queries < population + 1:
            raise ValueError(f"max_queries={max_queries} cannot pay for the first look at x "
                             f"and the first generation of {population} members: give at "
                             f"least {population + 1}")
        for name, value in (("mutation_probability", mutation_probability),
                            ("mutation_range", mutation_range)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1] (got {value})")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0 (got {temperature}); lower is greedier")
        self.mutation_probability = float(mutation_probability)
        self.mutation_range = float(mutation_range)
        self.temperature = float(temperature)
        self.adaptive = bool(adaptive)
        self.plateau = check_count("plateau", plateau)
        if isinstance(reduced_size, int) and not isinstance(reduced_size, bool):
            reduced_size = (reduced_size, reduced_size)
        if reduced_size is not None:
            if (not isinstance(reduced_size, tuple | list) or len(reduced_size) != 2
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                               for s in reduced_size)):
                raise ValueError(f"reduced_size must be (height, width) in pixels, one int "
                                 f"for both, or None (got {reduced_size!r})")
            reduced_size = (int(reduced_size[0]), int(reduced_size[1]))
        self.reduced_size = reduced_size
        self.batch_size = None if batch_size is None else check_count("batch_size", batch_size)

    def _evolve(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
                idx: Tensor, out: Tensor, found_at: Tensor,
                generator: torch.Generator | None) -> None:
        c, h, w = x.shape[1:]
        if self.reduced_size is not None and (self.reduced_size[0] > h
                                              or self.reduced_size[1] > w):
            raise ValueError(f"reduced_size={self.reduced_size} is larger than the images "
                             f"({h}, {w}): give a smaller size or None")
        shape = (c, *(self.reduced_size or (h, w)))
        size, eps = self.population, self.threat.eps
        n = idx.numel()
        xa, ya = x[idx], y[idx]
        ta = targets[idx] if targets is not None else None
        opts = {"device": x.device, "dtype": x.dtype, "generator": generator}

        delta = self._project((torch.rand(n, size, *shape, **opts) * 2 - 1) * eps, xa)
        fit, hit = self._ask(model, idx, xa, ya, ta, delta)
        best = fit.max(dim=1).values
        stale = torch.zeros(n, dtype=torch.long, device=x.device)
        plateaus = torch.zeros_like(stale)
        while True:
            done, pick = first_hit(hit, fit)
            rows = torch.arange(len(idx), device=x.device)
            elite, elite_fit = delta[rows, pick], fit[rows, pick]
            found_at[idx[done]] = model.queries[idx[done]]
            stop = done | (left(model, idx, self.max_queries) < size - 1)
            if stop.any():
                out[idx[stop]] = self._images(xa[stop], elite[stop].unsqueeze(1))
                keep = ~stop
                idx, xa, ya, delta, fit, elite, elite_fit, best, stale, plateaus = (
                    t[keep] for t in (idx, xa, ya, delta, fit, elite, elite_fit, best, stale,
                                      plateaus))
                ta = ta[keep] if ta is not None else None
                if idx.numel() == 0:
                    return
            n = idx.numel()
            rho, alpha = self._rates(plateaus)
            probs = (fit / self.temperature).softmax(dim=1)
            parents = torch.multinomial(probs, 2 * (size - 1), replacement=True,
                                        generator=generator)
            first, second = parents[:, :size - 1], parents[:, size - 1:]
            p1, p2 = probs.gather(1, first), probs.gather(1, second)
            take_first = p1 / (p1 + p2)
            rows = torch.arange(n, device=x.device)[:, None]
            mask = torch.rand(n, size - 1, *shape, **opts) < _expand(take_first, len(shape))
            children = torch.where(mask, delta[rows, first], delta[rows, second])
            mutate = torch.rand(n, size - 1, *shape, **opts) < _expand(rho, len(shape) + 1)
            step = (torch.rand(n, size - 1, *shape, **opts) * 2 - 1) * _expand(
                alpha * eps, len(shape) + 1)
            children = self._project(children + mutate * step, xa)
            child_fit, child_hit = self._ask(model, idx, xa, ya, ta, children)
            delta = torch.cat([elite.unsqueeze(1), children], dim=1)
            fit = torch.cat([elite_fit.unsqueeze(1), child_fit], dim=1)
            hit = torch.cat([torch.zeros_like(child_hit[:, :1]), child_hit], dim=1)
            now = fit.max(dim=1).values
            rose = now > best
            best = torch.maximum(best, now)
            stale = torch.where(rose, 0, stale + 1)
            flat = stale >= self.plateau
            plateaus = plateaus + flat.long()
            stale = torch.where(flat, 0, stale)

    def _rates(self, plateaus: Tensor) -> tuple[Tensor, Tensor]:
        """Per image: the mutation probability ``rho`` and range ``alpha`` (of eps)."""
        rho = torch.full(plateaus.shape, self.mutation_probability, device=plateaus.device)
        alpha = torch.full(plateaus.shape, self.mutation_range, device=plateaus.device)
        if self.adaptive:
            decay = 0.9 ** plateaus.float()
            rho, alpha = torch.maximum(rho, 0.5 * decay), torch.maximum(alpha, 0.4 * decay)
        return rho, alpha

    def _project(self, delta: Tensor, x: Tensor) -> Tensor:
        """Onto the ball; at full size also onto the box, so that no mutation is spent where
        the box would clip it away (the paper's projection). A reduced perturbation is
        clipped to the box after upsampling (:meth:`_images`)."""
        eps = self.threat.eps
        if self.reduced_size is not None:
            return delta.clamp(-eps, eps)
        lo, hi = self.threat.bounds
        xs = x.unsqueeze(1)
        return torch.minimum(torch.maximum(delta, (lo - xs).clamp_min(-eps)),
                             (hi - xs).clamp_max(eps))

    def _images(self, x: Tensor, delta: Tensor) -> Tensor:
        """The images of members ``delta`` (n, M, *shape) of images ``x`` (n, C, H, W):
        (n * M, C, H, W), inside the ball and the box."""
        m = delta.shape[1]
        d = delta.flatten(0, 1)
        if self.reduced_size is not None:
            d = F.interpolate(d, size=x.shape[2:], mode="bilinear", align_corners=False)
        xs = x.repeat_interleave(m, dim=0)
        return self.threat.project(xs + d, xs)

    def _ask(self, model: Oracle, idx: Tensor, x: Tensor, y: Tensor, targets: Tensor | None,
             delta: Tensor) -> tuple[Tensor, Tensor]:
        """Fitness and goal (n, M) of the members ``delta`` (n, M, *shape), one query each."""
        n, m = delta.shape[:2]
        ys = y.repeat_interleave(m)
        ts = targets.repeat_interleave(m) if targets is not None else None
        logits, hit = evaluate(model, self._images(x, delta), idx.repeat_interleave(m), ys, ts,
                               self.batch_size)
        return fitness(logits, ys, ts).view(n, m), hit.view(n, m)


def _expand(t: Tensor, dims: int) -> Tensor:
    """``t`` with ``dims`` trailing singleton dimensions."""
    return t.view(*t.shape, *([1] * dims))
