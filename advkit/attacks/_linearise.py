"""Linearising a classifier around a point: the code DeepFool and FAB share.

Both attacks replace the model, at the current iterate, by its first-order Taylor
expansion and step onto a linearised decision boundary. They need the same two
pieces: the input gradients of several logit differences at one point (the oracle's
Jacobian door, :meth:`advkit.models.access.Oracle.jacobian`, with the coefficients
from :func:`logit_differences`) and the smallest step onto a hyperplane inside the box
(:func:`project_onto_hyperplane`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def logit_differences(classes: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Coefficients (n, k, C) of the logit differences ``f_classes[:, j] - f_labels``."""
    n, k = classes.shape
    coef = torch.zeros((n, k, num_classes), device=classes.device)
    coef.scatter_(2, classes[:, :, None], 1.0)
    coef.scatter_add_(2, labels[:, None, None].expand(n, k, 1),
                      torch.full((n, k, 1), -1.0, device=classes.device))
    return coef


def project_onto_hyperplane(
    p: Tensor, w: Tensor, c: Tensor, bounds: tuple[float, float], norm: str,
) -> tuple[Tensor, Tensor]:
    """Per row, the smallest ``delta`` in ``norm`` with ``w . delta = c``, ``p + delta`` in the box.

    ``p`` and ``w`` are (m, D), ``c`` is (m,). Returns ``delta`` (m, D) and a flag
    (m,), False where the box cannot reach the hyperplane; ``delta`` then moves
    every coordinate as far as the box allows towards it.

    Each coordinate moves in the direction ``sign(c * w_i)``, by at most its room to
    the box. L2: ``|delta_i| = min(lam * |w_i|, room_i)``; Linf:
    ``|delta_i| = min(tau, room_i)`` where ``w_i != 0``. Both make ``w . delta`` a
    piecewise-linear increasing function of the multiplier, solved exactly by
    sorting its breakpoints. L1: fill the coordinates with the largest ``|w_i|``
    first (Croce & Hein 2020, Sec. 3.1, with the box). Computed in ``p``'s dtype.
    """
    lo, hi = bounds
    a = w.abs()
    up = (w > 0) == (c >= 0)[:, None]  # the coordinate moves up (towards hi)
    room = torch.where(up, hi - p, p - lo).clamp_min_(0) * (a > 0)
    need = c.abs()[:, None]
    gain = a * room
    feasible = gain.sum(dim=1) >= need.squeeze(1)
    if norm == "l1":
        a_sorted, order = a.sort(dim=1, descending=True)
        gain_sorted = gain.gather(1, order)
        before = gain_sorted.cumsum(dim=1) - gain_sorted
        move_sorted = torch.minimum((need - before).clamp_min_(0) / a_sorted.clamp_min(1e-30),
                                    room.gather(1, order))
        move = torch.zeros_like(a).scatter_(1, order, move_sorted)
    else:
        speed = a if norm == "l2" else (a > 0).to(a.dtype)
        # Coordinate i reaches the box at multiplier room_i / speed_i (never if it cannot move).
        t_sorted, order = (room / speed).nan_to_num_(nan=math.inf).sort(dim=1)
        gain_sorted = gain.gather(1, order)
        rate = (a * speed).gather(1, order)
        # On segment k the coordinates before k sit at the box, the others move on.
        before = gain_sorted.cumsum(dim=1) - gain_sorted
        slope = (rate.sum(dim=1, keepdim=True) - rate.cumsum(dim=1) + rate).clamp_min_(0)
        reach = before + t_sorted * slope  # NaN (never reached) where t = inf and slope = 0
        k = (reach < need).sum(dim=1, keepdim=True).clamp_max_(a.shape[1] - 1)
        lam = (need - before.gather(1, k)).clamp_min_(0) / slope.gather(1, k).clamp_min(1e-30)
        move = torch.where(speed > 0, torch.minimum(lam * speed, room), 0.0)
    return torch.where(up, move, -move), feasible
