"""Toy models and batches shared by the attack tests: tiny, seeded, fast to attack."""

from __future__ import annotations

import math

import torch
from torch import nn

#: The dual exponent q of each norm (the distance to a hyperplane divides by ||w||_q).
DUAL = {"l2": 2.0, "linf": 1.0, "l1": math.inf}


def toy_cnn(seed: int = 0) -> nn.Module:
    """A 4-channel convolution and a linear layer on 1x8x8 inputs, 10 classes, eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10)).eval()


def affine(classes: int = 10, seed: int = 0) -> nn.Module:
    """An affine classifier ``Sequential(Flatten, Linear)`` on 1x8x8 inputs, eval mode: its
    exact distances to the decision boundary are :func:`distance_to_boundary`'s."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, classes)).eval()


class Saturated(nn.Module):
    """A model with its logits times ``factor`` (10^4): the softmax is one-hot, so
    cross-entropy gradients vanish (gradient masking by temperature, as in defensive
    distillation)."""

    def __init__(self, model: nn.Module, factor: float = 1e4) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.factor


def labelled(model: nn.Module, n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uniform 1x8x8 images labelled as ``model`` classifies them."""
    x, _ = random_batch(n, seed)
    with torch.no_grad():
        return x, model(x).argmax(1)


def random_batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uniform 1x8x8 images in [0, 1] with uniform labels in 0..9."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def distance_to_boundary(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         norm: str) -> torch.Tensor:
    """min_j |(w_j - w_y).x + b_j - b_y| / ||w_j - w_y||_q: the exact minimal distance from
    each x to the decision boundary of the affine model ``Sequential(Flatten, Linear)``."""
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    logits = x.flatten(1) @ weight.T + bias
    w_diff = weight[None] - weight[y][:, None]
    f_diff = logits - logits.gather(1, y[:, None])
    dist = f_diff.abs() / w_diff.norm(p=DUAL[norm], dim=2)
    dist[torch.arange(len(y)), y] = math.inf
    return dist.min(dim=1).values
