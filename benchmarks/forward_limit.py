"""How close the decision-based attacks come to the model's own forward limit.

    python benchmarks/forward_limit.py --threads 1

A decision-based attack at a given query budget must send that many images through the
model; no library can answer them faster than the model's forward pass does. This script
measures, in one run on the same model (the cached MNIST test CNN), the forward throughput
(images/s, no gradient) at several batch sizes, and the queries per second of advkit's and
ART's HopSkipJump (20 images, ``--budget`` queries each, queries counted by
``blackbox.Counter``). The ratio of an attack's rate to the forward limit bounds how much
faster any implementation could be: an attack at a fraction f of the limit can gain at
most 1/f. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blackbox import Counter, run_advkit, run_art  # noqa: E402

import advkit  # noqa: E402
from advkit import ThreatModel  # noqa: E402
from advkit.attacks import Boundary, GenAttack, HopSkipJump, OnePixel  # noqa: E402


def forward_rate(model: torch.nn.Module, x: torch.Tensor, batch: int, seconds: float) -> float:
    """Images per second through ``model`` in batches of ``batch`` (no gradient)."""
    images = x[:batch] if len(x) >= batch else x.repeat(math.ceil(batch / len(x)), 1, 1, 1)[:batch]
    done, start = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - start < seconds:
            model(images)
            done += batch
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="+", default=["decision", "gen", "pixel"],
                        help="which rows: decision (HopSkipJump, Boundary), gen (GenAttack), "
                             "pixel (one-pixel DE, 5 pixels: advkit, torchattacks, scipy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = advkit.models.load("small_cnn").eval()
    x, y = advkit.data.load("mnist", split="test", limit=max(args.limit, 512))
    rates = {b: forward_rate(model, x, b, 2.0) for b in (1, 20, 100, 512)}
    x, y = x[:args.limit], y[:args.limit]
    print(f"forward limit, {args.threads} thread(s): " + ", ".join(
        f"batch {b}: {r:,.0f} images/s" for b, r in rates.items()))
    l2 = ThreatModel("l2", math.inf)
    runs = []
    if "decision" in args.families:
        runs += [("advkit HopSkipJump", run_advkit(HopSkipJump(l2, max_queries=args.budget))),
                 ("ART HopSkipJump", run_art("HopSkipJump", args.budget)),
                 ("advkit Boundary", run_advkit(Boundary(l2, max_queries=args.budget))),
                 ("ART BoundaryAttack", run_art("BoundaryAttack", args.budget))]
    if "gen" in args.families:
        runs += [("advkit GenAttack", _gen_advkit(args.budget)),
                 ("Foolbox GenAttack", _gen_foolbox(args.budget))]
    if "pixel" in args.families:
        runs += _pixel_rows(args.budget)
    for name, runner in runs:
        counter = Counter(model, x, y, [args.budget])
        torch.manual_seed(0)
        numpy.random.seed(0)
        start = time.perf_counter()
        runner(counter)
        seconds = time.perf_counter() - start
        rate = counter.total / seconds
        print(f"{name}: {counter.total:,} queries in {seconds:.1f} s = {rate:,.0f} queries/s; "
              + ", ".join(f"{rate / r:.0%} of batch-{b} forward" for b, r in rates.items()),
              flush=True)
    return 0


# GenAttack (targeted at the next class, Linf 0.3): the counter only counts images here.
def _gen_advkit(budget: int):
    def run(counter: Counter) -> None:
        counter.per_sample = False
        GenAttack(ThreatModel("linf", 0.3), max_queries=budget)(
            advkit.models.scores_only(counter), counter.x, counter.y,
            targets=(counter.y + 1) % 10)
    return run


def _gen_foolbox(budget: int):
    def run(counter: Counter) -> None:
        import foolbox as fb

        counter.per_sample = False
        criterion = fb.criteria.TargetedMisclassification((counter.y + 1) % 10)
        fb.attacks.GenAttack(steps=budget // 10)(  # population 10: 10 queries per step
            fb.PyTorchModel(counter, bounds=(0, 1)), counter.x, criterion, epsilons=0.3)
    return run


# One-pixel DE, 5 pixels, untargeted, population 100, through blackbox_evolution's runners
# (its counter keeps per-sample records; here only its images are counted, by ours around it).
def _pixel_rows(budget: int) -> list:
    import blackbox_evolution as evolution

    def through(runner):
        def run(counter: Counter) -> None:
            counter.per_sample = False
            runner(evolution.Counter(counter, counter.x, counter.y, None, "pixels", pixels=5))
        return run

    pixels = 5
    return [("advkit OnePixel", through(evolution.run_advkit(
                OnePixel(ThreatModel("linf", 1.0), pixels=pixels, max_queries=budget)))),
            ("torchattacks OnePixel", through(evolution.run_torchattacks(pixels, 100, budget))),
            ("scipy differential_evolution", through(evolution.run_scipy(pixels, 100, budget)))]


if __name__ == "__main__":
    raise SystemExit(main())
