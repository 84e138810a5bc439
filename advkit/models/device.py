"""Where a model runs: the device of its parameters."""

from __future__ import annotations

import torch
from torch import nn


def device_of(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of ``model``'s first parameter; ``default`` for a model without any
    (a parameter-free transform, a wrapper that holds none)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device(default)
