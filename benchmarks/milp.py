"""Complete verification (MILP) and the Ground-Truth Attack on a small MNIST MLP.

1. ``advkit.verify.milp.verify`` on the first N test images at Linf 0.05 and 0.1: how many
   are verified, falsified (a counter-example checked by a forward pass) or timed out,
   beside CROWN's verified count, and the solver time per image.
2. The Ground-Truth Attack (the provably minimal Linf perturbation, margin delta 1e-4)
   beside the smallest Linf perturbation three attacks find: FAB (minimal Linf, 5
   restarts), C&W Linf, and PGD with a per-image bisection over eps (PGD at 100 steps, 3
   restarts, 12 bisection steps). The ground truth must be at most every attack's distance
   (up to delta's effect, a few 1e-5); the ratios say how tight the attacks are. The
   attacks run first and their best distance narrows the ground truth's search (its ball,
   hence CROWN's big-M constants), not its answer.

The network. The MLP (784-H-H-10 ReLU, H = 50 by default) is trained here on all 60,000
MNIST training images (seed 0) unless ``--model`` names a saved one. By default it is
trained *verification-friendly*, as the MILP literature does (Xiao, Tjeng, Shafiullah &
Madry 2019, "Training for Faster Adversarial Robustness Verification via Inducing ReLU
Stability"): 5 epochs of PGD training at Linf 0.1 plus an L1 weight penalty and their
ReLU-stability loss on IBP's bounds (about 40 s on one thread; clean accuracy about 95%).
``--train plain`` keeps the plainly trained one (3 epochs of cross-entropy, about 97%).
Why, measured on one thread of the 2-core CPU (the other core busy), advkit d887e2a:

* plain, Linf 0.05: 20-37 of the 50 first-layer neurons and 12-44 of the second's are
  unstable after CROWN (the first layer's bounds are exact; LP tightening of the second
  changes 0-2). ``verify`` decides every one of the first 45 images (max 11 s per image,
  44 s in all; before the sign-deciding solves, 1 timeout at 60 s and 215 s in all), and
  at 0.1 PGD falsifies every image. But the Ground-Truth Attack needs 23-41 s on the easy
  images and times out at 120 s on 2 of 3 harder ones (test images 2 and 3): the figure's
  "ground truth on every image" is out of reach for the plain network at 120 s.
* friendly: 6-13 unstable first-layer neurons and 0 in the second at Linf 0.1. ``verify``
  decides all 97 correctly classified images of the first 100 (0.05: 92 verified, 5
  falsified, 1.3 s in all; 0.1: 67 verified, 30 falsified, 9 s in all, max 2.1 s), and the
  Ground-Truth Attack (hinted by FAB alone) settled the 59 correctly classified images of
  the first 61: 57 minimal distances, 2 with none within the cap 0.2, no timeout; 0.6-37 s
  per image, mean 6.3 s, every minimum at or below FAB's distance.

The full figure (100 images, both eps, the ground truth on all 97 correctly classified
ones), estimated from those probes at about 13 minutes on one thread (training 40 s,
verification 10 s, the attacks 70 s (measured), the ground truth about 10; 20 in all with a
slow tail):

    OMP_NUM_THREADS=1 flock /tmp/advkit-heavy.lock python benchmarks/milp.py
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks import _device_name, _source_state  # noqa: E402
from evaluate import write_section  # noqa: E402

from advkit import data  # noqa: E402
from advkit.attacks import FAB, PGD, CarliniWagnerLinf  # noqa: E402
from advkit.threat import ThreatModel  # noqa: E402
from advkit.verify import certify  # noqa: E402
from advkit.verify.bounds import InputSet, interval_bounds, network  # noqa: E402
from advkit.verify.milp import ground_truth, verify  # noqa: E402

SECTION = "MILP and the Ground-Truth Attack"
NETWORKS = {
    "friendly": "trained verification-friendly (Xiao et al. 2019): 5 epochs of PGD training "
                "at Linf 0.1 with an L1 weight penalty and the ReLU-stability loss",
    "plain": "trained plainly: 3 epochs of cross-entropy",
}


def _mlp(hidden: list[int]) -> nn.Sequential:
    sizes = [784, *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes, sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 10))


def relu_stability(model: nn.Sequential, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Xiao et al.'s ReLU-stability loss: ``-tanh(1 + l * u)`` summed over the hidden
    neurons (mean over the batch), ``[l, u]`` IBP's pre-activation bounds on the Linf ball
    of radius ``eps``: near -1 for a neuron whose bounds do not straddle 0, +1 at worst."""
    net = network(model, x[:1])
    bounds = interval_bounds(net, InputSet.from_threat(x, ThreatModel("linf", eps)))
    return sum((-torch.tanh(1 + bounds[p][0] * bounds[p][1])).flatten(1).sum(1).mean()
               for p in net.relu_positions)


def train_mlp(hidden: list[int], log, recipe: str = "friendly") -> nn.Module:
    """The MLP, trained on all 60,000 MNIST training images (Adam 2e-3, batch 100, seed 0).

    ``plain``: 3 epochs of cross-entropy. ``friendly`` (Xiao et al. 2019): 5 epochs of PGD
    training (Linf 0.1, 10 steps of 0.025, eps ramped up over the first epoch) plus an L1
    weight penalty (2e-5) and the ReLU-stability loss (0.01, ramped alike)."""
    torch.manual_seed(0)
    x, y = data.load("mnist", split="train")
    model = _mlp(hidden).eval()  # no dropout or batch norm: eval mode trains the same
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    started = time.perf_counter()
    epochs, batches = (3 if recipe == "plain" else 5), math.ceil(len(x) / 100)
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for k, i in enumerate(range(0, len(x), 100)):
            batch = order[i:i + 100]
            xb, yb = x[batch], y[batch]
            if recipe == "plain":
                loss = F.cross_entropy(model(xb), yb)
            else:
                ramp = min(1.0, (epoch * batches + k + 1) / batches)
                eps = 0.1 * ramp
                delta = (torch.rand_like(xb) * 2 - 1) * eps
                for _ in range(10):
                    delta.requires_grad_(True)
                    grad, = torch.autograd.grad(
                        F.cross_entropy(model((xb + delta).clamp(0, 1)), yb), delta)
                    delta = (delta.detach() + 0.25 * eps * grad.sign()).clamp(-eps, eps)
                loss = (F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
                        + 2e-5 * sum(m.weight.abs().sum() for m in model
                                     if isinstance(m, nn.Linear))
                        + 0.01 * ramp * relu_stability(model, xb, eps))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    log(f"trained the {recipe} MLP in {time.perf_counter() - started:.1f} s")
    return model.eval()


def pgd_bisection(model: nn.Module, x: torch.Tensor, y: torch.Tensor, high: float,
                  steps: int = 12) -> torch.Tensor:
    """Per image, the smallest eps at which PGD (100 steps, 3 restarts, margin loss) finds
    an adversarial example, by bisection in [0, high] (inf if none at ``high``)."""
    found = torch.full((len(x),), math.inf, dtype=torch.float64)
    for i in range(len(x)):
        lo, hi = 0.0, high
        xi, yi = x[i:i + 1], y[i:i + 1]

        def breaks(eps: float, xi=xi, yi=yi) -> float | None:
            result = PGD(ThreatModel("linf", eps), steps=100, restarts=3, loss="margin",
                         seed=0)(model, xi, yi)
            return float(result.norms[0]) if result.success[0] else None

        best = breaks(hi)
        if best is None:
            continue
        for _ in range(steps):
            mid = (lo + hi) / 2
            norm = breaks(mid)
            if norm is None:
                lo = mid
            else:
                hi, best = mid, min(best, norm)
        found[i] = best
    return found


def attack_distances(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cap: float
                     ) -> dict[str, tuple[torch.Tensor, float]]:
    out = {}
    unbounded = ThreatModel("linf", math.inf)
    for name, attack in (("FAB (5 restarts)", FAB(unbounded, steps=100, restarts=5)),
                         ("C&W Linf", CarliniWagnerLinf(unbounded))):
        started = time.perf_counter()
        result = attack(model, x, y)
        norms = torch.where(result.success, result.norms.double(), torch.inf)
        out[name] = (norms, time.perf_counter() - started)
    started = time.perf_counter()
    out["PGD bisection"] = (pgd_bisection(model, x, y, cap), time.perf_counter() - started)
    return out


def measure(args: argparse.Namespace, log) -> dict:
    model = (torch.load(args.model, weights_only=False).eval() if args.model
             else train_mlp(args.hidden, log, args.train))
    x, y = data.load("mnist", split="test", limit=args.limit)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    results: dict = {"clean": correct.float().mean().item(), "verify": [], "gt": None}
    for eps in args.eps:
        threat = ThreatModel("linf", eps)
        crown = certify(model, x, y, threat, "crown")
        log(f"eps {eps}: CROWN verifies {int((crown.verified & correct).sum())} ...")
        started = time.perf_counter()
        result = verify(model, x, y, threat, time_limit=args.time_limit)
        wall = time.perf_counter() - started
        status = [s if c else "misclassified" for s, c in zip(result.status, correct.tolist(),
                                                               strict=True)]
        seconds = result.seconds[correct].tolist()
        row = {"eps": eps, "crown": int((crown.verified & correct).sum()),
               "crown_seconds": crown.seconds, "wall": wall,
               **{k: status.count(k) for k in ("verified", "falsified", "timeout",
                                                "undecided", "misclassified")},
               "median_s": statistics.median(seconds) if seconds else 0.0,
               "max_s": max(seconds, default=0.0)}
        results["verify"].append(row)
        log(f"eps {eps}: {row}")
    keep = correct.nonzero().squeeze(1)[:args.gt_images]
    xs, ys = x[keep], y[keep]
    attacks = attack_distances(model, xs, ys, args.cap)
    log("attacks: " + ", ".join(f"{k} {v[1]:.0f} s" for k, v in attacks.items()))
    # The attacks' best distance narrows each image's search (never its answer: nothing
    # found within 1.05 x it sends the search out to the cap).
    best = torch.stack([norms for norms, _ in attacks.values()]).amin(0)
    started = time.perf_counter()
    gt = ground_truth(model, xs, ys, "linf", cap=args.cap, upper=best,
                      time_limit=args.gt_time_limit)
    gt_seconds = time.perf_counter() - started
    log(f"ground truth: {gt_seconds:.0f} s, {gt.status.count('optimal')} optimal")
    results["gt"] = {"n": len(keep), "seconds": gt_seconds, "status": gt.status,
                     "distance": gt.distance, "attacks": attacks}
    return results


def section(results: dict, args: argparse.Namespace, started: float) -> str:
    versions = [f"torch {torch.__version__}", f"scipy {importlib.metadata.version('scipy')}"]
    lines = [
        f"<!-- benchmarks/milp.py {SECTION}: begin -->",
        f"## {SECTION}: a {'-'.join(['784', *map(str, args.hidden), '10'])} MNIST MLP",
        "",
        f"- network: {args.model or NETWORKS[args.train]}",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {_device_name(torch.device('cpu'))}; torch threads "
        f"{torch.get_num_threads()}; HiGHS through scipy.optimize.milp",
        f"- python {platform.python_version()}; versions: {', '.join(versions)}; advkit "
        f"source {args.source}",
        f"- run time {time.perf_counter() - started:.0f} s; clean accuracy "
        f"{results['clean']:.1%} on the first {args.limit} test images",
        "",
        f"Complete verification, first {args.limit} test images, time limit "
        f"{args.time_limit:g} s per image (attack first, then the solver deciding each "
        "margin's sign):",
        "",
        "| Linf eps | CROWN verified | MILP verified | falsified | timeout | undecided | "
        "misclassified | median s / image | max s | total s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["verify"]:
        lines.append(f"| {r['eps']:g} | {r['crown']} | {r['verified']} | {r['falsified']} | "
                     f"{r['timeout']} | {r['undecided']} | {r['misclassified']} | "
                     f"{r['median_s']:.2f} | {r['max_s']:.1f} | {r['wall']:.0f} |")
    gt = results["gt"]
    dist = gt["distance"]
    solved = torch.tensor([s == "optimal" for s in gt["status"]])
    lines += [
        "",
        f"Ground-Truth Attack (Linf, margin 1e-4, cap {args.cap:g}, time limit "
        f"{args.gt_time_limit:g} s) on the first {gt['n']} correctly classified images: "
        f"{int(solved.sum())} solved to optimality, "
        f"{gt['status'].count('none within cap')} with no example within the cap, "
        f"{gt['status'].count('timeout')} timed out; {gt['seconds']:.0f} s in all. "
        f"Median minimal distance {dist[solved].median().item():.4f}." if solved.any() else
        "No image solved.",
        "",
        "| attack | seconds | found (of solved) | below the ground truth | median ratio to "
        "the ground truth | worst ratio | exact (ratio < 1.001) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (norms, seconds) in gt["attacks"].items():
        both = solved & torch.isfinite(norms)
        ratio = norms[both] / dist[both]
        below = int((norms[both] < dist[both] - 1e-4).sum())
        lines.append(
            f"| {name} | {seconds:.1f} | {int(both.sum())} / {int(solved.sum())} | {below} | "
            + (f"{ratio.median().item():.3f} | {ratio.max().item():.3f} | "
               f"{int((ratio < 1.001).sum())} |" if both.any() else "– | – | – |"))
    lines.append(f"<!-- benchmarks/milp.py {SECTION}: end -->")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[50, 50])
    parser.add_argument("--train", choices=["friendly", "plain"], default="friendly",
                        help="the MLP's training (see the docstring); ignored with --model")
    parser.add_argument("--model", type=Path, default=None,
                        help="a whole pickled nn.Sequential (trusted) instead of training one")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--gt-images", type=int, default=100)
    parser.add_argument("--gt-time-limit", type=float, default=120.0)
    parser.add_argument("--cap", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.source = _source_state()
    started = time.perf_counter()
    results = measure(args, lambda m: print(m, flush=True))
    write_section(args.out, SECTION, section(results, args, started), "milp.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
