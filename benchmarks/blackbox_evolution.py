"""Population attacks, advkit beside its peers: success within each query budget, median
queries to success and wall time, on the same model and images, every query counted outside
the attacks.

Two families on the cached MNIST test model (``small_cnn``), the same test images:

- GenAttack, targeted (Foolbox's is targeted only; targets ``(y + 1) % 10``), Linf eps 0.3
  (the paper's MNIST eps): advkit's ``GenAttack`` with its defaults and with the authors'
  MNIST settings, beside Foolbox's ``GenAttack`` (its defaults; batched over images, one
  model call per population member).
- One-pixel attacks, untargeted, ``--pixels`` pixels: advkit's ``OnePixel`` (population
  100, its default, and 400, the paper's), torchattacks' ``OnePixel`` and ART's
  ``PixelAttack`` (both one image at a time), and scipy's ``differential_evolution`` on the
  same problem (DE/rand/1, F 0.5, no crossover, the same population and fitness; one image
  at a time, ``vectorized=True``: one model call per generation).

Every library's model is the same ``small_cnn`` behind a :class:`Counter`: an ``nn.Module``
that answers each image, finds the sample it belongs to (the clean image within the threat
model: Linf distance for GenAttack, changed pixels for the pixel attacks), counts it against
that sample, and records the query at which the sample was first seen at its goal (the
target, or any label but the true one) inside the threat model. Success within a budget ``q``
is that query being at most ``q``; each run goes to the largest budget once (every
attack here stops on success or keeps going the same way whatever its budget), and the
images each attack returned are checked by a fresh forward pass. advkit's own counts
(``result.queries``, ``extras["queries_to_success"]``) are checked against the counter's.

Run ``python benchmarks/blackbox_evolution.py --help``. The run rewrites only its own
section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy
import torch
from torch import Tensor, nn

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("ADVKIT_MODEL_DIR", str(Path.home() / ".cache/advkit/test-models"))
REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from attacks import _device_name, _source_state  # noqa: E402
from evaluate import write_section  # noqa: E402

import advkit  # noqa: E402
from advkit import ThreatModel  # noqa: E402
from advkit.attacks import GenAttack, OnePixel  # noqa: E402

SECTION = "evolution"
EPS = 0.3
#: The authors' MNIST command line (their README): population 4, mutation rate 0.3, alpha 0.5,
#: temperature 0.1, no adaptive scaling.
AUTHORS_MNIST = {"population": 4, "mutation_probability": 0.3, "mutation_range": 0.5,
                 "temperature": 0.1, "adaptive": False}


class Counter(nn.Module):
    """The model, counting each image against its sample and recording first successes.

    ``family``: ``"linf"`` (an image belongs to the clean image within Linf ``eps``) or
    ``"pixels"`` (to the clean image from which it differs in the fewest pixels, at most
    ``pixels``). ``first`` (per sample): the sample's query count at its first image that
    reached the goal inside the threat model (0: never).
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None,
                 family: str, pixels: int = 0) -> None:
        super().__init__()
        self.model, self.x, self.y, self.targets = model, x, y, targets
        self.family, self.pixels = family, pixels
        self.queries = torch.zeros(len(x), dtype=torch.long)
        self.first = torch.zeros(len(x), dtype=torch.long)
        self.eval()

    def owners(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """The sample each image belongs to, and whether it is inside that sample's threat
        model."""
        flat = batch.flatten(1)
        # The nearest clean image: in Linf (GenAttack), or by values changed (pixels).
        owner = torch.cdist(flat, self.x.flatten(1),
                            p=math.inf if self.family == "linf" else 0.0).argmin(dim=1)
        diff = batch - self.x[owner]
        if self.family == "linf":
            inside = diff.abs().flatten(1).amax(dim=1) <= EPS + 1e-5
        else:
            inside = (diff != 0).any(dim=1).flatten(1).sum(dim=1) <= self.pixels
        return owner, inside

    def forward(self, batch: Tensor) -> Tensor:
        batch = batch.float()  # ART and scipy send float64
        with torch.no_grad():
            logits = self.model(batch)
            owner, inside = self.owners(batch)
        pred = logits.argmax(dim=1)
        goal = (pred == self.targets[owner] if self.targets is not None
                else pred != self.y[owner]) & inside
        # Each image's query number for its sample, in the order the attack sent them.
        onehot = nn.functional.one_hot(owner, len(self.x))
        number = self.queries[owner] + (onehot.cumsum(dim=0) * onehot).sum(dim=1)
        self.queries += onehot.sum(dim=0)
        hits = torch.full_like(self.first, torch.iinfo(torch.long).max).scatter_reduce(
            0, owner[goal], number[goal], "amin")
        new = (self.first == 0) & (hits < torch.iinfo(torch.long).max)
        self.first = torch.where(new, hits, self.first)
        return logits

    def success(self, x_adv: Tensor) -> Tensor:
        """A fresh forward pass on returned images (not counted), inside the threat model."""
        with torch.no_grad():
            pred = self.model(x_adv.float()).argmax(dim=1)
        goal = pred == self.targets if self.targets is not None else pred != self.y
        if self.family == "linf":
            inside = (x_adv - self.x).abs().flatten(1).amax(dim=1) <= EPS + 1e-5
        else:
            inside = (x_adv != self.x).any(dim=1).flatten(1).sum(dim=1) <= self.pixels
        return goal & inside


# -- runners: each attacks counter.x and returns the images it ends with -----------------

def run_advkit(attack: advkit.attacks.Attack) -> Callable[[Counter], tuple[Tensor, dict]]:
    def run(counter: Counter) -> tuple[Tensor, dict]:
        result = attack(advkit.models.scores_only(counter), counter.x, counter.y,
                        targets=counter.targets)
        own = result.extras["queries_to_success"]
        # The counter also saw the final success pass (both count it). advkit records
        # success after the generation that reached it, the counter at the very image.
        agree = (torch.equal(result.queries, counter.queries)
                 and torch.equal(own > 0, counter.first > 0)
                 and bool(((own < 0) | (own >= counter.first)).all()))
        return result.x_adv, {"own_counts": "equal" if agree else "DIFFERENT"}
    return run


def run_foolbox_gen(budget: int) -> Callable[[Counter], tuple[Tensor, dict]]:
    import foolbox as fb

    def run(counter: Counter) -> tuple[Tensor, dict]:
        fmodel = fb.PyTorchModel(counter, bounds=(0, 1))
        attack = fb.attacks.GenAttack(steps=budget // 10)  # population 10: 10 per step
        criterion = fb.criteria.TargetedMisclassification(counter.targets)
        _, adv, _ = attack(fmodel, counter.x, criterion, epsilons=EPS)
        return adv, {}
    return run


def run_torchattacks(pixels: int, population: int,
                     budget: int) -> Callable[[Counter], tuple[Tensor, dict]]:
    import torchattacks

    def run(counter: Counter) -> tuple[Tensor, dict]:
        # Its population is popsize // (3 pixels) candidates per parameter; its DE makes
        # popsize queries per step and one more for its success check.
        attack = torchattacks.OnePixel(counter, pixels=pixels, popsize=population,
                                       steps=budget // (population + 1))
        out = [attack(counter.x[i:i + 1], counter.y[i:i + 1]) for i in range(len(counter.x))]
        return torch.cat(out), {}
    return run


def run_art(pixels: int, budget: int) -> Callable[[Counter], tuple[Tensor, dict]]:
    from art.attacks.evasion import PixelAttack
    from art.estimators.classification import PyTorchClassifier

    def run(counter: Counter) -> tuple[Tensor, dict]:
        classifier = PyTorchClassifier(model=counter, loss=nn.CrossEntropyLoss(),
                                       input_shape=tuple(counter.x.shape[1:]), nb_classes=10,
                                       clip_values=(0.0, 1.0))
        # Its population: 400 // (3 pixels) per parameter, about 400 candidates.
        attack = PixelAttack(classifier, th=pixels, es=1, max_iter=max(1, budget // 400 - 1),
                             targeted=False, verbose=False)
        out = [torch.from_numpy(attack.generate(x=counter.x[i:i + 1].numpy(),
                                                y=counter.y[i:i + 1].numpy()))
               for i in range(len(counter.x))]
        return torch.cat(out).float(), {}
    return run


def run_scipy(pixels: int, population: int,
              budget: int) -> Callable[[Counter], tuple[Tensor, dict]]:
    def run(counter: Counter) -> tuple[Tensor, dict]:
        rng = numpy.random.default_rng(0)
        return torch.stack([_scipy_one(counter, i, pixels, population, budget, rng)
                            for i in range(len(counter.x))]), {}
    return run


def _scipy_one(counter: Counter, i: int, pixels: int, population: int, budget: int,
               rng: numpy.random.Generator) -> Tensor:
    """scipy's DE on image ``i``: DE/rand/1, F 0.5, no crossover (recombination 1), no
    convergence stop, stopped by its callback once the counter saw the goal."""
    from scipy.optimize import differential_evolution

    x, y = counter.x[i], int(counter.y[i])
    c, h, w = x.shape

    def render(params: numpy.ndarray) -> Tensor:
        """Images of candidates ``params`` ((2 + C) * pixels, S), as scipy hands them."""
        p = torch.from_numpy(params.T.copy()).float().view(-1, pixels, 2 + c)
        images = x.repeat(len(p), 1, 1, 1)
        for k in range(pixels):
            r, q = p[:, k, 0].long(), p[:, k, 1].long()
            images[torch.arange(len(p)), :, r, q] = p[:, k, 2:]
        return images

    def loss(params: numpy.ndarray) -> numpy.ndarray:
        # The paper's fitness, the true class's probability, as its logarithm.
        return counter(render(params)).log_softmax(dim=1)[:, y].numpy()

    # The same first population as advkit's: coordinates uniform, values N(0.5, 0.5).
    where = rng.uniform(0, [h - 1e-6, w - 1e-6], size=(population, pixels, 2))
    values = rng.normal(0.5, 0.5, size=(population, pixels, c)).clip(0, 1)
    init = numpy.concatenate([where, values], axis=2).reshape(population, -1)
    bounds = [(0, h - 1e-6), (0, w - 1e-6)] + [(0.0, 1.0)] * c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = differential_evolution(
            loss, bounds * pixels, strategy="rand1bin", maxiter=budget // population - 1,
            init=init, mutation=0.5, recombination=1.0, tol=0, atol=-1, polish=False,
            vectorized=True, updating="deferred", callback=lambda *_: bool(counter.first[i]),
            seed=0)
    return render(found.x[:, None])[0]


def rows_for(args: argparse.Namespace) -> list[tuple[str, str, str, str, int, Callable]]:
    """(family, library, attack, config, largest budget, runner) for each row asked for."""
    big = max(args.budgets)
    slow = min(big, args.slow_budget)
    linf, anything = ThreatModel("linf", EPS), ThreatModel("linf", 1.0)
    d = args.pixels
    rows = [
        ("gen", "advkit", "GenAttack", "defaults (population 6, adaptive)", big,
         run_advkit(GenAttack(linf, max_queries=big))),
        ("gen", "advkit", "GenAttack", "the authors' MNIST settings", big,
         run_advkit(GenAttack(linf, max_queries=big, **AUTHORS_MNIST))),
        ("gen", "foolbox", "GenAttack", "defaults (population 10)", big,
         run_foolbox_gen(big)),
        ("pixel", "advkit", "OnePixel", "defaults (population 100)", big,
         run_advkit(OnePixel(anything, pixels=d, max_queries=big))),
        ("pixel", "advkit", "OnePixel", "population 400 (the paper's)", big,
         run_advkit(OnePixel(anything, pixels=d, max_queries=big, population=400))),
        ("pixel", "scipy", "differential_evolution", "population 100, vectorized", slow,
         run_scipy(d, 100, slow)),
        ("pixel", "torchattacks", "OnePixel", "popsize 100", slow,
         run_torchattacks(d, 100, slow)),
        ("pixel", "art", "PixelAttack", "DE, population ~400", args.art_budget,
         run_art(d, args.art_budget)),
    ]
    return [r for r in rows if r[1] in args.libraries and r[0] in args.families]


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    model = advkit.models.load("small_cnn")
    x, y = advkit.data.load("mnist", split="test", limit=args.limit)
    out = []
    for family, library, attack, config, largest, runner in rows_for(args):
        targets = (y + 1) % 10 if family == "gen" else None
        counter = Counter(model, x, y, targets, "linf" if family == "gen" else "pixels",
                          args.pixels)
        torch.manual_seed(0)
        numpy.random.seed(0)  # ART draws from NumPy's global generator
        start = time.perf_counter()
        x_adv, extra = runner(counter)
        seconds = time.perf_counter() - start
        row = {"family": family, "library": library, "attack": attack, "config": config,
               "seconds": seconds, "largest": largest, "queries": int(counter.queries.sum()),
               "max_queries": int(counter.queries.max()), "first": counter.first.clone(),
               "returned": int(counter.success(x_adv).sum()), **extra}
        log(f"{library} {attack} ({config}): {seconds:.1f} s, {row['queries']:,} queries, "
            f"found {int((counter.first > 0).sum())}, returned {row['returned']}")
        out.append(row)
    return out


def render(rows: list[dict], args: argparse.Namespace, started: float, load: tuple) -> str:
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in
                         ("torch", "scipy", "torchattacks", "adversarial-robustness-toolbox",
                          "foolbox"))
    cmd = "python benchmarks/blackbox_evolution.py " + shlex.join(sys.argv[1:])
    n = args.limit
    lines = [
        f"<!-- benchmarks/blackbox_evolution.py {SECTION}: begin -->",
        "## Population attacks: GenAttack and one-pixel DE (`benchmarks/blackbox_evolution.py`)",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}"
        f"; device: {_device_name(torch.device('cpu'))}; torch threads "
        f"{torch.get_num_threads()}",
        f"- versions: {versions}; advkit source {_source_state()}",
        f"- model: small_cnn (the cached MNIST test model); data: MNIST test[:{n}]; GenAttack "
        f"targeted at (y + 1) mod 10, Linf eps {EPS}; pixel attacks untargeted, "
        f"{args.pixels} pixels, any value",
        f"- run time {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; also running: "
        f"{args.note}",
        "- measure: success within q queries = the attack showed the model an image inside "
        "the threat model that reached the goal within q queries of its sample (counted by a "
        "counting module around the model, the same for every library); median queries over "
        "the images broken within the largest budget; 'returned' = the images the attack "
        "returned that a fresh forward pass finds at the goal; throughput = queries answered "
        "per second of the whole run",
        "",
        "| attack | library | config | "
        + " | ".join(f"success ≤ {b:,}" for b in args.budgets)
        + " | median queries | returned | seconds | queries/s | queries counted |",
        "|---|---|---|" + "---:|" * len(args.budgets) + "---:|---:|---:|---:|---|",
    ]
    for r in rows:
        first = r["first"]
        rates = " | ".join(f"{int(((first > 0) & (first <= b)).sum())}/{n}" if b <= r["largest"]
                           else "–" for b in args.budgets)
        broken = first[first > 0].float()
        median = f"{broken.median().item():,.0f}" if len(broken) else "–"
        counted = f"{r['queries']:,} (max {r['max_queries']:,} per image)"
        if "own_counts" in r:
            counted += f"; advkit's own counts {r['own_counts']}"
        lines.append(f"| {r['attack']} | {r['library']} | {r['config']} | {rates} | {median} | "
                     f"{r['returned']}/{n} | {r['seconds']:.1f} | "
                     f"{r['queries'] / r['seconds']:,.0f} | {counted} |")
    lines.append(f"<!-- benchmarks/blackbox_evolution.py {SECTION}: end -->")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--limit", type=int, default=20, help="MNIST test images")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--pixels", type=int, default=5, help="pixels of the pixel attacks")
    parser.add_argument("--slow-budget", type=int, default=5000,
                        help="the largest budget of torchattacks' OnePixel and scipy's DE "
                             "(one image at a time)")
    parser.add_argument("--art-budget", type=int, default=1000,
                        help="the largest budget of ART's PixelAttack (one model call per "
                             "candidate)")
    parser.add_argument("--families", nargs="+", default=["gen", "pixel"])
    parser.add_argument("--libraries", nargs="+",
                        default=["advkit", "foolbox", "torchattacks", "art", "scipy"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="nothing else noted",
                        help="what else ran on the machine (for the record)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    args.budgets = sorted(set(args.budgets))
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()
    rows = measure(args, lambda m: print(m, flush=True))
    text = render(rows, args, started, load)
    write_section(args.out, SECTION, text, script="blackbox_evolution.py")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
