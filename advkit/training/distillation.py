"""Defensive distillation (Papernot et al., 2016) and its teacher's temperature training."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.training.recipe import Recipe


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    return float(temperature)


class TemperatureTraining(Recipe):
    """Cross-entropy of ``softmax(logits / T)``: how the distillation teacher is trained."""

    name = "temperature"

    def __init__(self, temperature: float = 100.0) -> None:
        self.temperature = _check_temperature(temperature)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits / self.temperature, y), logits


class Distillation(Recipe):
    """Papernot, McDaniel, Wu, Jha, Swami. "Distillation as a Defense to Adversarial
    Perturbations against Deep Neural Networks", IEEE S&P 2016. arXiv 1511.04508.

    The student learns the teacher's soft labels ``softmax(teacher(x) / T)`` at the
    same temperature and is deployed at T = 1: its raw logits are about T times
    larger than a normally trained model's, so its softmax saturates and
    cross-entropy gradients vanish. That is gradient masking, not robustness:
    logit-margin attacks (C&W, APGD-DLR, PGD with ``loss="margin"``) still break
    it (Carlini & Wagner 2016, arXiv 1607.04311), and advkit's evaluation checks
    are expected to flag it.

    Args:
        teacher: a model trained with :class:`TemperatureTraining` at ``temperature``.
        temperature: T (paper: 100 on MNIST).
    """

    name = "distillation"

    def __init__(self, teacher: nn.Module, temperature: float = 100.0) -> None:
        self.temperature = _check_temperature(temperature)
        self.teacher = teacher.eval()

    def params(self) -> dict[str, Any]:
        from advkit.models import fingerprint
        return {"temperature": self.temperature, "teacher": fingerprint(self.teacher)}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            soft = (self.teacher(x) / self.temperature).softmax(dim=1)
        logits = model(x)
        loss = -(soft * F.log_softmax(logits / self.temperature, dim=1)).sum(dim=1).mean()
        return loss, logits
