"""Clean accuracy: the share of images a model classifies correctly."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000,
             device: str | torch.device = "cpu") -> float:
    """Clean accuracy of ``model`` on (x, y), in batches, without gradients."""
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i:i + batch_size].to(device))
            correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / max(1, x.shape[0])
