"""NES attacks (Ilyas et al., 2018): gradients estimated from scores, PGD on the estimate."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from advkit.attacks._score import ScoreAttack, ScoreSearch, class_log_prob
from advkit.attacks.base import Taxonomy
from advkit.threat import ThreatModel


class NES(ScoreAttack):
    """PGD on a gradient estimated by Natural Evolution Strategies from the model's scores.

    Ilyas, Engstrom, Athalye, Lin. "Black-box Adversarial Attacks with Limited Queries and
    Information", ICML 2018. https://arxiv.org/abs/1804.08598

    Needs only the model's scores (``advkit.models.scores_only(model)``, all or the top k).
    The objective is the log-probability of the true class, lowered (targeted: of the
    target, raised), from the softmax of the scores the model shows.

    **Query-limited** (the paper's first setting): each iteration estimates the gradient at
    the current point ``x_t`` from ``samples`` probes ``x_t +- sigma u_i`` (antithetic
    pairs, ``u_i`` standard Gaussian): ``g = sum_i (F(x_t + sigma u_i) - F(x_t - sigma u_i))
    u_i / (samples sigma)``; smooths it with momentum (``g_t = momentum g_{t-1} + (1 -
    momentum) g``, as the paper's code); steps by ``step_size`` along ``sign(g_t)`` (Linf)
    or ``g_t / ||g_t||`` (L2); projects into the eps-ball and the box; and asks the new
    point (one query). Probes are projected into the ball and the box too (the estimate is
    that of the objective where the search may go), so each costs a query on a valid
    point. An iteration costs ``samples + 1`` queries; a sample stops at its goal, or when
    it cannot pay for another iteration.

    **Partial information** (targeted, Linf; the paper's second setting, for a model that
    shows only its top k scores: ``scores_only(model, top_k=k)``): start from an image the
    model gives the target, inside a large Linf box around ``x`` (radius its Linf distance,
    at most 1), and shrink the box while keeping the target among the classes shown. Each
    iteration estimates the gradient of the target's log-probability as above, then tries
    the step ``x_t + lr sign(g)`` in a box shrunk by ``delta_eps``, with ``lr`` from
    ``max_lr`` halved down to ``min_lr`` (one query each, batched over the samples), until
    the target stays shown; if no ``lr`` keeps it, ``delta_eps`` is halved (the paper's
    Algorithm 1). Once the box is down to eps the query-limited steps finish the job. The
    start: ``attack(model, x, y, targets=t, starting_points=s)``, or else the closest
    input of the batch whose first look showed the target as the top class (no query);
    a sample with neither starts from ``x`` with the query-limited steps (warned).
    ``partial=None`` (default) takes this schedule for targeted Linf attacks on a model
    that hides scores (seen in the first look), else the query-limited one.

    The paper's third setting (label-only: a proxy score from the labels of noisy samples)
    is not implemented; a label-only model is refused with a pointer to the
    decision-based attacks.

    ``result.queries`` per sample: the first look at ``x`` (1), the search (together at most
    ``max_queries``) and the final success pass (1). Batched: the probes of every active
    sample go to the model in one call per iteration, each charged to its sample.
    ``result.extras``: ``norm_at_queries`` and ``queries_to_success`` (see SimBA).

    Args:
        threat: norm (``linf`` or ``l2``), eps, bounds.
        max_queries: the queries per sample, in total (default 10,000).
        samples: probes per gradient estimate, even (default 50, the paper's).
        sigma: the probe radius (default 0.001, the paper's, in [0, 1] pixel units).
        step_size: the query-limited step (default None: eps / 5, the paper's ImageNet
            ratio 0.01 / 0.05).
        momentum: the gradient's momentum (default 0.9, the paper's code; 0 for none).
        partial: True / False forces the partial-information schedule on or off;
            None (default) decides per call as described.
        delta_eps: the partial-information box's first shrink per step (default 0.5).
        max_lr, min_lr: the partial-information step sizes tried, from the largest,
            halved down to the smallest (defaults 0.01 and 5e-5).
        checkpoints: the query budgets at which the norms are recorded.
        batch_size: the most images per model call (default 512: larger calls ran slower
            per image on CPU).
        seed: seed of the probes (same seed, same result).
    """

    paper = ("Ilyas et al. 2018, Black-box Adversarial Attacks with Limited Queries and "
             "Information")
    taxonomy = Taxonomy(knowledge="black box (scores)")
    norms = ("linf", "l2")
    call_options = ("starting_points",)

    def __init__(self, threat: ThreatModel, *, max_queries: int = 10_000, samples: int = 50,
                 sigma: float = 0.001, step_size: float | None = None, momentum: float = 0.9,
                 partial: bool | None = None, delta_eps: float = 0.5, max_lr: float = 0.01,
                 min_lr: float = 5e-5,
                 checkpoints: tuple[int, ...] | list[int] | None = None,
                 batch_size: int | None = 512, seed: int | None = 0) -> None:
        super().__init__(threat, max_queries=max_queries, checkpoints=checkpoints,
                         batch_size=batch_size, seed=seed)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2 or (
                samples % 2):
            raise ValueError(f"samples must be an even integer >= 2 (antithetic pairs) (got "
                             f"{samples!r})")
        for name, value in (("sigma", sigma), ("delta_eps", delta_eps), ("max_lr", max_lr),
                            ("min_lr", min_lr)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0 (got {value!r})")
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"step_size must be > 0, or None for eps / 5 (got {step_size!r})")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1) (got {momentum!r})")
        if min_lr > max_lr:
            raise ValueError(f"min_lr must be <= max_lr (got {min_lr} > {max_lr})")
        if partial and threat.norm != "linf":
            raise ValueError("the partial-information schedule shrinks a Linf box (the "
                             "paper's); use norm='linf', or partial=False for L2")
        self.samples = samples
        self.sigma = float(sigma)
        self.step_size = step_size
        self.momentum = float(momentum)
        self.partial = partial
        self.delta_eps = float(delta_eps)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)

    # -- the pieces ----------------------------------------------------------------------
    def _objective(self, search: ScoreSearch, scores: Tensor, rows: Tensor) -> Tensor:
        """What the search raises: log p(target), or -log p(y)."""
        if search.targets is None:
            return -class_log_prob(scores, search.y[rows])
        return class_log_prob(scores, search.targets[rows])

    def _gradient(self, search: ScoreSearch, rows: Tensor, at: Tensor, radius: Tensor,
                  generator: torch.Generator | None) -> Tensor:
        """The NES estimate of the objective's gradient at ``at`` (one per row): one call of
        ``samples`` antithetic probes each, projected into the ball of ``radius`` (per row)
        around ``x`` and the box."""
        m, half = len(rows), self.samples // 2
        u = torch.randn((m, half, *at.shape[1:]), device=at.device, dtype=at.dtype,
                        generator=generator)
        u = torch.cat([u, -u], dim=1)
        x0 = search.x[rows]
        probes = self.threat.project((at[:, None] + self.sigma * u).flatten(0, 1),
                                     x0.repeat_interleave(self.samples, dim=0),
                                     radius.repeat_interleave(self.samples))
        owners = rows.repeat_interleave(self.samples)
        value = self._objective(search, search.ask(probes, owners), owners)
        value = value.view(m, self.samples)
        # Antithetic pairs: each pair's difference, so a constant baseline cancels.
        diff = value[:, :half] - value[:, half:]
        grad = (diff.view(m, half, *([1] * (at.dim() - 1))) * u[:, :half]).sum(dim=1)
        return grad / (self.samples * self.sigma)

    def _direction(self, grad: Tensor) -> Tensor:
        if self.threat.norm == "linf":
            return grad.sign()
        size = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return grad / size.view(-1, *([1] * (grad.dim() - 1)))

    # -- the search ----------------------------------------------------------------------
    def _search(self, search: ScoreSearch, rows: Tensor, scores: Tensor,
                generator: torch.Generator | None,
                starting_points: Tensor | None = None) -> Tensor:
        x0 = search.x[rows]
        eps = torch.full((len(rows),), self.threat.eps, device=x0.device, dtype=x0.dtype)
        current = x0.clone()
        partial = self.partial
        if partial is None:
            partial = (search.targets is not None and self.threat.norm == "linf"
                       and not bool(torch.isfinite(scores).all()))
        if partial and search.targets is None:
            raise ValueError("the partial-information schedule is targeted (it starts from "
                             "an image of the target class): pass targets=, or "
                             "partial=False")
        if partial:
            start, has = self._starts(search, rows, starting_points)
            current[has] = start[has]
            # The box starts at the start's Linf distance (at most the box's width).
            eps[has] = torch.maximum(self.threat.norms(start[has] - x0[has]), eps[has])
            if not has.all():
                warnings.warn(
                    f"NES found no image of the target class to start {int((~has).sum())} "
                    f"of {len(has)} samples from (no starting_points=, and no input of the "
                    "batch was classified as the target): they start from x with the "
                    "query-limited steps", stacklevel=5)
        step = self.step_size or self.threat.eps / 5
        momentum = torch.zeros_like(x0)
        delta_eps = torch.full_like(eps, self.delta_eps)
        active = torch.arange(len(rows), device=rows.device)
        while True:
            active = active[~search.found(rows[active])
                            & (search.left(rows[active]) >= self.samples + 1)]
            if active.numel() == 0:
                # A partial-information sample whose box never shrank to eps ends outside
                # the ball: its point is projected into it (the result stays in the threat
                # model; it was not seen at its goal there).
                return self.threat.project(current, x0)
            r = rows[active]
            grad = self._gradient(search, r, current[active], eps[active], generator)
            momentum[active] = self.momentum * momentum[active] + (1 - self.momentum) * grad
            shrinking = eps[active] > self.threat.eps
            if shrinking.any():
                self._shrink(search, active[shrinking], rows, current, eps, delta_eps,
                             momentum)
            plain = active[~shrinking & (search.left(r) >= 1)]
            if plain.numel():
                moved = current[plain] + step * self._direction(momentum[plain])
                current[plain] = self.threat.project(moved, x0[plain])
                search.ask(current[plain], rows[plain])

    def _shrink(self, search: ScoreSearch, idx: Tensor, rows: Tensor, current: Tensor,
                eps: Tensor, delta_eps: Tensor, momentum: Tensor) -> None:
        """One partial-information step for the samples ``idx``: shrink the box by
        ``delta_eps`` with the largest ``lr`` (halved from ``max_lr``) whose step keeps the
        target shown; halve ``delta_eps`` where none does."""
        x0 = search.x[rows[idx]]
        direction = self._direction(momentum[idx])
        proposed = torch.maximum(eps[idx] - delta_eps[idx],
                                 torch.full_like(eps[idx], self.threat.eps))
        lr = torch.full_like(proposed, self.max_lr)
        waiting = torch.ones(len(idx), dtype=torch.bool, device=idx.device)
        while True:
            going = (waiting & (lr >= self.min_lr) & (search.left(rows[idx]) > 0))
            going = going.nonzero().squeeze(1)
            if going.numel() == 0:
                break
            at = idx[going]
            candidate = self.threat.project(
                current[at] + lr[going].view(-1, 1, 1, 1) * direction[going], x0[going],
                proposed[going])
            scores = search.ask(candidate, rows[at])
            shown = torch.isfinite(scores.gather(1, search.targets[rows[at]][:, None]))
            kept = shown.squeeze(1)
            current[at[kept]] = candidate[kept]
            eps[at[kept]] = proposed[going[kept]]
            waiting[going[kept]] = False
            lr[going[~kept]] /= 2
        failed = idx[waiting]
        delta_eps[failed] /= 2

    def _starts(self, search: ScoreSearch, rows: Tensor,
                given: Tensor | None) -> tuple[Tensor, Tensor]:
        """A start for each of ``rows`` and whether it has one: ``given`` (checked), else
        the closest input (Linf) whose first look gave the target."""
        x0 = search.x[rows]
        if given is not None:
            if not isinstance(given, Tensor) or given.shape != search.x.shape:
                raise ValueError(f"starting_points must be a tensor of the shape of x, "
                                 f"{tuple(search.x.shape)}: one image of the target class "
                                 "per sample")
            given = given.to(device=x0.device, dtype=x0.dtype)
            lo, hi = self.threat.bounds
            if not torch.isfinite(given).all() or given.min() < lo or given.max() > hi:
                raise ValueError(f"starting_points must be finite and inside the bounds "
                                 f"{self.threat.bounds}")
            return given[rows], torch.ones(len(rows), dtype=torch.bool, device=rows.device)
        labels = search.first_scores.argmax(dim=1)
        fits = labels[None, :] == search.targets[rows][:, None]
        dist = torch.cdist(x0.flatten(1), search.x.flatten(1), p=math.inf)
        dist = torch.where(fits, dist, math.inf)
        has = torch.isfinite(dist.min(dim=1).values)
        return search.x[dist.argmin(dim=1)], has
