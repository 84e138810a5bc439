"""MALT (Melamed et al., 2024): targeted APGD on the classes nearest in the linearised model."""

from __future__ import annotations

import torch
from torch import Tensor

from advkit.attacks._linearise import logit_differences
from advkit.attacks.apgd import APGDT
from advkit.attacks.base import Oracle
from advkit.threat import ThreatModel

#: The dual norm of each threat norm: a linear function w.x changes by at most
#: ||w||_dual * eps over the eps-ball.
DUAL = {"linf": 1.0, "l2": 2.0, "l1": float("inf")}


def linearised_distances(model: Oracle, x: Tensor, y: Tensor, norm: str,
                         classes: int) -> Tensor:
    """Per sample and class, the distance from ``x`` to the class's boundary with ``y`` in
    the model linearised at ``x``: ``(z_y - z_t) / ||grad(z_t - z_y)||_dual`` (n, C); the
    true class gets ``inf``. One forward and ``C - 1`` backward passes per sample."""
    n = x.shape[0]
    others = torch.arange(classes, device=x.device).expand(n, classes)
    others = others[others != y[:, None]].view(n, classes - 1)
    _, values, grads = model.jacobian(x, logit_differences(others, y, classes))
    size = grads.flatten(2).norm(p=DUAL[norm], dim=2).clamp_min(1e-12)
    distance = torch.full((n, classes), float("inf"), device=x.device, dtype=values.dtype)
    # values = z_t - z_y, negative while x is classified y: its negation is the gap.
    return distance.scatter(1, others, (-values / size).clamp_min(0))


class MALT(APGDT):
    """Targeted APGD on the few classes that are nearest once the model is linearised.

    Melamed, Yehudai, Shamir. "MALT Powers Up Adversarial Attacks", NeurIPS 2024.
    https://arxiv.org/abs/2407.02240

    AutoAttack's APGD-T attacks the 9 classes with the highest clean logits in turn.
    MALT ranks the classes instead by the distance to their decision boundary in the model
    linearised at ``x`` (the paper's "mesoscopic almost linearity": a robust model is close
    to linear at the scale of eps), ``(z_y - z_t) / ||grad (z_t - z_y)||_*`` with ``||.||_*``
    the dual norm of the threat's, and runs targeted APGD on the ``n_target_classes``
    nearest only. The ranking costs one Jacobian per sample (one forward and C - 1
    backward passes), paid once; each target then costs what APGD-T's does. As APGD-T, the
    goal is untargeted: a sample leaves at its first misclassification, and
    ``result.success`` means misclassified.

    Args:
        threat: norm (linf or l2), eps, bounds.
        steps: iterations per target (default 100).
        restarts: runs per target (default 1).
        n_target_classes: how many of the nearest classes to attack (default 3).
        loss, alpha, rho, random_start, seed: as in :class:`APGDT`.
    """

    paper = "Melamed et al. 2024, MALT Powers Up Adversarial Attacks"

    def __init__(
        self, threat: ThreatModel, *, steps: int = 100, restarts: int = 1,
        n_target_classes: int = 3, loss: str = "dlr", alpha: float = 0.75, rho: float = 0.75,
        random_start: bool = True, seed: int | None = 0,
    ) -> None:
        super().__init__(threat, steps=steps, restarts=restarts,
                         n_target_classes=n_target_classes, loss=loss, alpha=alpha, rho=rho,
                         random_start=random_start, seed=seed)

    def _rank(self, model: Oracle, x: Tensor, y: Tensor, clean_logits: Tensor,
              k: int) -> Tensor:
        distance = linearised_distances(model, x, y, self.threat.norm, clean_logits.shape[1])
        return distance.topk(k, dim=1, largest=False).indices
