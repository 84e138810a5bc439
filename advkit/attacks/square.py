"""Square Attack (Andriushchenko et al., 2020): score-based random search in square windows."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from advkit.attacks.ascent import LOSSES, objective
from advkit.attacks.base import Attack, Oracle, Taxonomy, goal_reached
from advkit.threat import ThreatModel

#: The paper's iterations (of 10,000) after which the window fraction p is halved.
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, i: int, n_queries: int) -> float:
    """The fraction of pixels the window covers at iteration ``i`` of ``n_queries``.

    The paper halves ``p`` after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000
    and 8000 of a 10,000-query budget; other budgets rescale ``i`` to that scale.
    """
    scaled = int(i / n_queries * 10000)
    return p_init / 2 ** sum(scaled > t for t in HALVINGS)


def _bump(a: int, b: int, like: Tensor) -> Tensor:
    """An ``a x b`` bump of unit L2 norm: concentric squares around the centre, the k-th
    (half-width k) weighing ``1 / (k + 1)^2``, summed where they overlap."""
    if a == 0 or b == 0:
        return torch.zeros(a, b, device=like.device, dtype=like.dtype)
    opts = {"device": like.device, "dtype": like.dtype}
    rows = (torch.arange(a, device=like.device) - a // 2).abs()
    cols = (torch.arange(b, device=like.device) - b // 2).abs()
    ring = torch.maximum(rows[:, None], cols[None, :])
    k = torch.arange(max(a // 2, b // 2) + 1, **opts)
    tail = (1 / (k + 1) ** 2).flip(0).cumsum(0).flip(0)  # tail[d] = sum over rings k >= d
    bump = tail[ring]
    return bump / bump.norm()


def _window_pattern(s: int, like: Tensor) -> Tensor:
    """The paper's L2 window: a bump on the upper half, minus a bump on the lower half."""
    pattern = torch.cat([_bump(s // 2, s, like), -_bump(s - s // 2, s, like)])
    return pattern / pattern.norm()


def _place(patterns: Tensor, rows: Tensor, cols: Tensor, h: int, w: int) -> Tensor:
    """Put each sample's ``s x s`` pattern (n, s, s) at its corner (rows, cols): (n, 1, h, w)."""
    n, s = patterns.shape[0], patterns.shape[-1]
    ri = torch.arange(h, device=rows.device)[None] - rows[:, None]
    ci = torch.arange(w, device=cols.device)[None] - cols[:, None]
    inside = ((ri >= 0) & (ri < s))[:, :, None] & ((ci >= 0) & (ci < s))[:, None, :]
    picked = patterns[torch.arange(n, device=rows.device)[:, None, None],
                      ri.clamp(0, s - 1)[:, :, None], ci.clamp(0, s - 1)[:, None, :]]
    return (picked * inside).unsqueeze(1)


def _signs(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    draw = torch.randint(0, 2, shape, device=like.device, generator=generator)
    return (2 * draw - 1).to(like.dtype)


class Square(Attack):
    """Random search that changes one square window of the perturbation per query.

    Andriushchenko, Croce, Flammarion, Hein. "Square Attack: a query-efficient
    black-box adversarial attack via random search", ECCV 2020.
    https://arxiv.org/abs/1912.00049

    Score-based black box: it needs only the model's scores (give it
    ``advkit.models.scores_only(model)`` to make sure), never a gradient. Each query
    proposes the current best perturbation with one window of side
    ``s = round(sqrt(p * H * W))`` changed, and keeps it if the loss fell. Linf: the
    window is set to ``+-eps`` per channel, starting from vertical stripes of ``+-eps``.
    L2: a pair of opposite-sign bumps is put in the window and the mass of a second
    window is moved into it, the total norm kept at eps; the start is a grid of such
    bumps. ``p`` follows the paper's halving schedule (:func:`p_schedule`). A sample
    leaves the search as soon as it reaches its goal and is never queried again;
    samples the model already gets wrong get no query.

    ``result.queries`` (int64, per sample) counts every query of each sample: the
    search's (at most ``n_queries``, the initial one included; none for samples
    misclassified from the start) plus the clean pass and the final success pass
    that :class:`Attack` makes around every attack, so a sample costs at most
    ``n_queries + 2`` queries.

    Args:
        threat: norm (linf or l2), eps, bounds.
        n_queries: the query budget per sample, the initial query included (default
            5000, as in AutoAttack; the paper uses 10,000).
        p_init: the fraction of pixels the first windows cover, in (0, 1] (default 0.8,
            AutoAttack's setting; the paper tunes it per data set and norm).
        loss: the score ascended: ``"margin"`` (best other logit minus the true one;
            targeted: the target's logit minus the best other) or ``"ce"`` (the
            cross-entropy of the true class; targeted: minus the target's). Default
            None takes the paper's choice: margin untargeted, cross-entropy targeted.
        seed: seed of the random search (same seed, same result); None for fresh draws.
    """

    paper = ("Andriushchenko et al. 2020, Square Attack: a query-efficient black-box "
             "adversarial attack via random search")
    taxonomy = Taxonomy(knowledge="black box (scores)")
    norms = ("linf", "l2")

    def __init__(self, threat: ThreatModel, *, n_queries: int = 5000, p_init: float = 0.8,
                 loss: str | None = None, seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
            raise ValueError(f"n_queries must be an integer >= 1 (got {n_queries!r})")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1] (got {p_init}); it is the fraction "
                             "of pixels the first windows cover")
        if loss is not None and loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}, "
                             "or None for the paper's choice")
        self.n_queries = n_queries
        self.p_init = p_init
        self.loss = loss

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor, generator: torch.Generator | None,
             ) -> Tensor:
        loss = self.loss or ("ce" if targets is not None else "margin")
        out = x.clone()
        idx = (~goal_reached(clean_logits, y, targets)).nonzero().squeeze(1)
        if idx.numel() == 0:
            return out
        xa, ya = x[idx], y[idx]
        ta = targets[idx] if targets is not None else None

        def query(x_new: Tensor) -> tuple[Tensor, Tensor]:
            """Loss to minimise and goal, one query per active sample."""
            logits = model.logits(x_new, rows=idx)
            return -objective(loss, ya, ta)(logits), goal_reached(logits, ya, ta)

        x_best = self._init(xa, generator)
        best, done = query(x_best)
        for i in range(1, self.n_queries + 1):
            if done.any():
                out[idx[done]] = x_best[done]
                keep = ~done
                idx, xa, ya, x_best, best = (t[keep] for t in (idx, xa, ya, x_best, best))
                ta = ta[keep] if ta is not None else None
                if idx.numel() == 0:
                    break
            if i == self.n_queries:
                break
            p = p_schedule(self.p_init, i, self.n_queries)
            x_new = self._propose(xa, x_best, p, generator)
            value, done = query(x_new)
            # A proposal that reaches the goal is kept even where the loss says otherwise
            # (the cross-entropy need not fall when the target becomes the top class).
            accept = (value < best) | done
            x_best = torch.where(accept.view(-1, 1, 1, 1), x_new, x_best)
            best = torch.where(accept, value, best)
        out[idx] = x_best
        return out

    def _init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        n, c, h, w = x.shape
        eps = self.threat.eps
        if self.threat.norm == "linf":
            return self.threat.clip(x + eps * _signs((n, c, 1, w), x, generator))
        # A grid of side-s tiles (s = H/5), each a window pattern of random sign per channel.
        s = max(min(h, w) // 5, 1)
        rows, cols = h // s, w // s
        r0, c0 = (h - rows * s) // 2, (w - cols * s) // 2
        pattern = _window_pattern(s, x)
        both = torch.stack([pattern, pattern.T])
        delta = torch.zeros_like(x)
        for i in range(rows):
            for j in range(cols):
                flip = torch.randint(0, 2, (n,), device=x.device, generator=generator)
                r, q = r0 + i * s, c0 + j * s
                delta[:, :, r:r + s, q:q + s] = (both[flip].unsqueeze(1)
                                                 * _signs((n, c, 1, 1), x, generator))
        return self.threat.clip(x + delta * eps / _l2(delta).clamp_min(1e-12))

    def _propose(self, x: Tensor, x_best: Tensor, p: float,
                 generator: torch.Generator | None) -> Tensor:
        n, c, h, w = x.shape
        side = min(h, w)
        eps = self.threat.eps

        def corners(s: int) -> tuple[Tensor, Tensor]:
            rows = torch.randint(0, h - s + 1, (n,), device=x.device, generator=generator)
            cols = torch.randint(0, w - s + 1, (n,), device=x.device, generator=generator)
            return rows, cols

        if self.threat.norm == "linf":
            s = min(max(round(math.sqrt(p * h * w)), 1), max(side - 1, 1))
            # Work on each sample's s x s window only (late windows are a few pixels): its
            # channels move to x + eps or x - eps (clipped), one sign per channel.
            rows, cols = corners(s)
            offsets = torch.arange(s, device=x.device)
            window = ((rows[:, None] + offsets)[:, :, None] * w
                      + (cols[:, None] + offsets)[:, None, :]).view(n, 1, s * s).expand(n, c, -1)
            x_win, best_win = x.flatten(2).gather(2, window), x_best.flatten(2).gather(2, window)
            up, down = self.threat.clip(x_win + eps), self.threat.clip(x_win - eps)

            def already(target: Tensor) -> Tensor:
                """Per sample and channel: the current point is at ``target`` already."""
                return ~((target - best_win).abs() >= 1e-7).any(2)            # (n, c)

            up_same, down_same = already(up), already(down)
            signs = _signs((n, c, 1, 1), x, generator)
            # Redraw the signs while a proposal equals the current point inside its window
            # (a wasted query); 10 draws make a repeat vanishingly rare for eps > 0.
            for _ in range(9):
                redraw = torch.where(signs.view(n, c) > 0, up_same, down_same).all(1)
                if not redraw.any():
                    break
                signs = torch.where(redraw.view(-1, 1, 1, 1),
                                    _signs((n, c, 1, 1), x, generator), signs)
            moved = torch.where(signs.view(n, c, 1) > 0, up, down)
            return x_best.flatten(2).scatter(2, window, moved).view_as(x_best)

        s = max(round(math.sqrt(p * h * w)), 3)
        s = min(s + (s % 2 == 0), side)
        delta = x_best - x
        ones = torch.ones(n, s, s, device=x.device, dtype=x.dtype)
        r1, c1 = corners(s)
        m1 = _place(ones, r1, c1, h, w)
        m2 = _place(ones, *corners(s), h, w)
        m12 = torch.maximum(m1, m2)
        norm_w1 = _l2_per_channel(delta * m1)
        norm_w12 = _l2_per_channel(delta * m12)
        norm_img = _l2(delta)
        pattern = _window_pattern(s, x)
        flip = torch.randint(0, 2, (n,), device=x.device, generator=generator)
        bump = _place(torch.stack([pattern, pattern.T])[flip], r1, c1, h, w)
        # The new window: a fresh bump plus the old window's direction, rescaled per channel
        # to hold the old mass of both windows plus whatever budget is left unused.
        new = bump * _signs((n, c, 1, 1), x, generator) + delta * m1 / (norm_w1 + 1e-10)
        mass = ((eps ** 2 - norm_img ** 2).clamp_min(0) / c + norm_w12 ** 2).sqrt()
        new = new / _l2_per_channel(new).clamp_min(1e-12) * mass
        delta = delta * (1 - m12) + new
        return self.threat.clip(x + delta * eps / _l2(delta).clamp_min(1e-12))


def _l2(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def _l2_per_channel(t: Tensor) -> Tensor:
    return t.flatten(2).norm(dim=2)[:, :, None, None]
