"""Clean accuracy: the share of images a model classifies correctly."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advkit.models.access import REJECT, rejects


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000,
             device: str | torch.device = "cpu") -> float:
    """Clean accuracy of ``model`` on (x, y), in batches, without gradients. A model that
    rejects inputs (a pipeline with detectors) gets a rejected image wrong."""
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device)
            pred = model(xb).argmax(1)
            if rejects(model):
                pred = torch.where(model.rejected(xb).to(pred.device), REJECT, pred)
            correct += int((pred.cpu() == y[i:i + batch_size]).sum())
    return correct / max(1, x.shape[0])
