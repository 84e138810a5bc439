"""A3, Adaptive Auto Attack (Liu et al., 2022): margin-loss PGD restarts from adaptive
output-space directions, spending a fixed gradient budget on the images still in play."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from advkit.attacks._logits import margin as cw_margin
from advkit.attacks._logits import top_other_classes
from advkit.attacks.apgd import APGDT
from advkit.attacks.ascent import steepest_direction
from advkit.attacks.base import Attack, Oracle, Taxonomy, goal_reached, require_at_least
from advkit.attacks.square import Square
from advkit.threat import ThreatModel

#: Per restart, the share of the still-unbroken images attacked (the ones whose best margin
#: so far is highest; the rest sit the restart out) and the most steps a restart may take
#: (after its direction steps), as in the authors' schedule for a model on which the
#: biased directions rarely succeed at first. 13 restarts.
KEEP = (1.0, 1.0, 1.0, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.065, 0.03)
MAX_STEPS = (8, 8, 8, 25, 30, 30, 35, 40, 45, 50, 50, 55, 60)
#: How many times each restart of the schedule is repeated (from fresh random starts and
#: directions): the last ones, on the few images closest to breaking, many times.
REPEATS = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, 50)


class A3(Attack):
    """Margin-loss PGD restarts with adaptive direction initialisation and online
    statistics-based discarding, within a total budget of gradient passes.

    Liu, Cheng, Gao, Liu, Zhang, Song. "Practical Evaluation of Adversarial Robustness via
    Adaptive Auto Attack", CVPR 2022. https://arxiv.org/abs/2203.05154

    The run is a sequence of restarts (the authors' schedule: 13 rounds, the last three
    repeated 4, 4 and 50 times; ``KEEP``, ``MAX_STEPS``, ``REPEATS``), each a short PGD on the
    margin ``max_{j != y} z_j - z_y`` from a random point of the ball, with a cosine-annealed
    step (from eps down to eps / 1000, or eps / 10 for 10 steps or fewer). Two ideas make it
    cheaper than a fixed ensemble:

    - **Adaptive direction initialisation (ADI).** From the second restart on, each restart
      first takes ``adi_steps`` full-size steps that raise ``w . z``, a random direction in
      the output space (Tashiro et al.'s output-diversified initialisation) biased towards
      one class: ``w ~ U(-1, 1)^C`` with ``w_y ~ U(-0.5, 0.1)`` and ``w_t = 0.8``, where
      ``t`` is the class of a given rank among the other classes (by the logits at a random
      corner of the ball). The rank changes from restart to restart, tried in the order of
      how often images so far were broken into the class of that rank (the adaptive part:
      the statistics of the run's own successes choose where the next restarts start).
    - **Online statistics-based discarding (OSD).** Each restart attacks only a share of
      the images still unbroken (``KEEP``: all for three restarts, then 70% down to 3%):
      those whose best margin so far is highest, i.e. closest to the boundary; the others
      are set aside for that restart (at least ``keep_min`` images are attacked). The steps
      of a restart are the budget left, spread over the restarts left and the images they
      attack, capped by the schedule (``MAX_STEPS``) and at least ``min_steps``.

    ``budget`` is the average number of gradient passes per attacked image over the whole
    run (the authors' ``average_num``, 100 in their tables); the run stops when it is
    spent. Every pass is counted by the access layer: a step costs one forward and one
    backward pass per image; a sample leaves at its first misclassification. A sample
    never broken gets the point of highest margin it reached.

    **Targeted finish (advkit's addition, off by default).** With ``targeted_share``, the
    restarts are followed by APGD-T (Croce & Hein 2020) on the images still standing whose
    best margin is highest. On the Fashion-MNIST PGD preset (test[:1000], Linf 0.1), 3 of
    the 705 images A3 (budget 200) left were broken by AutoAttack's APGD-T: ranks 1, 2 and
    38 of 705 by margin; advkit's APGD-T on 3 targets breaks two of them.

    **Polish (advkit's addition, off by default).** With ``polish_queries``, the run ends
    with Square (Andriushchenko et al. 2020, gradient free) on the ``polish_share`` of the
    images still unbroken whose best margin is highest: where the gradient restarts came
    closest. On the MNIST PGD preset (test[:1000], Linf 0.3), A3 with budget 400 left 914
    images standing, 4 of which AutoAttack's Square breaks; all 4 were among the 50 of
    highest margin, and Square with 5,000 queries on those 50 broke them (and one more) for
    a twentieth of what Square costs on every image (``benchmarks/square_gap.py``).

    Args:
        threat: norm (linf or l2), eps, bounds.
        budget: gradient passes per image on average (default 100).
        adi_steps: direction steps at the start of each restart after the first
            (default 7, the authors').
        min_steps: the fewest margin steps of a restart (default 15, the authors').
        keep_min: the fewest images a restart attacks (default 100, the authors').
        polish_queries: Square's queries per image in the polish (default 0: none).
        polish_share: the share of the unbroken images the polish attacks (default 0.05).
        targeted_share: the share of the unbroken images (highest margin first) attacked,
            before the polish, by APGD-T on their ``targeted_classes`` most likely other
            classes with ``targeted_steps`` steps each (default 0: none).
        seed: seed of the starts and directions (same seed, same result).
    """

    paper = ("Liu et al. 2022, Practical Evaluation of Adversarial Robustness via Adaptive "
             "Auto Attack")
    taxonomy = Taxonomy(frequency="iterative")
    norms = ("linf", "l2")

    def __init__(self, threat: ThreatModel, *, budget: int = 100, adi_steps: int = 7,
                 min_steps: int = 15, keep_min: int = 100, polish_queries: int = 0,
                 polish_share: float = 0.05, targeted_share: float = 0.0,
                 targeted_classes: int = 3, targeted_steps: int = 100,
                 seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        require_at_least(1, budget=budget, min_steps=min_steps, keep_min=keep_min,
                         targeted_classes=targeted_classes, targeted_steps=targeted_steps)
        require_at_least(0, adi_steps=adi_steps, polish_queries=polish_queries)
        if not 0 < polish_share <= 1:
            raise ValueError(f"polish_share must be in (0, 1] (got {polish_share!r})")
        if not 0 <= targeted_share <= 1:
            raise ValueError(f"targeted_share must be in [0, 1] (got {targeted_share!r})")
        self.targeted_share = float(targeted_share)
        self.targeted_classes = targeted_classes
        self.targeted_steps = targeted_steps
        self.polish_queries = polish_queries
        self.polish_share = float(polish_share)
        self.budget = budget
        self.adi_steps = adi_steps
        self.min_steps = min_steps
        self.keep_min = keep_min

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor, generator: torch.Generator | None) -> Tensor:
        if targets is not None:
            raise ValueError("A3 is untargeted (its goal is any misclassification); for a "
                             "target of your choice use APGD(threat, loss='dlr') with targets=")
        n, classes = clean_logits.shape
        best = x.clone()
        best_margin = torch.full((n,), -math.inf, device=x.device, dtype=clean_logits.dtype)
        alive = ~goal_reached(clean_logits, y, None)
        todo = alive.nonzero().squeeze(1)
        if todo.numel() == 0:
            return best
        # The other classes ranked by the logits at a random corner of the Linf ball (the
        # authors'; at x itself for L2): the ranking ADI's directions follow. The corner
        # is the first candidate, and may already be adversarial.
        logits = clean_logits[todo]
        if self.threat.norm == "linf":
            u = torch.rand(x[todo].shape, generator=generator, device=x.device, dtype=x.dtype)
            corner = self.threat.project(x[todo] + self.threat.eps * (2 * u - 1).sign(),
                                         x[todo])
            logits = model.logits(corner, rows=todo)
            best[todo] = corner
        ranked = torch.zeros((n, classes - 1), dtype=torch.long, device=x.device)
        ranked[todo] = top_other_classes(logits, y[todo], classes - 1)
        best_margin[todo] = _margin(logits, y[todo])
        alive[todo[logits.argmax(1) != y[todo]]] = False
        # How often an image was broken into the class of each rank: ADI's statistics.
        hits = torch.zeros(classes - 1, device=x.device)
        total = self.budget * int(todo.numel())
        spent = model.backward_passes  # gradient passes, as the access layer counts them
        schedule = [(r, keep, cap) for r, (keep, cap, times) in
                    enumerate(zip(KEEP, MAX_STEPS, REPEATS, strict=True)) for _ in range(times)]
        for i, (r, keep, cap) in enumerate(schedule):
            standing = alive.nonzero().squeeze(1)
            left = total - (model.backward_passes - spent)
            if standing.numel() == 0 or left <= 0:
                break
            share = min(standing.numel(),
                        max(self.keep_min, math.ceil(keep * standing.numel())))
            attacked = standing[best_margin[standing].argsort(descending=True)[:share]]
            adi = self.adi_steps if r else 0
            steps = left // ((len(schedule) - i) * attacked.numel())
            steps = min(max(min(steps, cap + adi), self.min_steps), left // attacked.numel())
            if steps < 1:
                break
            adi = min(adi, steps // 2)  # a short restart keeps half its steps for the margin
            # ADI's class for this restart: the ranks in the order of their successes so
            # far (ties: the higher ranked first), taken in turn as the restarts go on.
            target = None
            if adi:
                order = sorted(range(classes - 1), key=lambda k: (-float(hits[k]), k))
                target = ranked[attacked, order[(i - 1) % (classes - 1)]]
            adv, margin, into = self._restart(model, x[attacked], y[attacked], attacked,
                                              ranked[attacked], target, steps, adi, generator)
            better = (margin > best_margin[attacked]) | (into >= 0)
            best[attacked[better]], best_margin[attacked[better]] = adv[better], margin[better]
            alive[attacked[into >= 0]] = False
            hits += torch.bincount(into[into >= 0], minlength=classes - 1).to(hits.dtype)
        standing = alive.nonzero().squeeze(1)
        if self.targeted_share and standing.numel():
            # Targeted APGD (AutoAttack's APGD-T) on the images nearest the boundary: an
            # untargeted margin can stall between two near classes that a fixed target
            # separates (Fashion-MNIST's shirt/coat/pullover).
            share = max(1, math.ceil(self.targeted_share * standing.numel()))
            near = standing[best_margin[standing].argsort(descending=True)[:share]]
            targeted = APGDT(self.threat, steps=self.targeted_steps,
                             n_target_classes=min(self.targeted_classes, classes - 1),
                             seed=self.seed)
            found = targeted._run(model.view(near), x[near], y[near], None,
                                  clean_logits[near], generator)
            logits = model.logits(found, rows=near)
            won = logits.argmax(1) != y[near]
            best[near[won]] = found[won]
            margin = _margin(logits, y[near])
            better = ~won & (margin > best_margin[near])
            best[near[better]], best_margin[near[better]] = found[better], margin[better]
            alive[near[won]] = False
            standing = alive.nonzero().squeeze(1)
        if self.polish_queries and standing.numel():
            share = max(1, math.ceil(self.polish_share * standing.numel()))
            near = standing[best_margin[standing].argsort(descending=True)[:share]]
            square = Square(self.threat, n_queries=self.polish_queries, seed=self.seed)
            found = square._run(model.view(near), x[near], y[near], None, clean_logits[near],
                                generator)
            won = model.logits(found, rows=near).argmax(1) != y[near]
            best[near[won]] = found[won]
        return best

    def _restart(self, model: Oracle, x: Tensor, y: Tensor, rows: Tensor, ranked: Tensor,
                 target: Tensor | None, steps: int, adi: int,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """One restart on the samples ``rows`` (``x``, ``y`` theirs): ``adi`` steps up
        ``w . z``, then margin steps with a cosine step size. Returns each sample's point
        of highest margin, that margin, and the rank (in ``ranked``) of the class it was
        broken into, -1 where it was not."""
        m, eps = x.shape[0], self.threat.eps
        xk = self.threat.random_start(x, generator)
        out = xk.clone()
        out_margin = torch.full((m,), -math.inf, device=x.device, dtype=x.dtype)
        into = torch.full((m,), -1, dtype=torch.long, device=x.device)
        idx = torch.arange(m, device=x.device)
        w = None
        if adi:
            every = torch.arange(m, device=x.device)
            w = 2 * torch.rand((m, ranked.shape[1] + 1), generator=generator,
                               device=x.device, dtype=x.dtype) - 1
            w[every, y] = torch.rand(m, generator=generator, device=x.device,
                                     dtype=x.dtype) * 0.6 - 0.5
            w[every, target] = 0.8
        low = eps * (0.1 if steps - adi <= 10 else 1e-3)
        for k in range(steps + 1):
            if k == steps:
                logits, grad = model.logits(xk, rows=rows[idx]), None
            elif k < adi:
                wk = w[idx]
                logits, grad = model.gradient(xk, lambda z, wk=wk: (z * wk).sum(1),
                                              rows=rows[idx])
            else:
                yk = y[idx]
                logits, grad = model.gradient(xk, lambda z, yk=yk: _margin(z, yk),
                                              rows=rows[idx])
            margin = _margin(logits, y[idx])
            better = margin > out_margin[idx]
            out[idx[better]], out_margin[idx[better]] = xk[better], margin[better]
            done = logits.argmax(1) != y[idx]
            if done.any():
                hit = idx[done]
                into[hit] = (ranked[hit] == logits[done].argmax(1)[:, None]).int().argmax(1)
                # The point that broke it is the one returned.
                out[hit], out_margin[hit] = xk[done], margin[done].clamp_min(0)
                idx, xk = idx[~done], xk[~done]
                grad = grad[~done] if grad is not None else None
            if idx.numel() == 0 or k == steps:
                break
            if k < adi:
                size = eps
            else:
                s = k - adi
                size = low + (eps - low) * (1 + math.cos(math.pi * s / (steps - adi + 1))) / 2
            xk = self.threat.project(xk + size * steepest_direction(grad, self.threat.norm),
                                     x[idx])
        return out, out_margin, into


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """``max_{j != y} z_j - z_y``: positive once the image is misclassified (the negated
    untargeted C&W margin of :func:`advkit.attacks._logits.margin`)."""
    return -cw_margin(logits, y, None)
