"""Every advkit black-box attack at one shared query budget (BlackboxBench's protocol), and
GenAttack against ZOO in queries to success (the GenAttack paper's anchor).

    python benchmarks/blackbox_shared.py --limit 50 --budget 10000

**Shared budget.** BlackboxBench (Zheng et al. 2023) runs every attack with the same
per-image budget (10,000 queries) on the same images and compares success and queries.
Here: the cached MNIST test CNN, the first ``--limit`` test images, untargeted, at Linf 0.3
and at L2 2.0; each attack sees the model through ``scores_only`` or ``labels_only`` (what
it needs), and a counting module around the model checks that the queries it answered
equal the sum of advkit's per-sample counts. Success at q: the image is broken inside the
ball within q of its queries (budgeted attacks: their own record of the query that reached
the goal, ``extras["queries_to_success"]`` or, for Square, the queries it spent before its
final success pass; minimal-norm attacks: the smallest norm found within q,
``result.norms_at(q)``, at most eps, read every 100 queries). Success at the full budget is
also checked by a fresh forward pass on the returned images.

**GenAttack against ZOO.** Alzantot et al. 2019 (GenAttack, Table 1) report on MNIST,
targeted: ZOO 2,118,222 mean queries, GenAttack 996, about 2,000x fewer. ZOO's count there
is every query of its fixed schedule (9 binary-search steps of thousands of iterations); it
does not stop at success. Here both stop at their first success (ZOO minimal-norm, L2 with
no cap, so its first success is its first adversarial point; GenAttack Linf 0.3, the
authors' MNIST settings), targeted at (y + 1) mod 10, ``--anchor-budget`` queries each: the
ratio of their mean queries to success.

**ART's HopSkipJump at its defaults** (ART issue 127: it did not finish 200 MNIST images
in 6 hours on a GPU). ART's defaults (50 iterations, up to 10,000 evaluations per
iteration's gradient estimate, starting from 100 and growing with the square root of the
iteration) set no total; here they run on ``--art-images`` MNIST images, one at a time as
ART does, every query counted: queries and seconds per image, the time 200 images would
take at that rate, and advkit's HopSkipJump given the same total per image.

The run rewrites only its own section of ``benchmarks/RESULTS.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("ADVKIT_MODEL_DIR", str(Path.home() / ".cache/advkit/test-models"))
REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from attacks import _device_name, _source_state  # noqa: E402
from blackbox_evolution import AUTHORS_MNIST  # noqa: E402
from evaluate import write_section  # noqa: E402

import advkit  # noqa: E402
from advkit import ThreatModel  # noqa: E402
from advkit.attacks import REGISTRY  # noqa: E402

SECTION = "shared"
#: Minimal-norm attacks' norms are read at every multiple of this many queries.
GRID = 100


class Tally(nn.Module):
    """The model, counting the images it answers (whose they are is advkit's record)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.total = model, 0
        self.eval()

    def forward(self, batch: Tensor) -> Tensor:
        self.total += batch.shape[0]
        with torch.no_grad():
            return self.model(batch.float())  # ART sends float64


def shared_rows(budget: int) -> list[tuple[str, str, ThreatModel, dict]]:
    """(attack, access, threat, options) for the shared-budget table."""
    linf, l2 = ThreatModel("linf", 0.3), ThreatModel("l2", 2.0)
    rows = [("Square", "scores", linf, {"n_queries": budget}),
            ("NES", "scores", linf, {"max_queries": budget}),
            ("Bandits", "scores", linf, {"max_queries": budget}),
            ("GenAttack", "scores", linf, {"max_queries": budget}),
            ("HopSkipJump", "labels", linf, {"max_queries": budget}),
            ("Square", "scores", l2, {"n_queries": budget}),
            ("SimBA", "scores", l2, {"max_queries": budget}),
            ("ZOO", "scores", l2, {"max_queries": budget}),
            ("HopSkipJump", "labels", l2, {"max_queries": budget}),
            ("Boundary", "labels", l2, {"max_queries": budget})]
    return [r for r in rows if r[0].lower() in REGISTRY]


def first_success(result: advkit.attacks.AttackResult, eps: float, budget: int) -> Tensor:
    """Per sample, the queries spent when the attack first held a point at the goal inside
    the eps-ball (0 where never within ``budget``), at a resolution of ``GRID`` queries for
    the minimal-norm attacks."""
    if result.kind == "minimal":
        grid = [q for q in result.checkpoints if q <= budget]
        norms = torch.stack([result.norms_at(q) for q in grid], dim=1)
        inside = norms <= eps * (1 + 1e-6)
        first = torch.tensor(grid)[inside.int().argmax(dim=1)]
        return torch.where(inside.any(dim=1), first, 0)
    if "queries_to_success" in result.extras:
        found = result.extras["queries_to_success"]
        return torch.where(found > 0, found, 0)
    # Square: it stops at success, and its last query is the final success pass.
    return torch.where(result.success, result.queries - 1, 0)


def run_shared(args: argparse.Namespace, model: nn.Module, x: Tensor, y: Tensor) -> list[dict]:
    out = []
    for name, access, threat, options in shared_rows(args.budget):
        cls = REGISTRY[name.lower()]
        if cls.kind == "minimal":
            options = {**options, "checkpoints": list(range(GRID, args.budget + 1, GRID))}
        attack = cls(threat, **options)
        tally = Tally(model)
        view = (advkit.models.scores_only(tally) if access == "scores"
                else advkit.models.labels_only(tally))
        start = time.perf_counter()
        result = attack(view, x, y)
        seconds = time.perf_counter() - start
        first = first_success(result, threat.eps, args.budget)
        with torch.no_grad():
            fresh = (model(result.x_adv).argmax(1) != y) & (
                threat.norms(result.x_adv - x) <= threat.eps * (1 + 1e-6))
        out.append({"attack": name, "access": access, "threat": threat, "first": first,
                    "fresh": fresh, "seconds": seconds, "counted": tally.total,
                    "own": int(result.queries.sum())})
        print(f"{name} {threat.norm} {threat.eps}: {int((first > 0).sum())}/{len(x)} in "
              f"{seconds:.1f} s", flush=True)
    return out


def run_anchor(args: argparse.Namespace, model: nn.Module, x: Tensor,
               y: Tensor) -> list[dict]:
    targets = (y + 1) % 10
    runs = [("GenAttack", "Linf 0.3, the authors' MNIST settings",
             REGISTRY["genattack"](ThreatModel("linf", 0.3), max_queries=args.anchor_budget,
                                   **AUTHORS_MNIST)),
            ("ZOO", "L2, no cap (first adversarial point), defaults",
             REGISTRY["zoo"](ThreatModel("l2", math.inf), max_queries=args.anchor_budget)),
            ("ZOO", "L2, no cap, reduced_size=7 (the paper's hierarchy)",
             REGISTRY["zoo"](ThreatModel("l2", math.inf), max_queries=args.anchor_budget,
                             reduced_size=7))]
    out = []
    for name, config, attack in runs:
        start = time.perf_counter()
        result = attack(advkit.models.scores_only(model), x, y, targets=targets)
        found = result.extras["queries_to_success"]
        out.append({"attack": name, "config": config, "found": found[found > 0],
                    "seconds": time.perf_counter() - start, "n": len(x)})
        print(f"{name} ({config}): {int((found > 0).sum())}/{len(x)}", flush=True)
    return out


def run_art_defaults(args: argparse.Namespace, model: nn.Module, x: Tensor,
                     y: Tensor) -> list[dict]:
    from art.attacks.evasion import HopSkipJump as ArtHSJ
    from art.estimators.classification import PyTorchClassifier

    tally = Tally(model)
    classifier = PyTorchClassifier(model=tally, loss=nn.CrossEntropyLoss(),
                                   input_shape=tuple(x.shape[1:]), nb_classes=10,
                                   clip_values=(0.0, 1.0))
    attack = ArtHSJ(classifier, targeted=False, norm=2, verbose=False)  # ART's defaults
    start = time.perf_counter()
    out = torch.cat([torch.from_numpy(attack.generate(x=x[i:i + 1].numpy()))
                     for i in range(len(x))]).float()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        art_l2 = torch.where(model(out).argmax(1) != y, (out - x).flatten(1).norm(dim=1),
                             torch.full((len(x),), math.inf))
    per_image = tally.total // len(x)
    ours = REGISTRY["hopskipjump"](ThreatModel("l2", math.inf), max_queries=per_image)
    start = time.perf_counter()
    result = ours(advkit.models.labels_only(model), x, y)
    own_seconds = time.perf_counter() - start
    return [{"library": "ART HopSkipJump, its defaults", "queries": tally.total,
             "seconds": seconds, "median_l2": float(art_l2.median()), "n": len(x)},
            {"library": f"advkit HopSkipJump, max_queries={per_image:,}",
             "queries": int(result.queries.sum()), "seconds": own_seconds,
             "median_l2": float(result.norms.median()), "n": len(x)}]


def _stat(values: Tensor, how: str) -> str:
    if not values.numel():
        return "–"
    v = values.float()
    return f"{(v.mean() if how == 'mean' else v.median()).item():,.0f}"


def render(shared: list[dict], anchor: list[dict], args: argparse.Namespace, started: float,
           load: tuple, art: list[dict] | None = None) -> str:
    cmd = "python benchmarks/blackbox_shared.py " + shlex.join(sys.argv[1:])
    marks = [b for b in (1000, 5000, args.budget) if b <= args.budget]
    lines = [
        f"<!-- benchmarks/blackbox_shared.py {SECTION}: begin -->",
        "## Every black-box attack at one shared budget, and GenAttack against ZOO "
        "(`benchmarks/blackbox_shared.py`)",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}"
        f"; device: {_device_name(torch.device('cpu'))}; torch threads "
        f"{torch.get_num_threads()}; advkit source {_source_state()}",
        f"- model: small_cnn (the cached MNIST test model); data: MNIST test[:{args.limit}] "
        f"(shared budget: untargeted, {args.budget:,} queries per image), "
        f"test[:{args.anchor_limit}] (anchor: targeted at (y + 1) mod 10, "
        f"{args.anchor_budget:,} queries per image)",
        f"- run time {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; also running: "
        f"{args.note}",
        "- success at q: broken inside the ball within q queries of the image (see the "
        "script's docstring); queries to success: mean and median over the images broken "
        "within the budget; 'fresh': the returned images a fresh forward pass finds "
        "broken inside the ball; 'counted': images the model answered, against the sum of "
        "advkit's per-sample counts",
        "",
    ]
    if shared:
        lines += ["| attack | sees | threat | " + " | ".join(f"success ≤ {b:,}" for b in marks)
                  + " | mean queries | median queries | fresh | seconds | counted |",
                  "|---|---|---|" + "---:|" * (len(marks) + 4) + "---|"]
        for r in shared:
            first, n = r["first"], len(r["first"])
            cells = [f"{int(((first > 0) & (first <= b)).sum())}/{n}" for b in marks]
            broken = first[first > 0]
            check = "equal" if r["counted"] == r["own"] else f"DIFFERENT ({r['own']:,})"
            lines.append(f"| {r['attack']} | {r['access']} | {r['threat'].norm} "
                         f"{r['threat'].eps:g} | " + " | ".join(cells) + f" | "
                         f"{_stat(broken, 'mean')} | {_stat(broken, 'median')} | "
                         f"{int(r['fresh'].sum())}/{n} | {r['seconds']:.1f} | "
                         f"{r['counted']:,}, {check} |")
        lines.append("")
    if anchor:
        lines += ["| attack (targeted) | config | success | mean queries to success | "
                  "median | seconds |", "|---|---|---:|---:|---:|---:|"]
        for r in anchor:
            lines.append(f"| {r['attack']} | {r['config']} | {len(r['found'])}/{r['n']} | "
                         f"{_stat(r['found'], 'mean')} | {_stat(r['found'], 'median')} | "
                         f"{r['seconds']:.1f} |")
        gen = anchor[0]["found"]
        zoo = [r["found"] for r in anchor[1:] if r["found"].numel()]
        if gen.numel() and zoo:
            ratios = ", ".join(f"{z.float().mean().item() / gen.float().mean().item():.2f}x"
                               for z in zoo)
            lines += ["", f"ZOO's mean queries to success over GenAttack's: {ratios} "
                          "(the paper: 2,118,222 / 996 = 2,127x, ZOO counted to the end "
                          "of its schedule)"]
    if art:
        lines += ["", f"ART's HopSkipJump at its defaults, MNIST test[:{art[0]['n']}], one "
                  "image at a time (ART's way), beside advkit's with the same queries per "
                  "image:", "",
                  "| library | queries per image | seconds per image | 200 images at this rate "
                  "| median L2 |", "|---|---:|---:|---:|---:|"]
        for r in art:
            each = r["seconds"] / r["n"]
            lines.append(f"| {r['library']} | {r['queries'] // r['n']:,} | {each:.2f} | "
                         f"{200 * each / 60:.1f} min | {r['median_l2']:.3f} |")
    lines.append(f"<!-- benchmarks/blackbox_shared.py {SECTION}: end -->")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--limit", type=int, default=50, help="images, shared budget")
    parser.add_argument("--budget", type=int, default=10_000)
    parser.add_argument("--anchor-limit", type=int, default=20, help="images, the anchor")
    parser.add_argument("--anchor-budget", type=int, default=20_000)
    parser.add_argument("--art-images", type=int, default=5,
                        help="images for ART's HopSkipJump at its defaults")
    parser.add_argument("--parts", nargs="+", default=["shared", "anchor", "art"],
                        choices=["shared", "anchor", "art"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="nothing else noted",
                        help="what else ran on the machine (for the record)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()
    model = advkit.models.load("small_cnn").eval()
    x, y = advkit.data.load("mnist", split="test",
                            limit=max(args.limit, args.anchor_limit, args.art_images))
    shared = (run_shared(args, model, x[:args.limit], y[:args.limit])
              if "shared" in args.parts else [])
    anchor = (run_anchor(args, model, x[:args.anchor_limit], y[:args.anchor_limit])
              if "anchor" in args.parts else [])
    art = (run_art_defaults(args, model, x[:args.art_images], y[:args.art_images])
           if "art" in args.parts else [])
    text = render(shared, anchor, args, started, load, art)
    write_section(args.out, SECTION, text, script="blackbox_shared.py")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
