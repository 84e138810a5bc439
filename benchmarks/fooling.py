"""Fooling images on MNIST (Nguyen, Yosinski & Clune 2015): generations and seconds until
every class has an evolved image the model labels with >= 99% confidence.

    python benchmarks/fooling.py                       # both encodings, seed 0 (~15 s)
    python benchmarks/fooling.py --seeds 0 1 2 --json  # several seeds, machine-readable
    python benchmarks/fooling.py --save fooling.npz    # the images, as arrays
    python benchmarks/fooling.py --png fooling.png     # the images: one row per run

The model is the cached MNIST test CNN (~/.cache/advkit/test-models/
small_cnn-mnist.safetensors) unless --model names another (any advkit.models.load spec).
It is seen through ``scores_only``: the run needs nothing else. Timings are wall seconds of
one process; run with OMP_NUM_THREADS=1 to compare with the figures in the README.

"Unrecognisable to people" cannot be measured here; as a proxy each image's L2 distance to
its nearest MNIST test digit (and that digit's label) is printed beside the median distance
from a real test digit to its nearest other test digit: a fooling image far beyond that,
or nearest to a digit of another class, is not a digit the test set holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

import advkit
from advkit.attacks import CPPNFooling
from advkit.models import scores_only

DEFAULT_MODEL = Path.home() / ".cache" / "advkit" / "test-models" / "small_cnn-mnist.safetensors"


def nearest_digits(images: torch.Tensor, reference: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the L2 distance to its nearest reference image and that image's label."""
    dist = torch.cdist(images.flatten(1).double(), reference.flatten(1).double())
    best = dist.min(dim=1)
    return best.values, labels[best.indices]


def real_digit_spread(reference: torch.Tensor, n: int = 1000) -> float:
    """The median distance from one of the first ``n`` test digits to its nearest other one."""
    dist = torch.cdist(reference[:n].flatten(1).double(), reference.flatten(1).double())
    dist[torch.arange(n), torch.arange(n)] = float("inf")
    return float(dist.min(dim=1).values.median())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--encodings", nargs="+", default=["cppn", "direct"],
                        choices=["cppn", "direct"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--generations", type=int, default=2000)
    parser.add_argument("--population", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="per run (default 120)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", help="write the images and confidences to this .npz")
    parser.add_argument("--png", help="write the images, one row per run, to this .png")
    args = parser.parse_args(argv)

    model = advkit.models.load(args.model)
    digits, digit_labels = advkit.data.load("mnist", "test")
    spread = real_digit_spread(digits)
    rows, saved, grids = [], {}, []
    for encoding in args.encodings:
        for seed in args.seeds:
            run = CPPNFooling(encoding, generations=args.generations,
                              population=args.population, target=args.target,
                              max_seconds=args.max_seconds, seed=seed)
            result = run.evolve(scores_only(model), (1, 28, 28))
            rows.append({
                "encoding": encoding, "seed": seed, "generations": result.generations,
                "queries": result.queries, "seconds": round(result.seconds, 2),
                "all_reached": bool(result.success.all()),
                "classes": result.classes.tolist(),
                "confidence": [round(c, 6) for c in result.confidences.tolist()],
                "reached_at": result.reached_at.tolist(),
                "seconds_at": [round(s, 2) for s in result.seconds_at.tolist()],
            })
            near, near_label = nearest_digits(result.images, digits, digit_labels)
            rows[-1]["nearest_digit_distance"] = [round(v, 3) for v in near.tolist()]
            rows[-1]["nearest_digit_label"] = near_label.tolist()
            grids.append(result.grid(gap=2))
            saved[f"{encoding}_{seed}_images"] = result.images.numpy()
            saved[f"{encoding}_{seed}_confidences"] = result.confidences.numpy()
    machine = {"python": sys.version.split()[0], "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if args.save:
        import numpy as np
        np.savez_compressed(args.save, **saved)
    if args.png:
        from PIL import Image
        sheet = torch.cat([torch.cat([g, torch.full((1, 2, g.shape[2]), 0.5)], dim=1)
                           for g in grids], dim=1)[0]
        Image.fromarray((sheet * 255).round().byte().numpy()).save(args.png)
    if args.json:
        print(json.dumps({"model": args.model, "machine": machine,
                          "real_digit_nearest_median": round(spread, 3), "runs": rows},
                         indent=1))
        return 0
    print(f"model {args.model}; {machine}")
    print(f"a real test digit's nearest other test digit: median L2 {spread:.2f}")
    for row in rows:
        print(f"\n{row['encoding']} seed {row['seed']}: {row['generations']} generations, "
              f"{row['queries']} queries, {row['seconds']} s, every class >= {args.target}: "
              f"{row['all_reached']}")
        print("class  confidence  generation  seconds  nearest digit (L2, label)")
        for c, conf, gen, sec, near, lab in zip(
                row["classes"], row["confidence"], row["reached_at"], row["seconds_at"],
                row["nearest_digit_distance"], row["nearest_digit_label"], strict=True):
            print(f"{c:5d}  {conf:10.6f}  {gen:10d}  {sec:7.2f}  {near:7.2f}, {lab}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
