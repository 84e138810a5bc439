"""Projected Gradient Descent (Madry et al., 2018) for Linf, L2 and L1."""

from __future__ import annotations

import torch
from torch import Tensor

from advkit.attacks.ascent import LOSSES, ascend, objective, steepest_direction
from advkit.attacks.base import Attack, Oracle, Taxonomy, goal_reached, require_at_least
from advkit.threat import ThreatModel


class PGD(Attack):
    """Projected gradient ascent on the loss inside the eps-ball, from a random start.

    Madry, Makelov, Schmidt, Tsipras, Vladu. "Towards Deep Learning Models
    Resistant to Adversarial Attacks", ICLR 2018. https://arxiv.org/abs/1706.06083

    Each step moves ``step_size`` along the steepest-ascent direction of the
    threat model's norm (sign of the gradient for Linf, the normalised gradient
    for L2, a sparse top-coordinate direction for L1) and projects back onto the
    ball intersected with the box.

    Args:
        threat: norm (linf, l2, l1), eps, bounds.
        steps: iterations per restart (default 40).
        step_size: step length in the threat model's norm; default ``2.5 * eps / steps``
            (Madry et al.'s rule: enough to cross the ball and back).
        random_start: start from a uniform point of the ball (default True).
        restarts: independent runs; a sample counts as broken if any restart breaks
            it, and later restarts only run on samples still unbroken.
        loss: ``"ce"`` (cross-entropy) or ``"margin"`` (Carlini-Wagner logit margin).
        early_exit: stop spending passes on a sample once its goal is reached.
        l1_sparsity: for L1, the quantile of |gradient| above which coordinates move.
        seed: seed of the random starts (same seed, same result); None for fresh draws.
    """

    paper = "Madry et al. 2018, Towards Deep Learning Models Resistant to Adversarial Attacks"
    taxonomy = Taxonomy(frequency="iterative")
    norms = ("linf", "l2", "l1")

    def __init__(
        self, threat: ThreatModel, *, steps: int = 40, step_size: float | None = None,
        random_start: bool = True, restarts: int = 1, loss: str = "ce",
        early_exit: bool = True, l1_sparsity: float = 0.99, seed: int | None = 0,
    ) -> None:
        super().__init__(threat, seed=seed)
        require_at_least(1, steps=steps, restarts=restarts)
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0 (got {step_size})")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
        if not 0 <= l1_sparsity < 1:
            raise ValueError(f"l1_sparsity must be in [0, 1) (got {l1_sparsity})")
        self.steps = steps
        self.step_size = step_size if step_size is not None else 2.5 * threat.eps / steps
        self.random_start = random_start
        self.restarts = restarts
        self.loss = loss
        self.early_exit = early_exit
        self.l1_sparsity = l1_sparsity

    def _objective(self, labels: Tensor, targets: Tensor | None):
        return objective(self.loss, labels, targets)

    def _step(self, xa: Tensor, grad: Tensor, state: dict[str, Tensor]) -> Tensor:
        direction = steepest_direction(grad, self.threat.norm, xa, self.threat.bounds,
                                       self.l1_sparsity)
        return torch.add(xa, direction, alpha=self.step_size)

    def _needs_clean_pass(self) -> bool:
        # PGD never reads the clean logits: its first gradient pass (at x, or at the random
        # start) serves the entry checks, so a call costs steps + 1 forward passes.
        return False

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.threat.random_start(x, generator) if self.random_start else x

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None) -> Tensor:
        if self.restarts == 1:
            return ascend(model, x, y, targets, self._start(x, generator), self.threat,
                          self.steps, self._objective, self._step, early_exit=self.early_exit)
        best = x.clone()
        best_score = torch.full((x.shape[0],), float("-inf"), device=x.device)
        todo = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.restarts):
            xs, ys = x[todo], y[todo]
            ts = targets[todo] if targets is not None else None
            adv = ascend(model.view(todo), xs, ys, ts, self._start(xs, generator), self.threat,
                         self.steps, self._objective, self._step, early_exit=self.early_exit)
            logits = model.logits(adv, rows=todo)
            # Keep, per sample, the restart with the highest objective; a success beats all.
            score = self._objective(ys, ts)(logits)
            score = torch.where(goal_reached(logits, ys, ts), torch.full_like(score, float("inf")),
                                score)
            better = score > best_score[todo]
            best[todo[better]] = adv[better]
            best_score[todo[better]] = score[better]
            todo = todo[best_score[todo] < float("inf")]
            if todo.numel() == 0:
                break
        return best
