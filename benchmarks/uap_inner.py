"""UAP with DeepFool as its inner step on the demo's small_cnn: fooling rate, passes, time.

    python benchmarks/uap_inner.py [--limit 500]

One thread; fits one perturbation per norm (Linf 0.2, L2 3.0) on the first ``--limit``
MNIST test images, at most 5 epochs, delta 0.2, batch 32 (the settings of the UAP rows
in RESULTS.md). Run it in two checkouts to compare two versions of the inner step.
"""

from __future__ import annotations

import argparse
import time

import torch

from advkit import ThreatModel, data
from advkit.attacks import UniversalPerturbation
from advkit.demo import demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = demo_model(progress=False, log=lambda _: None)
    x, y = data.load("mnist", split="test", limit=args.limit)
    print("| norm | eps | fooling rate | forward | backward | seconds |")
    print("|---|---|---|---|---|---|")
    for norm, eps in (("linf", 0.2), ("l2", 3.0)):
        attack = UniversalPerturbation(ThreatModel(norm, eps), inner="deepfool", max_epochs=5,
                                       delta=0.2, batch_size=32)
        start = time.perf_counter()
        result = attack(model, x, y)
        seconds = time.perf_counter() - start
        rate = result.extras["fooled"].float().mean().item()
        print(f"| {norm} | {eps} | {rate:.1%} | {result.forward_passes} | "
              f"{result.backward_passes} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
