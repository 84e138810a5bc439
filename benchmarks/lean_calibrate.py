"""How the `lean` suite was chosen: AutoAE's greedy over candidate stages, measured on
held-out test images of the adversarially trained presets.

    python benchmarks/lean_calibrate.py --models mnist-pgd fashion-mnist-pgd \
        --start 5000 --limit 500

Each candidate (``CANDIDATES``: AutoAttack's stages, APGD with other losses, MALT with 1 to 3
targets, A3 at three budgets, Square at two budgets) runs once on images
``test[start:start + limit]`` of each model (images the issue's figures, ``test[:1000]``,
never use), at the preset's eps; then :func:`advkit.evaluation.autoae.greedy` picks, over
the images of all the models together, the stage that adds the most broken images per
gradient pass, until none adds one or the picks' cost passes ``--max-cost`` gradient
passes per image (a forward pass counts half). Prints every candidate's record and the
picks; writes them to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from evaluate import PRESETS, get_model  # noqa: E402

import advkit  # noqa: E402
from advkit import ThreatModel  # noqa: E402
from advkit.evaluation.autoae import greedy, measure  # noqa: E402
from advkit.evaluation.suites import Stage  # noqa: E402

CANDIDATES = (
    Stage("apgd-ce", "apgd", {"steps": 100, "loss": "ce"}),
    Stage("apgd-dlr", "apgd", {"steps": 100, "loss": "dlr"}),
    Stage("apgd-t", "apgdt", {"steps": 100, "n_target_classes": 9}),
    Stage("fab-t", "fab", {"steps": 100, "target_classes": 9}),
    Stage("malt-1", "malt", {"steps": 100, "n_target_classes": 1}),
    Stage("malt-2", "malt", {"steps": 100, "n_target_classes": 2}),
    Stage("malt-3", "malt", {"steps": 100, "n_target_classes": 3}),
    Stage("a3-50", "a3", {"budget": 50}),
    Stage("a3-100", "a3", {"budget": 100}),
    Stage("a3-200", "a3", {"budget": 200}),
    Stage("square-1000", "square", {"n_queries": 1000}),
    Stage("square-5000", "square", {"n_queries": 5000}),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mnist-pgd", "fashion-mnist-pgd"],
                        choices=list(PRESETS))
    parser.add_argument("--start", type=int, default=5000)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--candidates", nargs="+", default=[c.name for c in CANDIDATES],
                        choices=[c.name for c in CANDIDATES])
    parser.add_argument("--max-cost", type=float, default=None,
                        help="cap on the picks' gradient passes per image")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("/tmp/lean_calibrate.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    stages = [c for c in CANDIDATES if c.name in args.candidates]
    masks: dict[str, list[torch.Tensor]] = {s.name: [] for s in stages}
    costs: dict[str, list[tuple[float, int]]] = {s.name: [] for s in stages}
    attacked = 0
    record = {"models": {}, "command": "python benchmarks/lean_calibrate.py "
              + " ".join(sys.argv[1:])}
    for name in args.models:
        dataset, eps = PRESETS[name]
        model = get_model(name, torch.device("cpu"), log)
        x, y = advkit.data.load(dataset, split="test", limit=args.start + args.limit)
        x, y = x[args.start:], y[args.start:]
        with torch.no_grad():
            correct = int((model(x).argmax(1) == y).sum())
        attacked += correct
        started = time.perf_counter()
        measured = measure(model, x, y, ThreatModel("linf", eps), stages,
                           log=lambda m, n=name: log(f"[{n}] {m}"))
        record["models"][name] = {
            "eps": eps, "correct": correct, "seconds": time.perf_counter() - started,
            "candidates": {k: {"broken": int(v[0].sum()), "cost": v[1],
                               "images": v[0].nonzero().squeeze(1).tolist()}
                           for k, v in measured.items()}}
        for k, (mask, cost) in measured.items():
            masks[k].append(mask)
            costs[k].append((cost, correct))
    # One pool of images over the models; a candidate's cost is its mean over them,
    # weighted by the images attacked on each.
    pooled = {k: (torch.cat(masks[k]), sum(c * n for c, n in costs[k]) / max(attacked, 1))
              for k in masks}
    picks = greedy(pooled, stages, attacked, max_cost=args.max_cost)
    record["picks"] = [{"stage": p.stage.to_dict(), "gain": p.gain,
                        "cost_per_image": p.cost_per_image, "left_after": p.left_after}
                       for p in picks]
    union = torch.zeros_like(next(iter(pooled.values()))[0])
    for mask, _ in pooled.values():
        union |= mask
    record["broken_by_any"] = int(union.sum())
    log(f"\nattacked {attacked} images; broken by any candidate: {int(union.sum())}")
    for k, (mask, cost) in pooled.items():
        log(f"  {k}: broke {int(mask.sum())}, {cost:.1f} gradient passes per image standing")
    log("picks: " + ", ".join(f"{p.stage.name} (+{p.gain}, {p.cost_per_image:.1f}/image)"
                              for p in picks))
    args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
