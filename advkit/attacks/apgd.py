"""Auto-PGD (Croce & Hein, 2020): APGD and its targeted variant APGD-T, the white-box
attacks of AutoAttack."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from advkit.attacks._logits import best_other, dlr_loss, top_other_classes
from advkit.attacks.ascent import objective, steepest_direction
from advkit.attacks.base import Attack, Oracle, Taxonomy, goal_reached, require_at_least
from advkit.threat import ThreatModel

LOSSES = ("ce", "dlr")
PAPER = ("Croce & Hein 2020, Reliable evaluation of adversarial robustness with an ensemble "
         "of diverse parameter-free attacks")


def checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ceil(p_j * steps)`` at which APGD may halve its step.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``;
    only checkpoints strictly inside ``(0, steps)`` and distinct are kept (for 100
    steps: 22, 41, 57, 70, 80, 87, 93, 99).
    """
    marks: list[int] = []
    p_prev, p = 0.0, 0.22
    while p <= 1:
        w = math.ceil(round(p * steps, 6))  # round first: 0.41 * 100 is 41.000000000000007
        if 0 < w < steps and (not marks or w > marks[-1]):
            marks.append(w)
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    return marks


def _loss_fn(loss: str, labels: Tensor, targets: Tensor | None) -> Callable[[Tensor], Tensor]:
    if loss == "dlr":
        return lambda logits: dlr_loss(logits, labels, targets)
    return objective("ce", labels, targets)


def _check_classes(loss: str, classes: int, targeted: bool) -> None:
    need = 4 if targeted else 3
    if loss == "dlr" and classes < need:
        kind = "targeted " if targeted else ""
        raise ValueError(f"the {kind}DLR loss needs at least {need} classes (the model has "
                         f"{classes}); use loss='ce'")


def apgd(
    model: Oracle, x: Tensor, labels: Tensor, loss_targets: Tensor | None,
    goal_targets: Tensor | None, x_start: Tensor, threat: ThreatModel, steps: int, loss: str,
    alpha: float = 0.75, rho: float = 0.75,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One APGD run (Algorithm 1 of the paper) from ``x_start``, batched, with early exit.

    The loss is built with ``loss_targets`` (None: untargeted); the goal that ends a
    sample's run is misclassification (``goal_targets`` None) or reaching
    ``goal_targets``. APGD-T uses a targeted loss with an untargeted goal.

    Every sample starts with step ``eta = 2 * eps``. After evaluating iterate ``k`` at a
    checkpoint ``w_j`` a sample halves its step and moves back to its best point
    ``x_max`` when (1) the loss rose in fewer than ``rho * (w_j - w_{j-1})`` of the steps
    since ``w_{j-1}``, or (2) its step was not halved at ``w_{j-1}`` and its best loss
    has not improved since. Steps: ``z = P(x_k + eta * dir(grad))``,
    ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))`` (alpha = 1 on the
    first step), with ``P`` the projection onto the ball and the box.

    Costs ``steps`` gradient passes and one forward pass per sample at most (the
    gradient at ``x_max`` is kept, so moving back costs nothing). A sample leaves early
    when it reaches its goal, or when it is at a fixed point of the iteration (all-zero
    gradient, no momentum, at its best point: a saturated softmax), where every further
    step would return the same result.

    Returns ``(x_out, reached, loss, logits)`` per sample: the first iterate that
    reached the goal where one did (``reached``), else the iterate of highest loss;
    the loss and logits at ``x_out``.
    """
    n = x.shape[0]
    dims = (-1,) + (1,) * (x.dim() - 1)
    marks = set(checkpoints(steps))
    out = x_start.clone()
    reached = torch.zeros(n, dtype=torch.bool, device=x.device)
    out_loss = torch.full((n,), float("-inf"), device=x.device, dtype=x.dtype)
    out_logits: Tensor | None = None

    idx = torch.arange(n, device=x.device)
    x0, ya, lt, gt = x, labels, loss_targets, goal_targets
    fn = _loss_fn(loss, ya, lt)
    xk = x_prev = x_start
    state: dict[str, Tensor] = {}
    last_mark = 0
    for k in range(steps + 1):
        if k < steps:
            logits, grad = model.gradient(xk, fn, rows=idx)
        else:
            logits, grad = model.logits(xk, rows=idx), torch.zeros_like(xk)
        f = fn(logits)
        if out_logits is None:
            out_logits = torch.zeros(n, logits.shape[1], device=x.device, dtype=logits.dtype)
        if k == 0:
            state = {
                "x_max": xk.clone(), "g_max": grad.clone(), "f_max": f.clone(),
                "logits_max": logits.clone(), "f_prev": f.clone(),
                "eta": torch.full_like(f, 2 * threat.eps), "inc": torch.zeros_like(f),
                "f_max_last": f.clone(), "reduced_last": torch.zeros_like(f, dtype=torch.bool),
            }
        else:
            state["inc"] += (f > state["f_prev"]).to(f.dtype)
            better = f > state["f_max"]
            b4 = better.view(dims)
            state["f_max"] = torch.where(better, f, state["f_max"])
            state["x_max"] = torch.where(b4, xk, state["x_max"])
            state["g_max"] = torch.where(b4, grad, state["g_max"])
            state["logits_max"] = torch.where(better[:, None], logits, state["logits_max"])
        state["f_prev"] = f

        done = goal_reached(logits, ya, gt)
        # A sample with an all-zero gradient that did not move and sits at its best point
        # is at a fixed point: every later step, and every move back to x_max, gives the
        # same iterate (the model is deterministic), so its result is already final. This
        # is the usual fate of a saturated softmax (gradient masking); stopping there
        # changes no result and saves its remaining passes.
        stuck = torch.zeros_like(done)
        if k < steps:
            stuck = ((grad.flatten(1) == 0).all(1) & (xk == x_prev).flatten(1).all(1)
                     & (xk == state["x_max"]).flatten(1).all(1) & ~done)
        if stuck.any():
            hit = idx[stuck]
            out[hit], out_loss[hit] = state["x_max"][stuck], state["f_max"][stuck]
            out_logits[hit] = state["logits_max"][stuck]
        if done.any():
            hit = idx[done]
            out[hit], reached[hit] = xk[done], True
            out_loss[hit], out_logits[hit] = f[done], logits[done]
        leave = done | stuck
        if leave.any():
            keep = ~leave
            idx, x0, ya, xk, x_prev, grad = (t[keep] for t in (idx, x0, ya, xk, x_prev, grad))
            lt = lt[keep] if lt is not None else None
            gt = gt[keep] if gt is not None else None
            state = {key: v[keep] for key, v in state.items()}
            fn = _loss_fn(loss, ya, lt)
            if idx.numel() == 0:
                return out, reached, out_loss, out_logits
        if k == steps:
            break

        if k in marks:
            osc = state["inc"] < rho * (k - last_mark)
            stalled = ~state["reduced_last"] & (state["f_max"] <= state["f_max_last"])
            halve = osc | stalled
            h4 = halve.view(dims)
            state["eta"] = torch.where(halve, state["eta"] / 2, state["eta"])
            xk = torch.where(h4, state["x_max"], xk)
            grad = torch.where(h4, state["g_max"], grad)
            state["f_prev"] = torch.where(halve, state["f_max"], state["f_prev"])
            state["reduced_last"], state["f_max_last"] = halve, state["f_max"].clone()
            state["inc"] = torch.zeros_like(state["inc"])
            last_mark = k

        direction = steepest_direction(grad, threat.norm)
        z = threat.project(xk + state["eta"].view(dims) * direction, x0)
        a = 1.0 if k == 0 else alpha
        x_next = threat.project(xk + a * (z - xk) + (1 - a) * (xk - x_prev), x0)
        x_prev, xk = xk, x_next

    out[idx], out_loss[idx] = state["x_max"], state["f_max"]
    out_logits[idx] = state["logits_max"]
    return out, reached, out_loss, out_logits


class APGD(Attack):
    """Auto-PGD: PGD with momentum and a step size that adapts itself per sample.

    Croce, Hein. "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020. https://arxiv.org/abs/2003.01690

    Starts at step ``2 * eps`` and halves it per sample at the checkpoints of
    :func:`checkpoints` when progress stalls, moving back to the best point found
    (see :func:`apgd`). Each sample is attacked only until its goal is reached
    (misclassified, or classified as its target when ``targets`` is given), as in
    AutoAttack; samples the model already gets wrong cost no passes. A sample
    never broken gets its highest-loss point over all restarts.

    Args:
        threat: norm (linf or l2), eps, bounds.
        steps: iterations per restart, the paper's N_iter (default 100); each costs one
            forward+backward pass per sample still unbroken.
        restarts: independent runs from random starts (default 1); later ones only on
            samples still unbroken.
        loss: ``"ce"`` (cross-entropy; default, APGD-CE) or ``"dlr"`` (Difference of
            Logits Ratio, :func:`dlr_loss`; APGD-DLR). Targeted: minus the target's
            cross-entropy, or the targeted DLR loss.
        alpha: momentum weight of the new step (paper: 0.75).
        rho: the fraction of loss increases below which the step is halved (paper: 0.75).
        random_start: start from a uniform point of the ball (default True, as AutoAttack),
            else from the clean image.
        seed: seed of the random starts (same seed, same result); None for fresh draws.
    """

    paper = PAPER
    taxonomy = Taxonomy(frequency="iterative")
    norms = ("linf", "l2")

    def __init__(
        self, threat: ThreatModel, *, steps: int = 100, restarts: int = 1, loss: str = "ce",
        alpha: float = 0.75, rho: float = 0.75, random_start: bool = True,
        seed: int | None = 0,
    ) -> None:
        super().__init__(threat, seed=seed)
        require_at_least(1, steps=steps, restarts=restarts)
        if restarts > 1 and not random_start:
            raise ValueError(f"restarts={restarts} needs random_start=True (without a random "
                             "start every restart repeats the same run)")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1] (got {alpha}); the paper uses 0.75")
        if not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1] (got {rho}); the paper uses 0.75")
        self.steps = steps
        self.restarts = restarts
        self.loss = loss
        self.alpha = alpha
        self.rho = rho
        self.random_start = random_start

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.threat.random_start(x, generator) if self.random_start else x.clone()

    def _apgd(self, model: Oracle, x: Tensor, y: Tensor, loss_targets: Tensor | None,
              goal_targets: Tensor | None, generator: torch.Generator | None):
        return apgd(model, x, y, loss_targets, goal_targets, self._start(x, generator),
                    self.threat, self.steps, self.loss, self.alpha, self.rho)

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor, generator: torch.Generator | None,
             ) -> Tensor:
        _check_classes(self.loss, clean_logits.shape[1], targets is not None)
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
        todo = (~goal_reached(clean_logits, y, targets)).nonzero().squeeze(1)
        for _ in range(self.restarts):
            if todo.numel() == 0:
                break
            ts = targets[todo] if targets is not None else None
            adv, reached, loss, _ = self._apgd(model.view(todo), x[todo], y[todo], ts, ts,
                                               generator)
            score = torch.where(reached, torch.full_like(loss, float("inf")), loss)
            better = score > best_loss[todo]
            best[todo[better]], best_loss[todo[better]] = adv[better], score[better]
            todo = todo[~reached]
        return best


class APGDT(APGD):
    """APGD-T: targeted APGD against each of the top-k other classes in turn.

    Croce, Hein. "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020. https://arxiv.org/abs/2003.01690

    For each of the ``n_target_classes`` classes ranked highest by the clean logits
    (the true class left out), in that order, runs APGD with a *targeted* loss on
    the samples not yet broken. The goal, as in AutoAttack, is untargeted: a sample
    is broken (and leaves the run) as soon as it is misclassified, whatever the
    class, and ``result.success`` means misclassified. A targeted loss only gives
    the search better directions than the untargeted one. ``targets=`` is refused:
    for a target of your choice use :class:`APGD` with ``loss="dlr"`` and ``targets=``.
    A sample never broken gets the point, over all runs, where the margin
    ``max_{i != y} z_i - z_y`` was largest.

    Args:
        threat: norm (linf or l2), eps, bounds.
        steps: iterations per run (default 100).
        restarts: runs per target class (default 1, as AutoAttack).
        n_target_classes: how many target classes to try (default 9, AutoAttack's
            setting for 10 classes); capped at the number of classes minus one.
        loss: ``"dlr"`` (targeted DLR, default) or ``"ce"`` (minus the target's
            cross-entropy).
        alpha, rho, random_start, seed: as in :class:`APGD`.
    """

    taxonomy = Taxonomy(specificity="untargeted", frequency="iterative")

    def __init__(
        self, threat: ThreatModel, *, steps: int = 100, restarts: int = 1,
        n_target_classes: int = 9, loss: str = "dlr", alpha: float = 0.75, rho: float = 0.75,
        random_start: bool = True, seed: int | None = 0,
    ) -> None:
        super().__init__(threat, steps=steps, restarts=restarts, loss=loss, alpha=alpha,
                         rho=rho, random_start=random_start, seed=seed)
        require_at_least(1, n_target_classes=n_target_classes)
        self.n_target_classes = n_target_classes

    def _choose_targets(self, clean_logits: Tensor, y: Tensor,
                        targets: Tensor | None) -> Tensor | None:
        if targets is not None:
            raise ValueError("APGDT chooses its own targets (the top-k other classes) and "
                             "counts any misclassification as success; for targets of your "
                             "choice use APGD(threat, loss='dlr') with targets=")
        return None

    def _rank(self, model: Oracle, x: Tensor, y: Tensor, clean_logits: Tensor,
              k: int) -> Tensor:
        """The ``k`` target classes of each sample, in the order they are attacked: the
        highest clean logits first (AutoAttack's ranking)."""
        return top_other_classes(clean_logits, y, k)

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor, generator: torch.Generator | None,
             ) -> Tensor:
        classes = clean_logits.shape[1]
        _check_classes(self.loss, classes, targeted=True)
        k = min(self.n_target_classes, classes - 1)
        best = x.clone()
        best_margin = torch.full((x.shape[0],), float("-inf"), device=x.device,
                                 dtype=clean_logits.dtype)
        todo = (~goal_reached(clean_logits, y, None)).nonzero().squeeze(1)
        ranked = torch.zeros((x.shape[0], k), dtype=torch.long, device=x.device)
        if todo.numel():
            ranked[todo] = self._rank(model.view(todo), x[todo], y[todo], clean_logits[todo], k)
        for j in range(k):
            for _ in range(self.restarts):
                if todo.numel() == 0:
                    return best
                ys = y[todo]
                adv, reached, _, logits = self._apgd(model.view(todo), x[todo], ys,
                                                     ranked[todo, j], None, generator)
                own = logits.gather(1, ys[:, None]).squeeze(1)
                margin = best_other(logits, ys) - own
                margin = torch.where(reached, torch.full_like(margin, float("inf")), margin)
                better = margin > best_margin[todo]
                best[todo[better]], best_margin[todo[better]] = adv[better], margin[better]
                todo = todo[~reached]
        return best
