"""Fast Gradient Sign Method (Goodfellow et al., 2015)."""

from __future__ import annotations

import torch
from torch import Tensor

from advkit.attacks.ascent import ascend, objective, steepest_direction
from advkit.attacks.base import Attack, Oracle, Taxonomy
from advkit.threat import ThreatModel


class FGSM(Attack):
    """One step of size eps along the sign of the loss gradient.

    Goodfellow, Shlens, Szegedy. "Explaining and Harnessing Adversarial Examples",
    ICLR 2015. https://arxiv.org/abs/1412.6572

    ``x_adv = clip(x + eps * sign(grad_x CE(f(x), y)))``. With ``targets`` it is the
    one-step target class method (Kurakin et al., 2017): a step *down* the
    cross-entropy of the target, ``x - eps * sign(grad_x CE(f(x), t))``. For L2 it is
    the fast gradient method, a step of length eps along the normalised gradient.
    Samples already misclassified (or already at their target) are left unchanged.

    Args:
        threat: norm (linf or l2), eps, bounds.
        loss: ``"ce"`` or ``"margin"``.
    """

    paper = "Goodfellow et al. 2015, Explaining and Harnessing Adversarial Examples"
    taxonomy = Taxonomy(frequency="one-time")
    norms = ("linf", "l2")

    def __init__(self, threat: ThreatModel, *, loss: str = "ce", seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        objective(loss, torch.zeros(1, dtype=torch.long), None)  # validates the name
        self.loss = loss

    def _needs_clean_pass(self) -> bool:
        return False  # the one gradient pass is at x: it also serves the entry checks

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None) -> Tensor:
        eps, norm = self.threat.eps, self.threat.norm
        return ascend(
            model, x, y, targets, x, self.threat, 1,
            lambda labels, tgts: objective(self.loss, labels, tgts),
            lambda xa, grad, state: torch.add(xa, steepest_direction(grad, norm), alpha=eps),
        )
