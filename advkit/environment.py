"""What a result was produced with: versions, device, platform (recorded with every result)."""

from __future__ import annotations

import platform
import sys

import torch

from advkit._version import __version__


def describe(device: str | torch.device = "cpu") -> dict[str, str]:
    """Library versions, Python, OS and the device, as strings."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {
        "advkit": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": f"{device.type}: {name}",
    }
