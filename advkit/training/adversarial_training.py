"""Adversarial training: PGD (Madry et al., 2018) and "fast" FGSM-RS (Wong et al., 2020)."""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from advkit.attacks import PGD
from advkit.attacks.base import require_at_least
from advkit.models.device import device_of
from advkit.threat import ThreatModel
from advkit.training.recipe import Recipe, StopTraining, attack_mode


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                    steps: int = 10) -> float:
    """Accuracy under PGD (``steps`` steps, random start) on a held-out batch."""
    device = device_of(model)
    return PGD(threat, steps=steps, seed=0)(model, x.to(device), y.to(device)).robust_accuracy


class PGDTraining(Recipe):
    """Train on PGD adversarial examples (Madry et al. 2018, arXiv 1706.06083).

    Args:
        threat: the perturbation set trained against (e.g. Linf eps 0.3 on MNIST).
        steps: PGD steps per batch (Madry: 40 on MNIST, 7 on CIFAR-10).
        step_size: default ``2.5 * eps / steps``.
        warmup_epochs: eps grows linearly from eps/warmup to eps over these epochs
            (helps small models start learning; 0 = full eps from the start).
        eval_batch: held-out images used each epoch for robust accuracy (PGD-10).
    """

    name = "pgd"

    def __init__(self, threat: ThreatModel, *, steps: int = 40, step_size: float | None = None,
                 warmup_epochs: int = 0, eval_batch: int = 500) -> None:
        if not threat.bounded or threat.eps <= 0:
            raise ValueError(f"adversarial training needs eps > 0 (got {threat.eps})")
        require_at_least(1, steps=steps)
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0 (got {warmup_epochs})")
        self.threat = threat
        self.steps = steps
        self.step_size = step_size if step_size is not None else 2.5 * threat.eps / steps
        self.warmup_epochs = warmup_epochs
        self.eval_batch = eval_batch
        self._eps = threat.eps

    def params(self) -> dict[str, Any]:
        return {"norm": self.threat.norm, "eps": self.threat.eps, "steps": self.steps,
                "step_size": self.step_size, "warmup_epochs": self.warmup_epochs,
                "eval_batch": self.eval_batch}

    def start_epoch(self, epoch: int, epochs: int) -> None:
        ramp = min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs else 1.0
        self._eps = self.threat.eps * ramp

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """PGD examples at the current eps, crafted in eval mode, full strength (no early exit)."""
        scale = self._eps / self.threat.eps
        threat = ThreatModel(self.threat.norm, self._eps, self.threat.bounds)
        attack = PGD(threat, steps=self.steps, step_size=self.step_size * scale,
                     early_exit=False, seed=None)  # seed None: the trainer's seeded global RNG
        with attack_mode(model) as inner:
            return attack(inner, x, y).x_adv

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(self.adversarial(model, x, y))
        return F.cross_entropy(logits, y), logits

    def end_epoch(self, model: nn.Module, epoch: int, x_val: Tensor,
                  y_val: Tensor) -> dict[str, float]:
        return {"robust_acc": robust_accuracy(model, x_val[:self.eval_batch],
                                              y_val[:self.eval_batch], self.threat)}


class FastAdversarialTraining(PGDTraining):
    """FGSM with a random start ("fast is better than free", Wong et al. 2020, arXiv 2001.03994).

    One FGSM step of size ``alpha = 1.25 * eps`` from a uniform random point of the
    ball. Known failure: *catastrophic overfitting*, where robustness to PGD
    collapses within an epoch while FGSM accuracy rises. Each epoch measures PGD
    robust accuracy on a held-out batch; when it falls below ``co_drop`` times the
    best seen so far, the run restores the best epoch's weights and stops
    (the paper's remedy: early stopping; a smaller ``alpha`` also helps). The check
    starts once the eps warm-up is over: before, PGD accuracy at the full eps is near 0
    and its noise would read as a collapse.
    """

    name = "fgsm_rs"

    def __init__(self, threat: ThreatModel, *, alpha: float | None = None,
                 warmup_epochs: int = 0, eval_batch: int = 500, co_drop: float = 0.5) -> None:
        super().__init__(threat, steps=1, step_size=alpha if alpha is not None
                         else 1.25 * threat.eps, warmup_epochs=warmup_epochs,
                         eval_batch=eval_batch)
        if not 0 < co_drop < 1:
            raise ValueError(f"co_drop must be in (0, 1) (got {co_drop})")
        self.co_drop = co_drop
        self._best: tuple[float, dict[str, Tensor]] | None = None

    def params(self) -> dict[str, Any]:
        return {**super().params(), "co_drop": self.co_drop}

    def end_epoch(self, model: nn.Module, epoch: int, x_val: Tensor,
                  y_val: Tensor) -> dict[str, float]:
        metrics = super().end_epoch(model, epoch, x_val, y_val)
        robust = metrics["robust_acc"]
        if epoch + 1 < self.warmup_epochs:
            # eps is still ramping up: robustness at the full eps is not expected yet, and
            # its noise around ~0 must not pass for a collapse (nor become the best epoch).
            return metrics
        if self._best is not None and robust < self.co_drop * self._best[0]:
            model.load_state_dict(self._best[1])
            raise StopTraining(
                f"catastrophic overfitting: PGD robust accuracy fell to {robust:.1%} "
                f"(best {self._best[0]:.1%}); restored the best epoch's weights and stopped. "
                "Try a smaller alpha or PGD training.")
        if self._best is None or robust >= self._best[0]:
            self._best = (robust, copy.deepcopy(model.state_dict()))
        return metrics

