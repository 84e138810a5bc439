"""NES attacks (Ilyas et al., 2018): gradients estimated from scores (or from labels alone),
PGD on the estimate."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from advkit.attacks._decision import check_count
from advkit.attacks._score import ScoreAttack, ScoreSearch, class_log_prob
from advkit.attacks.base import Taxonomy
from advkit.models.access import LABELS
from advkit.threat import ThreatModel

#: A function of points and the samples they are charged to that asks the model about
#: them: the value NES estimates the gradient of, or whether a step keeps the target.
Query = Callable[[Tensor, Tensor], Tensor]


class NES(ScoreAttack):
    """PGD on a gradient estimated by Natural Evolution Strategies from the model's scores.

    Ilyas, Engstrom, Athalye, Lin. "Black-box Adversarial Attacks with Limited Queries and
    Information", ICML 2018. https://arxiv.org/abs/1804.08598

    Needs only the model's scores (``advkit.models.scores_only(model)``, all or the top k),
    or in the label-only setting its labels (``advkit.models.labels_only(model)``). With
    scores the objective is the log-probability of the true class, lowered (targeted: of
    the target, raised), from the softmax of the scores the model shows.

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

    **Label only** (targeted, Linf; the paper's third setting, for a model that shows only
    its label: ``labels_only(model)``): the partial-information schedule above on a score
    made of labels. The paper's discretised score of a point is ``R(x) = k - rank`` of the
    target among the top k labels (0 if not among them); with the label alone (k = 1)
    ``R(x) = 1`` where the model labels ``x`` the target, else 0. The attack raises its
    smoothing ``S(x) = E R(x + delta)``, ``delta ~ U[-mu, mu]^d``, estimated from
    ``mc_samples`` noisy copies (a query each): the NES estimate of ``S``'s gradient costs
    ``samples * mc_samples`` queries. The start is as above, from the first look's labels
    (``starting_points=``, or the closest input of the batch labelled the target), asked
    once (it must be labelled the target); a shrinking step is accepted only where the
    model labels the candidate the target. A sample with no start stays at ``x``, unbroken
    (warned). ``label_only=None`` (default) takes this setting when the model is given with
    labels only; True takes it on any model (asking only for labels); False refuses a
    label-only model. The configured attack says so: its ``access`` is "labels" unless
    ``label_only=False`` (``NES.access``, what the registry lists, stays "scores"), and
    the attack call and the evaluation engine read that. Untargeted, it is refused (an
    evaluation, which attacks without targets, refuses such a stage before its run): for
    an untargeted attack on labels use HopSkipJump or Boundary. Costly by nature (the
    paper's ImageNet attacks took millions of queries), and the paper's ``sigma = mu =
    0.001`` suit large images: on MNIST they leave ``S`` at 1 on every probe (a zero
    estimate) until the shrinking box has pushed the point to within a few thousandths of
    the boundary.
    Measured on the MNIST test CNN (10 test images, targeted ``y + 1``, Linf 0.3, 100,000
    queries, each started from another test image the model labels as its target, seed
    0, one thread; the command is in the README): the paper's values broke 2 of 10 (one
    seen at the target in the search, after 80,107 queries; the other by the final
    projection into the ball); ``samples=20, mc_samples=10, sigma=mu=0.02`` (200 queries
    an estimate instead of 2,500) broke 5 of 10, four seen in the search, after 4,868,
    25,793, 43,683 and 44,895 queries. At Linf 0.4 and 20,000 queries the latter broke 4-5
    of 5 (seeds 0-3; ``tests/test_nes.py``).

    ``result.queries`` per sample: the first look at ``x`` (1), the search (together at most
    ``max_queries``; label only: the start's look included) and the final success pass
    (1). Batched: the probes (label only: their copies) of every active sample go to the
    model in one call per iteration (at most ``batch_size`` images a call), each charged
    to its sample.
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
        label_only: True / False forces the label-only setting on or off; None (default)
            takes it on a label-only model.
        mc_samples: the noisy copies per estimate of ``S`` (default 50, the paper's).
        mu: the half-width of their uniform noise (default 0.001, the paper's, in [0, 1]
            pixel units; the authors' script used 0.002, with 100 probes).
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
                 min_lr: float = 5e-5, label_only: bool | None = None, mc_samples: int = 50,
                 mu: float = 0.001,
                 checkpoints: tuple[int, ...] | list[int] | None = None,
                 batch_size: int | None = 512, seed: int | None = 0) -> None:
        super().__init__(threat, max_queries=max_queries, checkpoints=checkpoints,
                         batch_size=batch_size, seed=seed)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2 or (
                samples % 2):
            raise ValueError(f"samples must be an even integer >= 2 (antithetic pairs) (got "
                             f"{samples!r})")
        for name, value in (("sigma", sigma), ("delta_eps", delta_eps), ("max_lr", max_lr),
                            ("min_lr", min_lr), ("mu", mu)):
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
        if label_only is not None and not isinstance(label_only, bool):
            raise ValueError(f"label_only must be True, False or None (got {label_only!r})")
        if label_only:
            if threat.norm != "linf":
                raise ValueError("the label-only setting shrinks a Linf box (the paper's): "
                                 "use norm='linf', or HopSkipJump for L2 with labels only")
            if partial is False:
                raise ValueError("the label-only setting runs the partial-information "
                                 "schedule: leave partial=None, or label_only=False")
        self.samples = samples
        self.sigma = float(sigma)
        self.step_size = step_size
        self.momentum = float(momentum)
        self.partial = partial
        self.delta_eps = float(delta_eps)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.label_only = label_only
        self.mc_samples = check_count("mc_samples", mc_samples)
        self.mu = float(mu)
        if label_only is not False:
            # This configuration makes do with labels: the attack call and the evaluation
            # engine let a label-only model in (the class, as the registry lists it, needs
            # scores).
            self.access = LABELS

    def config(self) -> dict:
        cfg = super().config()
        cfg.pop("access", None)  # label_only says it
        return cfg

    # -- the pieces ----------------------------------------------------------------------
    def _objective(self, search: ScoreSearch, scores: Tensor, rows: Tensor) -> Tensor:
        """What the search raises: log p(target), or -log p(y)."""
        if search.targets is None:
            return -class_log_prob(scores, search.y[rows])
        return class_log_prob(scores, search.targets[rows])

    def _proxy(self, search: ScoreSearch, points: Tensor, owners: Tensor,
               generator: torch.Generator | None) -> Tensor:
        """The label-only setting's score ``S`` at ``points``: the share of ``mc_samples``
        copies of each, moved by uniform noise in ``[-mu, mu]^d``, that the model labels as
        the target (``R = 1``, else 0; one query each)."""
        k = self.mc_samples
        # Chunks of at most batch_size copies: the copies of a round need not all be held.
        per_call = max(1, (self.batch_size or k * len(points)) // k)
        shares = []
        for at in torch.arange(len(points), device=owners.device).split(per_call):
            noise = torch.rand((len(at), k, *points.shape[1:]), device=points.device,
                               dtype=points.dtype, generator=generator)
            copies = (points[at, None] + self.mu * (2 * noise - 1)).flatten(0, 1)
            whose = owners[at].repeat_interleave(k)
            labels = search.ask_labels(copies, whose)
            shares.append((labels == search.targets[whose]).view(-1, k).to(points.dtype)
                          .mean(dim=1))
        return torch.cat(shares)

    def _gradient(self, search: ScoreSearch, rows: Tensor, at: Tensor, radius: Tensor,
                  generator: torch.Generator | None, value: Query) -> Tensor:
        """The NES estimate of the gradient of ``value`` at ``at`` (one per row), from
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
        values = value(probes, rows.repeat_interleave(self.samples)).view(m, self.samples)
        # Antithetic pairs: each pair's difference, so a constant baseline cancels.
        diff = values[:, :half] - values[:, half:]
        grad = (diff.view(m, half, *([1] * (at.dim() - 1))) * u[:, :half]).sum(dim=1)
        return grad / (self.samples * self.sigma)

    def _direction(self, grad: Tensor) -> Tensor:
        if self.threat.norm == "linf":
            return grad.sign()
        size = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return grad / size.view(-1, *([1] * (grad.dim() - 1)))

    # -- the score settings --------------------------------------------------------------
    def _search(self, search: ScoreSearch, rows: Tensor, scores: Tensor,
                generator: torch.Generator | None,
                starting_points: Tensor | None = None) -> Tensor:
        if search.first_labels is not None:
            return self._label_search(search, rows, generator, starting_points)
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
            start, has = self._starts(search, rows, starting_points,
                                      search.first_scores.argmax(dim=1))
            current[has] = start[has]
            # The box starts at the start's Linf distance (at most the box's width).
            eps[has] = torch.maximum(self.threat.norms(start[has] - x0[has]), eps[has])
            if not has.all():
                warnings.warn(
                    f"NES found no image of the target class to start {int((~has).sum())} "
                    f"of {len(has)} samples from (no starting_points=, and no input of the "
                    "batch was classified as the target): they start from x with the "
                    "query-limited steps", stacklevel=4)

        def value(probes: Tensor, owners: Tensor) -> Tensor:
            return self._objective(search, search.ask(probes, owners), owners)

        def shown(candidates: Tensor, owners: Tensor) -> Tensor:
            scores = search.ask(candidates, owners)
            return torch.isfinite(scores.gather(1, search.targets[owners][:, None])).squeeze(1)

        active = torch.arange(len(rows), device=rows.device)
        return self._iterate(search, rows, active, current, eps, generator, value, shown,
                             self.samples + 1)

    def _iterate(self, search: ScoreSearch, rows: Tensor, active: Tensor, current: Tensor,
                 eps: Tensor, generator: torch.Generator | None, value: Query,
                 keeps: Query, cost: int) -> Tensor:
        """The iterations of the samples ``active`` (indices into ``rows``), from
        ``current`` in boxes of radius ``eps``: a shrinking step where the box is larger
        than eps (the candidate accepted where ``keeps``), a query-limited one elsewhere;
        each while it can pay ``cost`` queries. Returns the last iterates."""
        x0 = search.x[rows]
        step = self.step_size or self.threat.eps / 5
        momentum = torch.zeros_like(x0)
        delta_eps = torch.full_like(eps, self.delta_eps)
        while True:
            active = active[~search.found(rows[active])
                            & (search.left(rows[active]) >= cost)]
            if active.numel() == 0:
                # A partial-information sample whose box never shrank to eps ends outside
                # the ball: its point is projected into it (the result stays in the threat
                # model; it was not seen at its goal there).
                return self.threat.project(current, x0)
            r = rows[active]
            grad = self._gradient(search, r, current[active], eps[active], generator, value)
            momentum[active] = self.momentum * momentum[active] + (1 - self.momentum) * grad
            shrinking = eps[active] > self.threat.eps
            if shrinking.any():
                self._shrink(search, active[shrinking], rows, current, eps, delta_eps,
                             momentum, keeps)
            plain = active[~shrinking & (search.left(r) >= 1)]
            if plain.numel():
                moved = current[plain] + step * self._direction(momentum[plain])
                current[plain] = self.threat.project(moved, x0[plain])
                search.ask(current[plain], rows[plain])

    def _shrink(self, search: ScoreSearch, idx: Tensor, rows: Tensor, current: Tensor,
                eps: Tensor, delta_eps: Tensor, momentum: Tensor, keeps: Query) -> None:
        """One partial-information step for the samples ``idx``: shrink the box by
        ``delta_eps`` with the largest ``lr`` (halved from ``max_lr``) whose step ``keeps``
        the target (one query per try); halve ``delta_eps`` where none does."""
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
            kept = keeps(candidate, rows[at])
            current[at[kept]] = candidate[kept]
            eps[at[kept]] = proposed[going[kept]]
            waiting[going[kept]] = False
            lr[going[~kept]] /= 2
        failed = idx[waiting]
        delta_eps[failed] /= 2

    def _starts(self, search: ScoreSearch, rows: Tensor, given: Tensor | None,
                labels: Tensor) -> tuple[Tensor, Tensor]:
        """A start for each of ``rows`` and whether it has one: ``given`` (checked), else
        the closest input (Linf) that the first look (``labels``) gave the target."""
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
        fits = labels[None, :] == search.targets[rows][:, None]
        dist = torch.cdist(x0.flatten(1), search.x.flatten(1), p=math.inf)
        dist = torch.where(fits, dist, math.inf)
        has = torch.isfinite(dist.min(dim=1).values)
        return search.x[dist.argmin(dim=1)], has

    # -- the label-only setting ----------------------------------------------------------
    def _asks_labels(self, level: str) -> bool:
        return self.label_only is True or (self.label_only is None and level == LABELS)

    def check_call(self, level: str, *, targeted: bool) -> None:
        """As the base's, and where the label-only setting is taken: targeted, Linf, with
        the partial-information schedule."""
        super().check_call(level, targeted=targeted)
        if not self._asks_labels(level):
            return
        if not targeted:
            raise ValueError("label-only NES is targeted (it starts from an image of the "
                             "target class and shrinks the box while the label stays the "
                             "target): pass targets=; for an untargeted attack on a "
                             "label-only model use HopSkipJump or Boundary")
        if self.threat.norm != "linf":
            raise ValueError("the label-only setting shrinks a Linf box (the paper's): use "
                             "norm='linf', or HopSkipJump for L2 with labels only")
        if self.partial is False:
            raise ValueError("the label-only setting runs the partial-information schedule: "
                             "leave partial=None, or give the model with scores")

    def _label_search(self, search: ScoreSearch, rows: Tensor,
                      generator: torch.Generator | None,
                      starting_points: Tensor | None = None) -> Tensor:
        x0 = search.x[rows]
        start, has = self._starts(search, rows, starting_points, search.first_labels)
        # Each start is asked once: it must carry the target's label (and is a candidate).
        if has.any():
            at = has.nonzero().squeeze(1)
            has[at] = search.ask_labels(start[at], rows[at]) == search.targets[rows[at]]
        if not has.all():
            warnings.warn(
                f"NES found no image labelled as the target to start {int((~has).sum())} of "
                f"{len(has)} samples from (no starting_points= the model labels as the "
                "target, and no input of the batch labelled so): with labels only they stay "
                "at x, unbroken", stacklevel=5)
        current = torch.where(has.view(-1, 1, 1, 1), start, x0)
        # The box starts at the start's Linf distance (at most the box's width).
        eps = self.threat.norms(current - x0).clamp_min(self.threat.eps)

        def value(probes: Tensor, owners: Tensor) -> Tensor:
            return self._proxy(search, probes, owners, generator)

        def labelled(candidates: Tensor, owners: Tensor) -> Tensor:
            return search.ask_labels(candidates, owners) == search.targets[owners]

        return self._iterate(search, rows, has.nonzero().squeeze(1), current, eps, generator,
                             value, labelled, self.samples * self.mc_samples + 1)
