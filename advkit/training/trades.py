"""TRADES (Zhang et al., 2019): trade natural accuracy against a robustness regulariser."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.attacks.ascent import ascend, steepest_direction
from advkit.models.access import Oracle
from advkit.threat import ThreatModel
from advkit.training.adversarial_training import PGDTraining
from advkit.training.recipe import attack_mode


def kl_to(p_clean: Tensor):
    """Per-sample KL(p_clean || softmax(logits)): the objective TRADES' inner step ascends."""
    log_p = p_clean.clamp_min(1e-12).log()
    return lambda logits: (p_clean * (log_p - F.log_softmax(logits, dim=1))).sum(dim=1)


class TRADES(PGDTraining):
    """Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan. "Theoretically Principled Trade-off
    between Robustness and Accuracy", ICML 2019. arXiv 1901.08573.

    ``loss = CE(f(x), y) + beta * KL(f(x) || f(x'))`` where ``x'`` maximises the KL
    term inside the ball (``steps`` projected steps from ``x + 0.001 * N(0, I)``).

    Args:
        threat: the perturbation set.
        beta: weight of the robustness term (paper: 6.0; larger = more robust, less accurate).
        steps: inner maximisation steps (paper: 40 on MNIST, 10 on CIFAR-10).
        step_size: default ``2.5 * eps / steps``.
    """

    name = "trades"

    def __init__(self, threat: ThreatModel, *, beta: float = 6.0, steps: int = 10,
                 step_size: float | None = None, warmup_epochs: int = 0,
                 eval_batch: int = 500) -> None:
        super().__init__(threat, steps=steps, step_size=step_size, warmup_epochs=warmup_epochs,
                         eval_batch=eval_batch)
        if beta < 0:
            raise ValueError(f"beta must be >= 0 (got {beta})")
        self.beta = beta

    def params(self) -> dict[str, Any]:
        return {**super().params(), "beta": self.beta}

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        threat = ThreatModel(self.threat.norm, self._eps, self.threat.bounds)
        step = self.step_size * self._eps / self.threat.eps
        with attack_mode(model) as inner, torch.no_grad():
            p_clean = inner(x).softmax(dim=1)
        start = threat.clip(x + 0.001 * torch.randn_like(x))
        with attack_mode(model) as inner:
            return ascend(
                Oracle(inner, x.shape[0], device=x.device), x, y, None, start, threat, self.steps,
                lambda labels, targets: kl_to(p_clean),
                lambda xa, grad, state: xa + step * steepest_direction(grad, threat.norm),
                early_exit=False,  # the KL target needs every sample at every step
            )

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = self.adversarial(model, x, y)
        logits, logits_adv = model(torch.cat([x, x_adv])).chunk(2)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1),
                      reduction="batchmean")
        return F.cross_entropy(logits, y) + self.beta * kl, logits_adv
