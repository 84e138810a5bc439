"""Momentum Iterative FGSM (Dong et al., 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from advkit.attacks.ascent import ascend, objective, steepest_direction
from advkit.attacks.base import Attack, Oracle, Taxonomy, require_at_least
from advkit.threat import ThreatModel


class MIFGSM(Attack):
    """Iterative FGSM with a momentum term that stabilises the update direction.

    Dong, Liao, Pang, Su, Zhu, Hu, Li. "Boosting Adversarial Attacks with
    Momentum", CVPR 2018. https://arxiv.org/abs/1710.06081

    ``g_{t+1} = mu * g_t + grad / ||grad||_1``; ``x_{t+1} = proj(x_t + alpha * sign(g_{t+1}))``
    with ``alpha = eps / steps`` (L2: the normalised ``g_{t+1}`` instead of its sign).

    Args:
        threat: norm (linf or l2), eps, bounds.
        steps: iterations (paper: 10).
        decay: the momentum factor mu (paper: 1.0).
        step_size: default eps / steps.
        loss, early_exit, seed: as in :class:`advkit.attacks.PGD`.
    """

    paper = "Dong et al. 2018, Boosting Adversarial Attacks with Momentum"
    taxonomy = Taxonomy(frequency="iterative")
    norms = ("linf", "l2")

    def __init__(self, threat: ThreatModel, *, steps: int = 10, decay: float = 1.0,
                 step_size: float | None = None, loss: str = "ce", early_exit: bool = True,
                 seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        require_at_least(1, steps=steps)
        if decay < 0:
            raise ValueError(f"decay must be >= 0 (got {decay})")
        objective(loss, torch.zeros(1, dtype=torch.long), None)
        self.steps = steps
        self.decay = decay
        self.step_size = step_size if step_size is not None else threat.eps / steps
        self.loss = loss
        self.early_exit = early_exit

    def _step(self, xa: Tensor, grad: Tensor, state: dict[str, Tensor]) -> Tensor:
        l1 = grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        state["g"].mul_(self.decay).add_(grad / l1)
        return torch.add(xa, steepest_direction(state["g"], self.threat.norm),
                         alpha=self.step_size)

    def _needs_clean_pass(self) -> bool:
        return False  # the iteration starts at x: its first gradient pass serves the checks

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None) -> Tensor:
        return ascend(model, x, y, targets, x, self.threat, self.steps,
                      lambda labels, tgts: objective(self.loss, labels, tgts), self._step,
                      state={"g": torch.zeros_like(x)}, early_exit=self.early_exit)
