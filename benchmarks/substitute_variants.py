"""Probe: why our substitutes transfer less than Papernot et al.'s 84.24% (MNIST, Linf 0.3).

    OMP_NUM_THREADS=1 python benchmarks/substitute_variants.py      # ~2 min on one thread

Target: the test model small_cnn behind ``labels_only``; S_0 = test[1000:1150]; judged with
FGSM on the substitute, on the target's correctly classified test[:1000] (the setting of
benchmarks/transfer.py). Varies the substitute's architecture and epochs, and the sign of
the Jacobian augmentation step: the paper's Algorithm 1 steps ``+lambda`` (advkit's
default), its later periodic step flips every ``tau`` epochs (advkit's ``tau=3``), and
CleverHans' tutorial steps ``-lambda`` for the first three augmentations then ``+lambda``.
Prints one line per variant; RESULTS.md's "Reading the transfer figures" quotes a run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import advkit
from advkit import ThreatModel, models
from advkit.attacks import FGSM, Substitute


class CleverHansOrder(Substitute):
    """``-lambda`` for the first three augmentations, then ``+lambda``."""

    def step(self, rho: int) -> float:
        return -self.lam if rho < 3 else self.lam


class AlwaysNegative(Substitute):
    """``-lambda`` every time: new points step against the label's probability."""

    def step(self, rho: int) -> float:
        return -self.lam


VARIANTS = [
    ("mlp, 10 epochs, +lambda", Substitute, "mlp", 10, {}),
    ("mlp, 3 epochs, +lambda", Substitute, "mlp", 3, {}),
    ("lenet5, 10 epochs, +lambda (transfer.py's)", Substitute, "lenet5", 10, {}),
    ("lenet5, 3 epochs, +lambda", Substitute, "lenet5", 3, {}),
    ("lenet5, 10 epochs, tau=3 (+,+,+,-,-)", Substitute, "lenet5", 10, {"tau": 3}),
    ("lenet5, 10 epochs, CleverHans (-,-,-,+,+)", CleverHansOrder, "lenet5", 10, {}),
    ("lenet5, 10 epochs, always -lambda", AlwaysNegative, "lenet5", 10, {}),
]


def main() -> None:
    torch.manual_seed(0)
    threat = ThreatModel("linf", 0.3)
    x_all, y_all = advkit.data.load("mnist", split="test", limit=1150)
    x, y, seeds = x_all[:1000], y_all[:1000], x_all[1000:1150]
    target = models.load(Path.home() / ".cache" / "advkit" / "test-models"
                         / "small_cnn-mnist.safetensors")
    with torch.no_grad():
        keep = target(x).argmax(1) == y
    xs, ys = x[keep], y[keep]
    for label, cls, arch, epochs, extra in VARIANTS:
        start = time.perf_counter()
        sub = cls(threat, arch, seed_images=seeds, rounds=6, epochs=epochs, lam=0.1,
                  attack=FGSM(threat), **extra)
        result = sub(models.labels_only(target), xs, ys)
        accuracy = (result.extras["substitute_labels"] == ys).float().mean().item()
        print(f"{label}: substitute accuracy {accuracy:.1%}, transfer success "
              f"{result.success_rate:.1%} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
