"""The search over the constant c that C&W L2 and EAD share, with its checks.

Both attacks minimise ``distance + c * hinge(margin)`` for a per-sample c found by a
search: a first c (given, or estimated from the model linearised at x), then the
reference code's bisection, a run of the attack at each c. This module holds that
search, the best-so-far state, the early-abort rule and the argument checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from advkit.attacks._logits import margin as logit_margin
from advkit.models.access import Oracle
from advkit.threat import ThreatModel

#: The estimated first c (``initial_const=None``) is this multiple of the linearised one.
_ESTIMATE_FACTOR = 2.0
#: Stalled checks in a row that end a run which has already found an adversarial example
#: (one ends a run that has not; see ``CarliniWagnerL2``'s docstring).
_ABORT_PATIENCE_AFTER_SUCCESS = 3
_ABORT_PATIENCE = 1
#: Estimated first c values are kept in this range: below the 1e9 that marks "no
#: success yet" in the search, and above 0 (a sample exactly on the boundary).
_CONST_RANGE = (1e-6, 1e8)


def start_search(x: Tensor, clean_logits: Tensor, y: Tensor, targets: Tensor | None,
                  confidence: float) -> tuple[Tensor, Tensor, Tensor]:
    """The best-so-far state of a minimal-norm search: ``(best, best_score, todo)``.

    ``best`` starts at x, with score inf (nothing found), except for samples already at
    their goal with the required margin: x itself is their minimum (score 0) and they are
    left out of ``todo``, the indices still to search.
    """
    best = x.clone()
    best_score = torch.full((x.shape[0],), math.inf, device=x.device, dtype=x.dtype)
    already = logit_margin(clean_logits, y, targets) < -confidence
    best_score[already] = 0.0
    return best, best_score, (~already).nonzero().squeeze(1)


def within_budget(best: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """``best`` with x put back wherever its perturbation exceeds a finite eps: a search
    capped by eps returns x where it found nothing inside the budget (in place)."""
    if threat.bounded:
        # Measured as the result will be (the running norms may differ in the last bit).
        over = threat.norms(best - x) > threat.eps
        best[over] = x[over]
    return best


def hinge(logits: Tensor, labels: Tensor, targets: Tensor | None, kappa: float) -> Tensor:
    """The attack term ``max(margin + kappa, 0)`` (the paper's f plus the constant kappa)."""
    return (logit_margin(logits, labels, targets) + kappa).clamp_min(0)


def bisect_const(const: Tensor, lower: Tensor, upper: Tensor, success: Tensor) -> None:
    """The reference code's search over c, per sample and in place.

    After a success c becomes an upper bound; after a failure a lower bound. With both
    bounds known the next c is their midpoint; while no success has been seen (upper
    bound still at its initial 1e10) c grows tenfold.
    """
    upper.copy_(torch.where(success, torch.minimum(upper, const), upper))
    lower.copy_(torch.where(success, lower, torch.maximum(lower, const)))
    bracketed = upper < 1e9
    const.copy_(torch.where(bracketed, (lower + upper) / 2,
                            torch.where(success, const, const * 10)))


def estimate_const(model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
                    kappa: float) -> Tensor:
    """Per sample, a first c read off the model linearised at ``x`` (one gradient pass).

    With the attack term linearised, ``f(x + d) + kappa ~ m + g . d``, the minimiser of
    ``||d||^2 + c (m + g . d)`` is ``d = -c g / 2``, which lands exactly on the
    boundary ``m + g . d = 0`` at ``c = 2 m / ||g||^2``. The estimate is
    ``_ESTIMATE_FACTOR`` times that: the boundary curves towards the image (on the
    MNIST test CNN the smallest successful c the paper's search finds is 0.3 to 1.3
    times the linear value), and a run whose c is just at the threshold ends on the
    boundary rather than across it, so the factor makes the first run succeed.
    """
    logits, grad = model.gradient(x, lambda z: logit_margin(z, y, targets))
    need = logit_margin(logits, y, targets) + kappa
    c = _ESTIMATE_FACTOR * 2 * need / grad.flatten(1).pow(2).sum(1)
    # A flat model (zero gradient) gives inf or nan: start as high as the search allows.
    return c.nan_to_num(nan=_CONST_RANGE[1]).clamp(*_CONST_RANGE)


def search_const(model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
                  todo: Tensor, descend: Callable[[Tensor, Tensor], Tensor], *,
                  initial_const: float | None, search_steps: int, search_tolerance: float,
                  confidence: float) -> None:
    """The per-sample search over c shared by C&W L2 and EAD.

    ``descend(const, todo)`` runs the attack once at the per-sample ``const`` on the
    samples ``todo`` and returns, per sample of ``todo``, whether it succeeded. c starts
    at ``initial_const`` (None: :func:`estimate_const`), then follows
    :func:`bisect_const`; a sample stops searching once a run has succeeded and the
    bracket ``[lower, upper]`` has ``upper - lower <= search_tolerance * upper``.
    """
    const = torch.full((x.shape[0],), initial_const or 0.0, device=x.device, dtype=x.dtype)
    if initial_const is None and todo.numel():
        const[todo] = estimate_const(model.view(todo), x[todo], y[todo],
                                      None if targets is None else targets[todo],
                                      confidence).to(x.dtype)
    lower, upper = torch.zeros_like(const), torch.full_like(const, 1e10)
    for _ in range(search_steps):
        if todo.numel() == 0:
            break
        success = descend(const, todo)
        c, lo, hi = const[todo], lower[todo], upper[todo]
        bisect_const(c, lo, hi, success)
        const[todo], lower[todo], upper[todo] = c, lo, hi
        # Search on only where no run has succeeded yet (upper still at its initial
        # 1e10) or where the bracket on c is still wider than the tolerance.
        todo = todo[(hi >= 1e9) | (hi - lo > search_tolerance * hi)]


def check_tolerance(search_tolerance: float) -> None:
    if not (isinstance(search_tolerance, (int, float)) and 0 <= search_tolerance <= 1):
        raise ValueError(f"search_tolerance must be in [0, 1] (got {search_tolerance!r}); "
                         "1 stops at the first success, 0 runs every search step")


def abort_check(loss: Tensor, prev: Tensor, stalls: Tensor, succeeded: Tensor,
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The per-sample early abort, at one check: which runs go on, the new ``prev`` and
    ``stalls``.

    A check stalls when the loss is not below 0.9999 of the lowest loss at an earlier
    check (the paper's rule). A run that has not succeeded yet stops at its first
    stalled check; one that has succeeded shrinks its example along the boundary,
    where the loss jumps each time an iterate falls back across, so a stalled check is
    often such a jump: it stops only after ``_ABORT_PATIENCE_AFTER_SUCCESS`` in a row.
    """
    stalls = torch.where(loss > prev * 0.9999, stalls + 1, 0)
    keep = stalls < torch.where(succeeded, _ABORT_PATIENCE_AFTER_SUCCESS, _ABORT_PATIENCE)
    return keep, torch.minimum(prev, loss), stalls


def is_count(steps: object) -> bool:
    return isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1


def check_common(steps: int, learning_rate: float, confidence: float) -> None:
    if not is_count(steps):
        raise ValueError(f"steps must be an integer >= 1 (got {steps!r})")
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0
            and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a finite number > 0 (got {learning_rate!r})")
    if not (isinstance(confidence, (int, float)) and confidence >= 0
            and math.isfinite(confidence)):
        raise ValueError(f"confidence (kappa) must be a finite number >= 0 (got {confidence!r}); "
                         "0 asks for any misclassification, larger values for a logit margin")


def check_search(search_steps: int, initial_const: float | None,
                  allow_estimate: bool = False) -> None:
    if not is_count(search_steps):
        raise ValueError(f"search_steps must be an integer >= 1 (got {search_steps!r})")
    if initial_const is None and allow_estimate:
        return
    if not (isinstance(initial_const, (int, float)) and 0 < initial_const < 1e9):
        hint = " or None for the per-sample estimate" if allow_estimate else ""
        raise ValueError(f"initial_const must be in (0, 1e9){hint} (got {initial_const!r})")
