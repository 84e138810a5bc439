"""Score-based attacks, advkit beside ART: success, norm and queries at each query budget,
on the same model and images, every query counted outside the attacks.

Every library's model is the same ``small_cnn`` (the cached MNIST test model) behind
:class:`Tracker`, ``benchmarks/blackbox.py``'s counting module (each image it answers is
counted against the sample it belongs to; it refuses to go past the largest budget, and
keeps per sample the smallest L2 among the images it classified adversarially within each
budget) that also notes the query count at which each sample was first answered
adversarially. Success at a budget is the model's own answer, seen by the counter, to an
image the attack sent within that budget; no library's bookkeeping is trusted. advkit's
record (``result.norms_at(q)``, ``extras["queries_to_success"]``, counted by its access
layer) is used for advkit's rows, its total checked against the counter's, and its final
success against a fresh forward pass.

advkit's attacks see the model through ``advkit.models.scores_only``; ART's through a
``PyTorchClassifier`` (its SimBA and ZooAttack work one image at a time: each image is
attacked by its own ``generate`` call, so the counter knows whose queries these are).
SimBA on both sides: DCT basis, step 0.2 (ART's default is 0.1; 0.2 is the paper's), no
ball (advkit's L2 cap is the box's diameter). NES and Bandits-TD (no peer in ART): Linf 0.3,
NES's paper's setting, on the same images and budgets; Bandits-TD with its defaults (the
paper's settings, tiles of 4 pixels). ZOO: L2, minimal-norm; advkit with its defaults and
with the paper's hierarchical attack space (7 x 7 first); ART's ZooAttack with its
defaults (use_resize and importance sampling on, nb_parallel 128, initial_const 1e-3) and
enough iterations.

Run ``python benchmarks/blackbox_scores.py --help``; ``--attacks nes,bandits --limit 100``
runs those two only, on 100 images. The run rewrites only its own section of
``benchmarks/RESULTS.md`` (``--out``: another file).
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
from blackbox import Counter, Exhausted  # noqa: E402
from evaluate import write_section  # noqa: E402

import advkit  # noqa: E402
from advkit import ThreatModel  # noqa: E402
from advkit.attacks import NES, ZOO, Bandits, SimBA  # noqa: E402

SECTION = "scores"


class Tracker(Counter):
    """:class:`Counter`, noting per sample the query count of its first adversarial answer."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.found_at = torch.full((len(self.x),), -1, dtype=torch.long)

    def forward(self, batch: Tensor) -> Tensor:
        out = super().forward(batch)
        newly = torch.isfinite(self.best) & (self.found_at < 0)
        self.found_at[newly] = self.queries[newly]
        return out


def run_advkit(attack: advkit.attacks.Attack) -> Callable[[Tracker], dict]:
    def run(counter: Tracker) -> dict:
        counter.per_sample = False
        result = attack(advkit.models.scores_only(counter), counter.x, counter.y)
        counter.norm_at = torch.stack([result.norms_at(q) for q in counter.budgets.tolist()],
                                      dim=1)
        counter.found_at = result.extras["queries_to_success"]
        counter.queries = result.queries - 1  # the final success pass is no attack query
        with torch.no_grad():
            fresh = counter.model(result.x_adv).argmax(1) != counter.y
        return {"own_counts": int(result.queries.sum()),
                "fresh_agrees": bool(torch.equal(fresh, result.success)),
                "fresh_success": fresh.float().mean().item()}
    return run


def run_art(name: str) -> Callable[[Tracker], dict]:
    from art.attacks.evasion import SimBA as ArtSimBA
    from art.attacks.evasion import ZooAttack
    from art.estimators.classification import PyTorchClassifier

    def run(counter: Tracker) -> dict:
        if name == "SimBA":
            # ART's SimBA refuses a model without a softmax (it searches probabilities);
            # the softmax keeps the counter's labels.
            counter.model = nn.Sequential(counter.model, nn.Softmax(dim=1)).eval()
        classifier = PyTorchClassifier(model=counter, loss=nn.CrossEntropyLoss(),
                                       input_shape=tuple(counter.x.shape[1:]),
                                       nb_classes=10, clip_values=(0.0, 1.0))
        budget = int(counter.budgets[-1])
        if name == "SimBA":
            attack = ArtSimBA(classifier, attack="dct", max_iter=budget, epsilon=0.2,
                              verbose=False)
        else:
            attack = ZooAttack(classifier, max_iter=budget, verbose=False)
        for i in range(len(counter.x)):
            counter.current = i
            try:
                # One-hot labels: ART's SimBA reads them with argmax.
                attack.generate(x=counter.x[i:i + 1].numpy(),
                                y=numpy.eye(10, dtype=numpy.float32)[counter.y[i:i + 1].numpy()])
            except Exhausted:
                pass
        counter.current = None
        return {}
    return run


def rows_for(args: argparse.Namespace) -> list[tuple[str, str, str, str, int, Callable]]:
    """(library, attack, config, norm, largest budget, runner) for each row asked for."""
    big = max(args.budgets)
    slow = min(big, args.slow_budget)
    box_l2 = ThreatModel("l2", 28.0)  # the box's diameter on MNIST: no ball
    rows = [
        ("advkit", "SimBA", "DCT, step 0.2", "l2", big,
         run_advkit(SimBA(box_l2, max_queries=big, checkpoints=args.budgets))),
        ("advkit", "NES", "Linf 0.3, defaults", "linf", big,
         run_advkit(NES(ThreatModel("linf", 0.3), max_queries=big, checkpoints=args.budgets))),
        ("advkit", "Bandits", "Bandits-TD, Linf 0.3, defaults (tiles of 4)", "linf", big,
         run_advkit(Bandits(ThreatModel("linf", 0.3), max_queries=big,
                            checkpoints=args.budgets))),
        ("advkit", "ZOO", "defaults", "l2", big,
         run_advkit(ZOO(ThreatModel("l2", math.inf), max_queries=big,
                        checkpoints=args.budgets))),
        ("advkit", "ZOO", "reduced_size=7", "l2", big,
         run_advkit(ZOO(ThreatModel("l2", math.inf), max_queries=big, reduced_size=7,
                        checkpoints=args.budgets))),
        ("art", "SimBA", "DCT, epsilon 0.2", "l2", big, run_art("SimBA")),
        ("art", "ZooAttack", "defaults", "l2", slow, run_art("ZooAttack")),
    ]
    unknown = sorted(set(args.attacks or ()) - {r[1].lower() for r in rows})
    if unknown:
        raise SystemExit(f"unknown attack {unknown[0]!r} in --attacks: use some of "
                         f"{', '.join(sorted({r[1].lower() for r in rows}))}")
    return [r for r in rows if r[0] in args.libraries
            and (args.attacks is None or r[1].lower() in args.attacks)]


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    model = advkit.models.load("small_cnn")
    x, y = advkit.data.load("mnist", split="test", limit=args.limit)
    with torch.no_grad():
        args.misclassified = int((model(x).argmax(1) != y).sum())
    out = []
    for library, attack, config, norm, largest, runner in rows_for(args):
        budgets = [b for b in args.budgets if b <= largest]
        counter = Tracker(model, x, y, budgets)
        torch.manual_seed(0)
        numpy.random.seed(0)  # ART draws from NumPy's global generator
        start = time.perf_counter()
        extra = runner(counter)
        seconds = time.perf_counter() - start
        row = {"library": library, "attack": attack, "config": config, "norm": norm,
               "seconds": seconds, "queries": counter.total,
               "max_queries": int(counter.queries.max()), "budgets": budgets,
               "norm_at": counter.norm_at.clone(), "found_at": counter.found_at.clone(),
               **extra}
        log(f"{library} {attack} {config}: {seconds:.1f} s, success "
            + ", ".join(f"{b}: {torch.isfinite(counter.norm_at[:, k]).float().mean():.0%}"
                        for k, b in enumerate(budgets)))
        out.append(row)
    return out


def _median(values: Tensor) -> str:
    return f"{values.float().median().item():.3g}" if values.numel() else "–"


def _queries(values: Tensor) -> tuple[str, str]:
    """The median and the mean of query counts, as whole numbers ("–" for none)."""
    if not values.numel():
        return "–", "–"
    values = values.float()
    return f"{values.median().item():,.0f}", f"{values.mean().item():,.0f}"


def render(rows: list[dict], args: argparse.Namespace, started: float, load: tuple) -> str:
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in
                         ("torch", "adversarial-robustness-toolbox"))
    cmd = "python benchmarks/blackbox_scores.py " + shlex.join(sys.argv[1:])
    lines = [
        f"<!-- benchmarks/blackbox_scores.py {SECTION}: begin -->",
        "## Score-based attacks: success, norm and queries per budget "
        "(`benchmarks/blackbox_scores.py`)",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}"
        f"; device: {_device_name(torch.device('cpu'))}; torch threads "
        f"{torch.get_num_threads()}",
        f"- versions: {versions}; advkit source {_source_state()}",
        f"- model: small_cnn (the cached MNIST test model); data: MNIST test[:{args.limit}] "
        f"({args.misclassified} misclassified before any attack: broken at the first "
        "look, 1 query), untargeted",
        f"- run time {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; also running: "
        f"{args.note}",
        "- success at q: some image the attack sent within q queries of that image was "
        "classified adversarially (the model's answer, seen by a counting module around it; "
        "advkit's rows: its access layer's record, total checked against the counter); "
        "median norm over the images broken within q (SimBA, ZOO: L2 of the smallest "
        "adversarial image sent; NES, Bandits: Linf, always within 0.3); median and mean "
        "queries to success over the images broken at the largest budget",
        "",
        "| library | attack | config | budget | success | median norm | median queries to "
        "success | mean queries to success | seconds (whole run) | queries counted |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        found = r["found_at"][r["found_at"] > 0]
        for k, budget in enumerate(r["budgets"]):
            norms = r["norm_at"][:, k]
            broken = torch.isfinite(norms)
            first = k == 0
            counted = (f"{r['queries']:,} (max {r['max_queries']:,} per image)"
                       if first else "")
            if first and "own_counts" in r:
                counted += (f"; advkit's access layer: {r['own_counts']:,}; fresh pass "
                            f"{'agrees' if r['fresh_agrees'] else 'DISAGREES'}")
            cells = [f"{budget:,}", f"{broken.float().mean().item():.0%}",
                     _median(norms[broken])]
            if first:
                lines.append(f"| {r['library']} | {r['attack']} | {r['config']} | "
                             + " | ".join(cells) + " | " + " | ".join(_queries(found)) + " | "
                             f"{r['seconds']:.1f} | {counted} |")
            else:
                lines.append("| | | | " + " | ".join(cells) + " | | | | |")
    lines.append(f"<!-- benchmarks/blackbox_scores.py {SECTION}: end -->")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--limit", type=int, default=20, help="MNIST test images")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--slow-budget", type=int, default=1000,
                        help="the largest budget for ART's ZooAttack (slow per query)")
    parser.add_argument("--libraries", nargs="+", default=["advkit", "art"])
    parser.add_argument("--attacks", type=lambda text: [a.strip().lower() for a in
                                                        text.split(",") if a.strip()],
                        default=None, help="only these attacks, comma-separated (simba, nes, "
                                           "bandits, zoo, zooattack); default all")
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
    write_section(args.out, SECTION, text, script="blackbox_scores.py")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
