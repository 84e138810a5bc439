"""Gaussian data augmentation (Cohen et al., 2019): the base of randomised smoothing."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.training.recipe import Recipe


class GaussianAugmentation(Recipe):
    """Train on ``x + sigma * N(0, I)`` (not clipped: randomised smoothing certifies the
    classifier of exactly these noisy inputs; Cohen, Rosenfeld, Kolter, ICML 2019,
    arXiv 1902.02918).

    Args:
        sigma: noise standard deviation in [0, 1] pixel units (0.25 is common).
    """

    name = "noise"

    def __init__(self, sigma: float = 0.25) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0 (got {sigma})")
        self.sigma = float(sigma)

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x + self.sigma * torch.randn_like(x))
        return F.cross_entropy(logits, y), logits
