"""Bandits-TD (Ilyas et al., 2019): score-based PGD on a gradient prior learned online,
with a time prior (the last estimate) and a data prior (tiles)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from advkit.attacks._logits import best_other_class
from advkit.attacks._score import ScoreAttack, ScoreSearch, class_log_prob
from advkit.attacks.ascent import LOSSES, steepest_direction
from advkit.attacks.base import Taxonomy
from advkit.threat import ThreatModel

#: The paper's settings per norm (its appendix table and configs, images in [0, 1]):
#: the exploration delta, the finite-difference probe eta and the prior's learning rate.
PAPER = {"linf": {"exploration": 1.0, "fd_eta": 0.1, "online_lr": 100.0},
         "l2": {"exploration": 0.01, "fd_eta": 0.01, "online_lr": 0.1}}
#: The paper's image step as a share of eps: 0.01 at eps 0.05 (Linf), 0.5 at eps 5 (L2).
STEP_SHARE = {"linf": 0.2, "l2": 0.1}


class Bandits(ScoreAttack):
    """PGD along a prior on the gradient that a bandit learns from two probes per step.

    Ilyas, Engstrom, Madry. "Prior Convictions: Black-Box Adversarial Attacks with Bandits
    and Priors", ICLR 2019. https://arxiv.org/abs/1807.07978

    Needs only the model's scores (``advkit.models.scores_only(model)``, all or the top k).
    The loss is the paper's cross-entropy: ``-log p(y)`` raised (targeted: ``log p(t)``
    raised), from the softmax of the scores the model shows; ``loss="margin"`` raises the
    log-probability margin instead (the logit margin where both classes are shown).

    Bandits-TD, the paper's Algorithm 2 with both priors. Per sample it keeps a prior ``v``
    on the gradient at a coarser resolution: one value per ``tile_size x tile_size`` tile
    of each channel, upsampled to the image by repeating it (the **data-dependent** prior:
    neighbouring pixels have similar gradients). ``v`` starts at 0 and carries over from
    one step to the next (the **time-dependent** prior: successive gradients are
    similar). Each step, at the current point ``x_t``:

    1. Exploration: ``u`` standard Gaussian on the tiles, scaled to
       ``exploration / sqrt(dim)`` per value (``dim``: the values in a prior).
    2. Two probes: ``x_t + fd_eta q_+ / ||q_+||`` and ``x_t + fd_eta q_- / ||q_-||``
       with ``q_+- = up(v +- u)`` (L2 norms), kept in the box (as the paper's, not
       projected into the ball); the loss there is ``l_+``, ``l_-``.
    3. The bandit's gradient on ``v``: ``g = (l_+ - l_-) / (fd_eta exploration) u``.
    4. The prior's update: Linf: exponentiated gradient on ``v`` in [-1, 1]
       (``v <- tanh(atanh(v) + online_lr g)``, the paper's step written so that it
       cannot overflow: ``atanh(v)`` is what is stored); L2: ``v <- v + online_lr g``.
    5. The image's step: Linf ``x_t + step_size sign(up(v))``; L2
       ``x_t + step_size up(v) / ||up(v)||``; projected into the eps-ball and the box,
       and asked.

    Queries, counted by the oracle: the first look at ``x`` (1), three per step (the two
    probes and the new ``x_t``), and the final success pass (1). The paper counts two
    per step: its code checks each new ``x_t`` with a query it does not count, so its
    query counts are two thirds of what the same run costs here. A probe seen at the goal
    inside the ball is a valid adversarial point too. A sample stops at its goal, or when
    it cannot pay for a step. Batched: the probes of every active sample go to the model
    in one call per step, the new points in one more.

    Bandits-T (the time prior alone) is ``tile_size=1``.

    ``result.extras``: ``norm_at_queries`` and ``queries_to_success`` (see SimBA).

    Args:
        threat: norm (``linf`` or ``l2``), eps, bounds.
        max_queries: the queries per sample, in total (default 10,000, the paper's).
        tile_size: the side of a tile of the data prior, in pixels (default 4: 7 x 7
            tiles on MNIST's 28 x 28; the paper's prior is 50 x 50 on ImageNet's 299 x 299,
            tiles of 6 pixels). On MNIST test images 200-399 (Linf 0.3, the small test
            CNN, 10,000 queries), tiles of 3 and 4 broke 98-100%, median 55-73 queries to
            success, tiles of 2 a median of 112-118; on 200-299, tiles of 1 (no data
            prior) a median of 292, and tiles of 7 broke only 76%.
        exploration: delta, the scale of the exploration noise around the prior
            (default None: the paper's, 1.0 Linf, 0.01 L2).
        fd_eta: the probes' distance (L2) from ``x_t`` for the finite difference
            (default None: the paper's, 0.1 Linf, 0.01 L2, in [0, 1] pixel units).
        online_lr: the prior's learning rate (default None: the paper's, 100 Linf
            (exponentiated gradient), 0.1 L2).
        step_size: the image's step (default None: the paper's ratio to eps, eps / 5
            Linf (0.01 at 0.05), eps / 10 L2 (0.5 at 5)).
        loss: ``"ce"`` (default, the paper's) or ``"margin"``.
        checkpoints: the query budgets at which the norms are recorded.
        batch_size: the most images per model call (default 512: larger calls ran slower
            per image on CPU).
        seed: seed of the exploration noise (same seed, same result).
    """

    paper = ("Ilyas et al. 2019, Prior Convictions: Black-Box Adversarial Attacks with "
             "Bandits and Priors")
    taxonomy = Taxonomy(knowledge="black box (scores)")
    norms = ("linf", "l2")

    def __init__(self, threat: ThreatModel, *, max_queries: int = 10_000, tile_size: int = 4,
                 exploration: float | None = None, fd_eta: float | None = None,
                 online_lr: float | None = None, step_size: float | None = None,
                 loss: str = "ce", checkpoints: tuple[int, ...] | list[int] | None = None,
                 batch_size: int | None = 512, seed: int | None = 0) -> None:
        super().__init__(threat, max_queries=max_queries, checkpoints=checkpoints,
                         batch_size=batch_size, seed=seed)
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"tile_size must be an integer >= 1 (pixels; 1 for no data "
                             f"prior) (got {tile_size!r})")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
        paper = PAPER[threat.norm]
        given = {"exploration": exploration, "fd_eta": fd_eta, "online_lr": online_lr,
                 "step_size": step_size}
        for name, value in given.items():
            if value is not None and not (isinstance(value, int | float)
                                          and not isinstance(value, bool)
                                          and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, or None for the paper's (got "
                                 f"{value!r})")
        self.tile_size = tile_size
        self.exploration = float(exploration or paper["exploration"])
        self.fd_eta = float(fd_eta or paper["fd_eta"])
        self.online_lr = float(online_lr or paper["online_lr"])
        self.step_size = float(step_size or STEP_SHARE[threat.norm] * threat.eps)
        self.loss = loss

    def _objective(self, search: ScoreSearch, scores: Tensor, rows: Tensor) -> Tensor:
        """What the search raises: -log p(y) or log p(target) (``ce``), or the margin of the
        goal's class over the best other class in log-probabilities (``margin``)."""
        targeted = search.targets is not None
        cls = search.targets[rows] if targeted else search.y[rows]
        own = class_log_prob(scores, cls)
        if self.loss == "ce":
            return own if targeted else -own
        other = class_log_prob(scores, best_other_class(scores, cls))
        return own - other if targeted else other - own

    def _up(self, prior: Tensor, size: tuple[int, int]) -> Tensor:
        """The tiles' values spread over the image: each tile's value on all its pixels."""
        return F.interpolate(prior, size=size, mode="nearest")

    def _shown(self, prior: Tensor) -> Tensor:
        """The prior ``v`` from what is stored: Linf keeps ``atanh(v)``, L2 ``v`` itself."""
        return prior.tanh() if self.threat.norm == "linf" else prior

    def _search(self, search: ScoreSearch, rows: Tensor, scores: Tensor,
                generator: torch.Generator | None, **options: Tensor | None) -> Tensor:
        x0 = search.x[rows]
        n, c, h, w = x0.shape
        size = (h, w)
        prior = x0.new_zeros((n, c, math.ceil(h / self.tile_size), math.ceil(w / self.tile_size)))
        noise_scale = self.exploration / math.sqrt(prior[0].numel())
        current = x0.clone()
        active = torch.arange(n, device=rows.device)
        while True:
            active = active[~search.found(rows[active]) & (search.left(rows[active]) >= 3)]
            if active.numel() == 0:
                return current
            r, here, origin = rows[active], current[active], x0[active]
            v = self._shown(prior[active])
            u = torch.randn(v.shape, device=v.device, dtype=v.dtype,
                            generator=generator) * noise_scale
            q = self._up(torch.cat([v + u, v - u]), size)
            q = q / q.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            # The paper's probes: only the box holds them. Projected into the ball as well,
            # they clip the probe wherever x_t sits on the sphere, and the attack did worse
            # (MNIST test 200-299, tiles of 4: 86% broken within 2,000 queries, not 98%).
            # A probe outside the ball is asked all the same but never counts as found.
            probes = (here.repeat(2, 1, 1, 1) + self.fd_eta * q).clamp(*self.threat.bounds)
            owners = r.repeat(2)
            value = self._objective(search, search.ask(probes, owners), owners).view(2, -1)
            slope = (value[0] - value[1]) / (self.fd_eta * self.exploration)
            prior[active] += self.online_lr * slope.view(-1, 1, 1, 1) * u
            direction = steepest_direction(self._up(self._shown(prior[active]), size),
                                           self.threat.norm)
            current[active] = self.threat.project(here + self.step_size * direction, origin)
            search.ask(current[active], r)
