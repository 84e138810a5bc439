"""Which images Square breaks that every white-box stage of ``standard`` missed, and what
breaks them from the white-box side.

    python benchmarks/square_gap.py --model mnist-pgd --limit 1000

On a preset's model (``~/.cache/advkit/recipes/<model>/model.safetensors``), the first
``--limit`` test images at Linf ``--eps``: AutoAttack's stages as ``standard`` runs them
(APGD-CE, APGD-T x 9, FAB-T x 9 on the images no earlier stage broke, then Square with
5,000 queries). The images Square alone breaks ("the gap") are described (clean margin and
top probability in float32, where the white-box stages left their margin, Square's queries
to success) and attacked by white-box candidates, each on the gap and on as many images
that survived every stage (the control: a candidate that breaks those breaks more than the
gap). Prints a table and writes the per-image records to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import advkit  # noqa: E402
from advkit import ThreatModel  # noqa: E402
from advkit.attacks import APGD, APGDT, FAB, PGD, Square  # noqa: E402

RUNS = Path.home() / ".cache" / "advkit" / "recipes"


def margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        z = model(x)
    own = z.gather(1, y[:, None]).squeeze(1)
    return own - z.scatter(1, y[:, None], -math.inf).amax(1)


def candidates(threat: ThreatModel) -> dict[str, object]:
    """White-box attacks that might close the gap, cheapest first."""
    return {
        "apgd-ce x5 restarts": APGD(threat, steps=100, loss="ce", restarts=5),
        "apgd-dlr x5 restarts": APGD(threat, steps=100, loss="dlr", restarts=5),
        "apgd-ce 1000 steps": APGD(threat, steps=1000, loss="ce"),
        "apgd-t x3 restarts": APGDT(threat, steps=100, restarts=3),
        "pgd margin 200 x2": PGD(threat, steps=200, loss="margin", restarts=2),
        "apgd-ce no random start": APGD(threat, steps=100, loss="ce", random_start=False),
        "fab (untargeted) x5": FAB(threat, steps=100, restarts=5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-pgd", help="a preset run under ~/.cache")
    parser.add_argument("--dataset", default=None, help="default: from the model's name")
    parser.add_argument("--eps", type=float, default=None, help="default 0.3 / 0.1 (fashion)")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("/tmp/square_gap.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = args.dataset or ("fashion-mnist" if args.model.startswith("fashion") else "mnist")
    eps = args.eps or (0.1 if dataset == "fashion-mnist" else 0.3)
    model = advkit.models.load(str(RUNS / args.model / "model.safetensors")).eval()
    x, y = advkit.data.load(dataset, split="test", limit=args.limit)
    threat = ThreatModel("linf", eps)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    alive = correct.clone()
    broken_by: dict[int, str] = {}
    best_margin = margin(model, x, y)
    x_adv = x.clone()
    stages = [("apgd-ce", APGD(threat, steps=100, loss="ce")),
              ("apgd-t", APGDT(threat, steps=100, n_target_classes=9)),
              ("fab-t", FAB(threat, steps=100, target_classes=9))]
    square_queries: dict[int, int] = {}
    for name, attack in [*stages, ("square", Square(threat, n_queries=5000))]:
        idx = alive.nonzero().squeeze(1)
        start = time.perf_counter()
        result = attack(model, x[idx], y[idx])
        m = margin(model, result.x_adv, y[idx])
        if name != "square":
            better = m < best_margin[idx]
            best_margin[idx[better]] = m[better]
            x_adv[idx[better]] = result.x_adv[better]
        for k in result.success.nonzero().squeeze(1).tolist():
            broken_by[int(idx[k])] = name
            if name == "square":
                square_queries[int(idx[k])] = int(result.queries[k])
        alive[idx[result.success]] = False
        print(f"{name}: broke {int(result.success.sum())} of {len(idx)} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    gap = sorted(i for i, s in broken_by.items() if s == "square")
    survivors = alive.nonzero().squeeze(1).tolist()
    control = survivors[:max(len(gap), 10)]
    with torch.no_grad():
        probs = model(x).softmax(1)
    records = [{"index": i, "label": int(y[i]), "clean_margin": float(margin(model, x[i:i + 1],
                                                                              y[i:i + 1])),
                "top_probability": float(probs[i].max()),
                "p_true_is_1_in_float32": bool(probs[i, y[i]] == 1.0),
                "white_box_best_margin": float(best_margin[i]),
                "square_queries": square_queries[i]} for i in gap]
    print(f"\nclean {int(correct.sum())}/{len(x)}; robust after all {len(survivors)}; "
          f"the gap (Square only): {len(gap)} images: {gap}")
    for r in records:
        print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in r.items()))
    found = {}
    for name, attack in candidates(threat).items():
        start = time.perf_counter()
        row = {}
        for label, idx in (("gap", gap), ("control", control)):
            if not idx:
                row[label] = []
                continue
            t = torch.tensor(idx)
            result = attack(model, x[t], y[t])
            row[label] = [idx[k] for k in result.success.nonzero().squeeze(1).tolist()]
        row["seconds"] = time.perf_counter() - start
        found[name] = row
        print(f"{name}: gap {len(row['gap'])}/{len(gap)}, control {len(row['control'])}/"
              f"{len(control)} ({row['seconds']:.0f} s)", flush=True)
    args.json.write_text(json.dumps({"model": args.model, "eps": eps, "limit": args.limit,
                                     "gap": records, "survivors": len(survivors),
                                     "broken_by": {str(k): v for k, v in broken_by.items()},
                                     "candidates": found}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
