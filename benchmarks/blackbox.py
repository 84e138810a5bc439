"""Decision-based attacks, advkit beside ART and Foolbox: the L2 norm reached after each query
budget, on the same model and images, every query counted outside the attacks.

Every library's model is the same ``small_cnn`` (the cached MNIST test model) behind a
:class:`Counter`: an ``nn.Module`` that counts each image it answers against the sample it
belongs to, refuses to go past the largest budget (the run ends there), and keeps, per
sample, the closest image it classified adversarially (not as the true label) within each
budget. That is the measure for every library: the smallest perturbation among the images
the attack showed the model, within q queries of the sample, so no library's own
bookkeeping is trusted. advkit's own record (``result.norms_at(q)``, counted by its access
layer) is checked against the counter's.

How each library sees the model: advkit through ``advkit.models.labels_only``; ART as a
``PyTorchClassifier`` (its attacks work one image at a time, so each image is attacked by
its own ``generate`` call, and the counter knows whose queries these are); Foolbox as a
``PyTorchModel`` (batched: each of its calls holds every image once, in order). Peers run
with their defaults, ``targeted=False`` for ART's BoundaryAttack (its default is targeted),
and enough iterations to reach the largest budget.

Run ``python benchmarks/blackbox.py --help``. The run rewrites only its own section of
``benchmarks/RESULTS.md``, and ``benchmarks/blackbox.html`` beside it: the table and the
median L2 of every library's attack versus queries, drawn from that section (``--page-only``
redraws the page from the recorded section without running anything).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import os
import re
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
from evaluate import markers, write_section  # noqa: E402

import advkit  # noqa: E402
from advkit import ThreatModel  # noqa: E402
from advkit.attacks import Boundary, HopSkipJump  # noqa: E402

SECTION = "decision"
EPS = (1.5, 2.0, 3.0)


class Exhausted(Exception):
    """The largest budget is spent: the run ends here."""


class Counter(nn.Module):
    """The model, counting per sample and keeping the closest adversarial image per budget.

    ``current``: the sample a one-image-at-a-time attack (ART) is on; None when every call
    holds each sample once, in order (Foolbox). ``per_sample=False`` only counts the images
    (advkit: its calls mix samples in any proportion, and only its access layer knows
    whose each image is; its per-sample counts and norms are its own, the total is
    checked here).
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, budgets: list[int]) -> None:
        super().__init__()
        self.model, self.x, self.y = model, x, y
        self.budgets = torch.tensor(budgets)
        self.current: int | None = None
        self.per_sample = True
        self.total = 0
        self.queries = torch.zeros(len(x), dtype=torch.long)
        self.best = torch.full((len(x),), math.inf)
        self.norm_at = torch.full((len(x), len(budgets)), math.inf)
        self.eval()

    def forward(self, batch: Tensor) -> Tensor:
        batch = batch.float()  # ART's Boundary attack sends float64
        if not self.per_sample:
            self.total += batch.shape[0]
            with torch.no_grad():
                return self.model(batch)
        if self.current is None and batch.shape[0] != len(self.x):
            raise RuntimeError(f"a batch of {batch.shape[0]} images for {len(self.x)} samples "
                               "without a current sample: whose queries are these?")
        if self.current is not None:
            i = self.current
            room = int(self.budgets[-1] - self.queries[i])
            answered = batch[:room]
            rows = torch.full((len(answered),), i)
            # Query number of each image, in the order the attack sent them.
            number = self.queries[i] + 1 + torch.arange(len(answered))
        else:
            if int(self.queries.max()) >= int(self.budgets[-1]):
                raise Exhausted
            answered, rows = batch, torch.arange(len(batch))
            number = self.queries + 1
        with torch.no_grad():
            logits = self.model(answered)
            adversarial = logits.argmax(1) != self.y[rows]
            size = (answered - self.x[rows]).flatten(1).norm(dim=1)
        size = torch.where(adversarial, size, math.inf)
        if self.current is not None:
            # Best so far after each image of the batch, then what each budget saw.
            running = torch.minimum(size.cummin(0).values, self.best[self.current])
            for k, budget in enumerate(self.budgets.tolist()):
                seen = number <= budget
                if seen.any():
                    self.norm_at[self.current, k] = torch.minimum(
                        self.norm_at[self.current, k], running[seen][-1])
            self.best[self.current] = running[-1] if len(running) else self.best[self.current]
            self.queries[self.current] += len(answered)
            if len(answered) < len(batch):
                raise Exhausted
        else:
            self.best = torch.minimum(self.best, size)
            within = number[:, None] <= self.budgets[None, :]
            self.norm_at = torch.where(within, torch.minimum(self.norm_at, self.best[:, None]),
                                       self.norm_at)
            self.queries += 1
        self.total += len(answered)
        return logits


def run_advkit(attack: advkit.attacks.Attack) -> Callable[[Counter], dict]:
    def run(counter: Counter) -> dict:
        counter.per_sample = False
        result = attack(advkit.models.labels_only(counter), counter.x, counter.y)
        # The same measure, recorded by advkit's search from its access layer's counts
        # (the final success pass is not an attack query: it is left out).
        counter.norm_at = torch.stack([result.norms_at(q) for q in counter.budgets.tolist()],
                                      dim=1)
        counter.queries = result.queries - 1
        return {"own_counts": int(result.queries.sum())}
    return run


def run_art(name: str, budget: int) -> Callable[[Counter], dict]:
    from art.attacks.evasion import BoundaryAttack, HopSkipJump
    from art.estimators.classification import PyTorchClassifier

    def run(counter: Counter) -> dict:
        classifier = PyTorchClassifier(model=counter, loss=nn.CrossEntropyLoss(),
                                       input_shape=tuple(counter.x.shape[1:]),
                                       nb_classes=10, clip_values=(0.0, 1.0))
        if name == "HopSkipJump":
            # max_iter: iterations enough for the budget (iteration t costs ~100 sqrt(t)).
            attack = HopSkipJump(classifier, targeted=False, norm=2, max_iter=1000,
                                 verbose=False)
        else:
            attack = BoundaryAttack(classifier, targeted=False, max_iter=budget,
                                    verbose=False)
        for i in range(len(counter.x)):
            counter.current = i
            try:
                attack.generate(x=counter.x[i:i + 1].numpy(), y=counter.y[i:i + 1].numpy())
            except Exhausted:
                pass
        counter.current = None
        return {}
    return run


def run_foolbox(name: str) -> Callable[[Counter], dict]:
    import foolbox as fb

    def run(counter: Counter) -> dict:
        fmodel = fb.PyTorchModel(counter, bounds=(0, 1))
        attack = (fb.attacks.HopSkipJumpAttack(steps=10_000) if name == "HopSkipJump"
                  else fb.attacks.BoundaryAttack(steps=1_000_000))
        try:
            attack(fmodel, counter.x, counter.y, epsilons=None)
        except Exhausted:
            pass
        return {}
    return run


def rows_for(args: argparse.Namespace) -> list[tuple[str, str, str, int, Callable]]:
    """(library, attack, config, largest budget, runner) for each row asked for."""
    big = max(args.budgets)
    slow = min(big, args.slow_budget)
    l2 = ThreatModel("l2", math.inf)
    rows = [
        ("advkit", "HopSkipJump", "defaults (noise start)",
         big, run_advkit(HopSkipJump(l2, max_queries=big, checkpoints=args.budgets))),
        ("advkit", "HopSkipJump", "start_from='inputs'",
         big, run_advkit(HopSkipJump(l2, max_queries=big, checkpoints=args.budgets,
                                     start_from="inputs"))),
        ("advkit", "Boundary", "defaults (noise start)",
         big, run_advkit(Boundary(l2, max_queries=big, checkpoints=args.budgets))),
        ("art", "HopSkipJump", "defaults, norm 2", big, run_art("HopSkipJump", big)),
        ("art", "BoundaryAttack", "defaults, targeted=False", slow,
         run_art("BoundaryAttack", slow)),
        ("foolbox", "HopSkipJumpAttack", "defaults (l2)", big, run_foolbox("HopSkipJump")),
        ("foolbox", "BoundaryAttack", "defaults", slow, run_foolbox("BoundaryAttack")),
    ]
    return [r for r in rows if r[0] in args.libraries]


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    model = advkit.models.load("small_cnn")
    x, y = advkit.data.load("mnist", split="test", limit=args.limit)
    out = []
    for library, attack, config, largest, runner in rows_for(args):
        budgets = [b for b in args.budgets if b <= largest]
        counter = Counter(model, x, y, budgets)
        torch.manual_seed(0)
        numpy.random.seed(0)  # ART draws from NumPy's global generator
        start = time.perf_counter()
        extra = runner(counter)
        seconds = time.perf_counter() - start
        row = {"library": library, "attack": attack, "config": config, "seconds": seconds,
               "queries": counter.total, "max_queries": int(counter.queries.max()),
               "budgets": budgets, "norm_at": counter.norm_at.clone(), **extra}
        log(f"{library} {attack}: {seconds:.1f} s, medians "
            + ", ".join(f"{b}: {counter.norm_at[:, k].median().item():.3f}"
                        for k, b in enumerate(budgets)))
        out.append(row)
    return out


def render(rows: list[dict], args: argparse.Namespace, started: float, load: tuple) -> str:
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in
                         ("torch", "adversarial-robustness-toolbox", "foolbox", "eagerpy"))
    cmd = "python benchmarks/blackbox.py " + shlex.join(sys.argv[1:])
    lines = [
        f"<!-- benchmarks/blackbox.py {SECTION}: begin -->",
        "## Decision-based attacks: L2 after each query budget (`benchmarks/blackbox.py`)",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}"
        f"; device: {_device_name(torch.device('cpu'))}; torch threads "
        f"{torch.get_num_threads()}",
        f"- versions: {versions}; advkit source {_source_state()}",
        f"- model: small_cnn (the cached MNIST test model); data: MNIST test[:{args.limit}], "
        "untargeted, labels only",
        f"- run time {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; also running: "
        f"{args.note}",
        "- measure: per image, the smallest L2 among the images the attack showed the model "
        "and it classified adversarially, within q queries of that image (counted by a "
        "counting module around the model, the same for every library); inf where none",
        "",
        "| library | attack | config | budget | median L2 | "
        + " | ".join(f"success at L2 {e}" for e in EPS)
        + " | seconds (whole run) | queries counted |",
        "|---|---|---|---:|---:|" + "---:|" * len(EPS) + "---:|---:|",
    ]
    for r in rows:
        for k, budget in enumerate(r["budgets"]):
            norms = r["norm_at"][:, k]
            rates = " | ".join(f"{(norms <= e).float().mean().item():.0%}" for e in EPS)
            first = k == 0
            counted = (f"{r['queries']:,} (max {r['max_queries']:,} per image)"
                       if first else "")
            if first and "own_counts" in r:
                counted += f"; advkit's access layer: {r['own_counts']:,}"
            lines.append(f"| {r['library']} | {r['attack']} | {r['config']} | {budget:,} | "
                         f"{norms.median().item():.3f} | {rates} | "
                         f"{r['seconds']:.1f} | {counted} |".replace("| | ", "| – | ")
                         if first else
                         f"| | | | {budget:,} | {norms.median().item():.3f} | {rates} | | |")
    lines.append(f"<!-- benchmarks/blackbox.py {SECTION}: end -->")
    return "\n".join(lines) + "\n"


def write_page(path: Path, section: str) -> Path:
    """Write the HTML page of a rendered section (:func:`render`'s text, or the one recorded
    in RESULTS.md): its table, and median L2 versus queries, one line per row of the
    benchmark, through advkit's report (the same figure as ``advkit evaluate --report``).

    The numbers are the section's own (medians rounded to 3 decimals), so the page always
    shows what RESULTS.md records.
    """
    from advkit.report import QueryEfficiency, write_html_report

    lines = section.splitlines()
    table = [line.strip().strip("|").split("|") for line in lines if line.startswith("| ")]
    header, body = [cell.strip() for cell in table[0]], table[1:]
    summary, medians, name = [], {}, ""
    for cells in body:
        row = dict(zip(header, (cell.strip() for cell in cells), strict=True))
        # The query counts are long sentences: they stay in RESULTS.md.
        row.pop("queries counted")
        if row["library"]:  # a continuation row (the next budget) leaves it empty
            name = f"{row['library']} {row['attack']}"
            # The config only where it tells two lines apart (advkit's two HopSkipJumps).
            if name in medians or any(name == other.split(" (")[0] for other in medians):
                name += f" ({row['config']})"
        budget, median = int(row["budget"].replace(",", "")), float(row["median L2"])
        medians.setdefault(name, []).append((budget, median))
        summary.append(row)
    facts = [line[2:] for line in lines if line.startswith("- ")]
    environment = dict(fact.split(": ", 1) for fact in facts if ": " in fact)
    title = re.sub(r"`", "", lines[1].lstrip("# "))
    path = write_html_report(
        path, title=title, summary=summary, curves={}, gallery=[], environment=environment,
        notes=["Per image, the smallest L2 among the images the attack showed the model and "
               "it classified adversarially, within q queries of that image, counted by one "
               "counting module around the model for every library; the median is over every "
               "image, an image not yet broken counting as infinitely far."],
        query_efficiency=QueryEfficiency(medians, "L2"))
    # A benchmark page has no eps curve and no gallery: drop their empty sections.
    text = re.sub(r'<section id="(curves|gallery)">.*?</section>\n*', "", path.read_text(),
                  flags=re.S)
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--limit", type=int, default=20, help="MNIST test images")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--slow-budget", type=int, default=5000,
                        help="the largest budget for the Boundary attacks of ART and Foolbox "
                             "(slow per query)")
    parser.add_argument("--libraries", nargs="+", default=["advkit", "art", "foolbox"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="nothing else noted",
                        help="what else ran on the machine (for the record)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--page", type=Path, default=None,
                        help="the HTML page (default: blackbox.html next to --out)")
    parser.add_argument("--page-only", action="store_true",
                        help="only redraw the page from the section recorded in --out")
    args = parser.parse_args(argv)
    args.budgets = sorted(set(args.budgets))
    page = args.page or args.out.parent / "blackbox.html"
    if args.page_only:
        begin, end = markers(SECTION, "blackbox.py")
        recorded = args.out.read_text()
        if begin not in recorded:
            parser.error(f"{args.out} has no {SECTION} section to draw; run the benchmark")
        section = begin + recorded.split(begin, 1)[1].split(end, 1)[0] + end
        print(write_page(page, section))
        return 0
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()
    rows = measure(args, lambda m: print(m, flush=True))
    text = render(rows, args, started, load)
    write_section(args.out, SECTION, text, script="blackbox.py")
    write_page(page, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
