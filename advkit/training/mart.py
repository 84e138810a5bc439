"""MART (Wang et al., 2020): misclassification-aware adversarial training."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.threat import ThreatModel
from advkit.training.adversarial_training import PGDTraining


class MART(PGDTraining):
    """Wang, Zou, Yi, Bailey, Ma, Gu. "Improving Adversarial Robustness Requires
    Revisiting Misclassified Examples", ICLR 2020. https://openreview.net/forum?id=rklOg6EFwS

    ``loss = BCE(f(x'), y) + lam * KL(f(x) || f(x')) * (1 - f(x)_y)`` with ``x'`` from
    PGD-CE, where the boosted cross-entropy BCE adds ``-log(1 - max_{k != y} f(x')_k)``
    and the KL term is weighted towards misclassified (low-confidence) clean samples.

    Args:
        threat: the perturbation set.
        lam: weight of the KL term (paper: 5.0 on CIFAR-10, 6.0 in the code).
        steps, step_size, warmup_epochs, eval_batch: as in :class:`PGDTraining`.
    """

    name = "mart"

    def __init__(self, threat: ThreatModel, *, lam: float = 6.0, steps: int = 10,
                 step_size: float | None = None, warmup_epochs: int = 0,
                 eval_batch: int = 500) -> None:
        super().__init__(threat, steps=steps, step_size=step_size, warmup_epochs=warmup_epochs,
                         eval_batch=eval_batch)
        if lam < 0:
            raise ValueError(f"lam must be >= 0 (got {lam})")
        self.lam = lam

    def params(self) -> dict[str, Any]:
        return {**super().params(), "lam": self.lam}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = self.adversarial(model, x, y)
        logits, logits_adv = model(torch.cat([x, x_adv])).chunk(2)
        p_adv, p_clean = logits_adv.softmax(dim=1), logits.softmax(dim=1)
        other = p_adv.scatter(1, y[:, None], 0.0).amax(dim=1)
        bce = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - other).mean()
        kl = (p_clean * (p_clean.clamp_min(1e-12).log() - F.log_softmax(logits_adv, dim=1)))
        weight = 1.0 - p_clean.gather(1, y[:, None]).squeeze(1)
        return bce + self.lam * (kl.sum(dim=1) * weight).mean(), logits_adv
