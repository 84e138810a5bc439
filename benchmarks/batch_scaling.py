"""Micro-benchmark: a model's throughput (images/s) against the batch size.

Does a bigger batch run faster on this device? It decides whether an attack gains by
running several target classes (or restarts) as one batch instead of in turn: on a GPU
small MNIST batches leave the device idle; on a CPU core a batch that outgrows the cache
runs slower. Times one forward+backward pass (gradient w.r.t. the input) and one no-grad
forward pass of an untrained zoo model (speed does not depend on the weights) on random
28x28 images, best of ``--repeats``. Prints a Markdown table and writes nothing. Run::

    python benchmarks/batch_scaling.py [--model stride_cnn] [--sizes 100 920 2760 8280]
                                       [--threads 1] [--device cpu] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advkit.models import create  # noqa: E402  (after the path set-up)


def gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    xg = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(xg), y, reduction="sum")
    return torch.autograd.grad(loss, xg)[0]


def forward(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def best_seconds(fn: Callable[..., Tensor], args: tuple, device: torch.device,
                 repeats: int) -> float:
    """Fastest of ``repeats`` timed calls ``fn(*args)`` after one warm-up call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stride_cnn", help="a zoo architecture (MNIST-sized)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 920, 2760, 8280])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.sizes) or args.repeats < 1:
        parser.error("--sizes and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = create(args.model).to(device).eval()
    torch.manual_seed(0)

    print(f"`python benchmarks/batch_scaling.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
          f"  \n{args.model} on {device} ({args.threads} threads), torch {torch.__version__}, "
          f"best of {args.repeats}\n")
    print("| batch | forward+backward images/s | forward images/s |")
    print("|---:|---:|---:|")
    for n in args.sizes:
        x = torch.rand(n, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (n,), device=device)
        fb = best_seconds(gradient, (model, x, y), device, args.repeats)
        fw = best_seconds(forward, (model, x, y), device, args.repeats)
        print(f"| {n} | {n / fb:,.0f} | {n / fw:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
