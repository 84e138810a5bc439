"""The engine of the gradient-ascent attacks (FGSM, BIM, ILLC, PGD, MI-FGSM).

All of them repeat: gradient of an objective at the current point, a step in the
steepest-ascent direction of the threat model's norm, projection back into the
ball and the box. :func:`ascend` runs that loop on the samples not yet broken
only (per-sample early exit): a sample whose goal is reached leaves the working
batch at once, so no model pass is spent on it again.

Public because training recipes run the same loop for their inner maximisation
(TRADES ascends a KL divergence): :func:`ascend`, :func:`objective` and
:func:`steepest_direction` are the stable part.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from advkit.attacks._logits import margin
from advkit.attacks.base import Oracle, goal_reached
from advkit.threat import ThreatModel

LOSSES = ("ce", "margin")


def objective(loss: str, labels: Tensor, targets: Tensor | None) -> Callable[[Tensor], Tensor]:
    """The per-sample quantity an attack ascends.

    ``ce``: cross-entropy of the true class (untargeted) or minus that of the
    target (targeted). ``margin``: the Carlini-Wagner logit margin, best other
    logit minus the true one (untargeted) or the target's logit minus the best
    other (targeted); it does not saturate as softmax does.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    cls = targets if targets is not None else labels
    sign = -1.0 if targets is not None else 1.0
    if loss == "ce":
        return lambda logits: sign * F.cross_entropy(logits, cls, reduction="none")

    # Ascending the margin is descending the distance to the goal.
    return lambda logits: -margin(logits, labels, targets)


def steepest_direction(grad: Tensor, norm: str, x: Tensor | None = None,
                       bounds: tuple[float, float] = (0.0, 1.0), l1_sparsity: float = 0.99,
                       ) -> Tensor:
    """The unit-norm direction of steepest ascent for ``norm`` (per sample).

    Linf: sign(grad). L2: grad / ||grad||_2. L1: the steepest L1 direction moves
    a single coordinate, which makes slow progress; following Tramer & Boneh
    (2019) we move the top (1 - l1_sparsity) fraction of coordinates by |grad|,
    skipping coordinates the box stops from moving (x at a bound, pushed out),
    and normalise to unit L1 norm.
    """
    n = grad.shape[0]
    flat = grad.reshape(n, -1)
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        return grad / flat.norm(dim=1).clamp_min(1e-12).view(n, *([1] * (grad.dim() - 1)))
    if x is not None:
        xf = x.reshape(n, -1)
        blocked = ((xf <= bounds[0]) & (flat < 0)) | ((xf >= bounds[1]) & (flat > 0))
        flat = flat.masked_fill(blocked, 0)
    k = max(1, int(round((1 - l1_sparsity) * flat.shape[1])))
    top = flat.abs().topk(k, dim=1)
    direction = torch.zeros_like(flat).scatter(1, top.indices, flat.gather(1, top.indices).sign())
    return (direction / direction.abs().sum(1, keepdim=True).clamp_min(1)).view_as(grad)


def ascend(
    model: Oracle, x: Tensor, labels: Tensor, targets: Tensor | None, x_start: Tensor,
    threat: ThreatModel, steps: int, objective_fn: Callable[[Tensor, Tensor | None], Callable],
    step: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor],
    state: dict[str, Tensor] | None = None, early_exit: bool = True,
) -> Tensor:
    """Run ``steps`` projected ascent steps from ``x_start``; return the final points.

    ``step(x_adv, grad, state)`` returns the unprojected next point (a new tensor:
    ``x_start`` is never written to); ``state`` holds per-sample tensors (first dim N)
    that travel with their samples (momentum). ``objective_fn(labels, targets)``
    builds the per-sample objective for a batch. With ``early_exit``, a sample whose
    goal is reached at the current point is written out and dropped from the working
    batch.
    """
    # The loop does nothing but the model pass, the step and the projection unless a
    # sample leaves: the objective is rebuilt, and the output allocated, only then.
    out: Tensor | None = None
    active: Tensor | None = None  # indices of the working batch; None while it is all of x
    xa, x0, ya, ta = x_start, x, labels, targets
    state = dict(state or {})
    objective_a = objective_fn(ya, ta)
    for _ in range(steps):
        logits, grad = model.gradient(xa, objective_a, rows=active)
        if early_exit:
            done = goal_reached(logits, ya, ta)
            if done.any():
                if out is None:
                    out = torch.empty_like(x_start)
                    active = torch.arange(x.shape[0], device=x.device)
                out[active[done]] = xa[done]
                keep = ~done
                active, xa, x0, ya, grad = active[keep], xa[keep], x0[keep], ya[keep], grad[keep]
                ta = ta[keep] if ta is not None else None
                state = {k: v[keep] for k, v in state.items()}
                if active.numel() == 0:
                    return out
                objective_a = objective_fn(ya, ta)
        xa = threat.project(step(xa, grad, state), x0)
    if out is None:
        return xa
    out[active] = xa
    return out
