"""Denoising autoencoder training (MagNet's reformer and detector, Meng & Chen 2017)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.training.recipe import Recipe


class DenoisingAutoencoder(Recipe):
    """Train an autoencoder to map ``clip(x + noise * N(0, I), 0, 1)`` back to ``x`` with the
    mean squared error (Meng & Chen 2017, "MagNet: a Two-Pronged Defense against
    Adversarial Examples", section 3 and 5.1, https://arxiv.org/abs/1705.09064: noise
    volume 0.1 on MNIST). The paper's activity regulariser (L2, 1e-9) is left out: at that
    weight it changes nothing measurable.

    A reconstructing recipe (``reconstructs = True``): the trainer reports the held-out
    reconstruction MSE instead of an accuracy, and trains zoo architectures of kind
    ``"autoencoder"`` (``magnet_ae``) only.

    Args:
        noise: standard deviation of the Gaussian noise in [0, 1] pixel units (default 0.1).
    """

    name = "denoising"
    reconstructs = True

    def __init__(self, noise: float = 0.1) -> None:
        if isinstance(noise, bool) or not isinstance(noise, int | float) or not noise >= 0:
            raise ValueError(f"noise must be a standard deviation >= 0 (got {noise!r}); "
                             "MagNet uses 0.1")
        self.noise = float(noise)

    def params(self) -> dict[str, Any]:
        return {"noise": self.noise}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        noisy = (x + self.noise * torch.randn_like(x)).clamp(0, 1)
        reconstruction = model(noisy)
        return F.mse_loss(reconstruction, x), reconstruction


def reconstruction_mse(model: nn.Module, x: Tensor, *, batch_size: int = 1000,
                       device: str | torch.device = "cpu") -> float:
    """Mean squared error between ``x`` and ``model(x)`` over every pixel, in batches,
    without gradients: the held-out metric of a reconstructing recipe."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device)
            total += float(F.mse_loss(model(xb), xb, reduction="sum"))
    return total / max(1, x.numel())
