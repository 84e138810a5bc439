"""Bit-identity of results across a refactor: record them once, compare after.

    python benchmarks/identity.py record benchmarks/identity.json   # before the change
    python benchmarks/identity.py compare benchmarks/identity.json  # after: exit 1 on change

On fixed seeds and one torch thread it digests (SHA-256 of the raw bytes)
- every registered attack's x_adv, success, norms, predictions and pass counts on a small
  MNIST model trained here (untargeted, and targeted where the attack takes targets);
- the per-sample records of a budgeted and a minimal evaluation kept in a real SQLite
  store (success, norm, prediction per stage and sample; the clean records);
- the weights of a model trained by every training recipe for a few batches.

Per-sample cost columns are digested apart from the rest (``cost`` keys), so that a change
in how cost is *recorded* shows as exactly that and nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch


def _digest(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _model(workdir: Path) -> torch.nn.Module:
    from advkit.training import TrainConfig, train

    config = TrainConfig(epochs=1, batch_size=100, train_limit=3000, val_limit=500, seed=0)
    return train(config, workdir / "base", progress=False, log=lambda _: None).model


# Small but complete configurations: every attack, every code path that a default takes.
ATTACKS = {
    "fgsm": ("linf", 0.1, {}),
    "bim": ("linf", 0.1, {"steps": 5}),
    "illc": ("linf", 0.1, {"steps": 5}),
    "pgd": ("linf", 0.1, {"steps": 5, "random_start": True}),
    "pgd-l2": ("l2", 1.5, {"steps": 5, "random_start": True}),
    "mifgsm": ("linf", 0.1, {"steps": 5}),
    "apgd": ("linf", 0.1, {"steps": 10, "restarts": 2}),
    "apgd-dlr": ("linf", 0.1, {"steps": 10, "loss": "dlr"}),
    "apgdt": ("linf", 0.1, {"steps": 10, "target_classes": 3}),
    "square": ("linf", 0.1, {"n_queries": 60}),
    "square-l2": ("l2", 1.5, {"n_queries": 60}),
    "deepfool": ("l2", float("inf"), {}),
    "deepfool-linf": ("linf", float("inf"), {}),
    "fab": ("linf", float("inf"), {"steps": 10}),
    "fab-l1": ("l1", float("inf"), {"steps": 10}),
    "carliniwagnerl2": ("l2", float("inf"), {"steps": 20, "search_steps": 2}),
    "carliniwagnerlinf": ("linf", float("inf"), {"steps": 20}),
    "ead": ("l1", float("inf"), {"steps": 20, "search_steps": 2}),
    "jsma": ("l1", float("inf"), {}),
    "pgd-l1": ("l1", 10.0, {"steps": 5}),
    "hotcold": ("l2", float("inf"), {}),
    "featureadversary": ("linf", 0.1, {"steps": 5, "layer": 7}),
    "universalperturbation": ("linf", 0.2, {"max_epochs": 1}),
}


def _attacks(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict]:
    import inspect

    from advkit import ThreatModel, attacks

    out = {}
    for key, (norm, eps, params) in ATTACKS.items():
        cls = attacks.get(key.split("-")[0])
        accepted = inspect.signature(cls.__init__).parameters
        params = {k: v for k, v in params.items() if k in accepted}
        attack = cls(ThreatModel(norm=norm, eps=eps), **params, seed=0)
        runs = {"untargeted": None} if not cls.targeted_only else {}
        if not getattr(cls, "untargeted_only", False) and key not in (
                "illc", "apgd", "apgd-dlr", "universalperturbation", "featureadversary"):
            runs["targeted"] = (y + 1) % 10
        for how, targets in runs.items():
            try:
                r = attack(model, x, y, targets=targets)
            except (ValueError, TypeError) as err:
                out[f"{key}/{how}"] = {"error": str(err)}
                continue
            cost = r.queries if hasattr(r, "queries") else None
            out[f"{key}/{how}"] = {
                "result": _digest(r.x_adv, r.success, r.norms, r.predictions, r.targets),
                "passes": [r.forward_passes, r.backward_passes],
                "cost": _digest(cost) if cost is not None else None,
            }
            print(f"  {key}/{how}: {out[f'{key}/{how}']}", file=sys.stderr)
    return out


def _evaluations(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 workdir: Path) -> dict[str, dict]:
    from advkit import ThreatModel, evaluate
    from advkit.evaluation.store import Store

    out = {}
    cases = {
        "fast-linf": (ThreatModel(norm="linf", eps=0.15), "fast"),
        "apgd+square": (ThreatModel(norm="linf", eps=0.15),
                        "apgd:steps=10+square:n_queries=50"),
        "eot": (ThreatModel(norm="linf", eps=0.15), workdir / "eot.toml"),
        "minimal-l2": (ThreatModel(norm="l2", eps=float("inf")),
                       "deepfool+fab:steps=10+carliniwagnerl2:steps=20,search_steps=2"),
    }
    (workdir / "eot.toml").write_text(
        '[[stage]]\nname = "apgd-eot"\nattack = "apgd"\nparams = { steps = 5 }\neot = 2\n')
    for name, (threat, suite) in cases.items():
        store = Store(workdir / f"{name}.sqlite")
        report = evaluate(model, x, y, threat, suite, store=store, batch_size=16,
                          check_samples=8, progress=False)
        run_id = store.runs()[-1]["id"]
        records = [(stage, o.idx, o.success, o.norm, o.prediction)
                   for stage, o in store.outcomes(run_id)]
        cost = [(stage, o.idx, o.passes, o.passes_exact) for stage, o in store.outcomes(run_id)]
        chunks = [(c.stage, c.chunk, c.n, c.forward, c.backward) for c in store.chunks(run_id)]
        out[name] = {
            "clean": hashlib.sha256(json.dumps(store.samples(run_id)).encode()).hexdigest()[:16],
            "records": hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16],
            "chunks": hashlib.sha256(json.dumps(chunks).encode()).hexdigest()[:16],
            "robust_accuracy": report.robust_accuracy,
            "cost": hashlib.sha256(json.dumps(cost).encode()).hexdigest()[:16],
        }
        store.close()
        print(f"  {name}: {out[name]}", file=sys.stderr)
    return out


def _training(workdir: Path, teacher: torch.nn.Module) -> dict[str, str]:
    from advkit import ThreatModel
    from advkit.training import TrainConfig, build_recipe, train

    threat = ThreatModel(norm="linf", eps=0.3)
    out = {}
    for name in ("standard", "pgd", "fgsm_rs", "trades", "mart", "temperature", "noise",
                 "distillation"):
        options = {"steps": 3} if name in ("pgd", "trades", "mart") else {}
        try:
            recipe = build_recipe(name, threat, teacher=teacher, **options)
        except ValueError:
            recipe = build_recipe(name, threat, teacher=teacher)
        config = TrainConfig(epochs=1, batch_size=50, train_limit=300, val_limit=100, seed=1,
                             recipe=recipe.name)
        result = train(config, workdir / f"train-{name}", progress=False, recipe=recipe,
                       log=lambda _: None)
        state = result.model.state_dict()
        out[name] = _digest(*(state[k] for k in sorted(state)))
        print(f"  train {name}: {out[name]}", file=sys.stderr)
    return out


def collect() -> dict:
    from advkit import data

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = _model(workdir)
        x, y = data.load("mnist", split="test", limit=32)
        return {"attacks": _attacks(model, x, y),
                "evaluations": _evaluations(model, x, y, workdir),
                "training": _training(workdir, model)}


def _compare(old: dict, new: dict, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new)):
            where = f"{path}/{key}" if path else key
            if key not in old or key not in new:
                diffs.append(f"{where}: only in {'new' if key in new else 'recorded'}")
            else:
                diffs.extend(_compare(old[key], new[key], where))
        return diffs
    return [] if old == new else [f"{path}: recorded {old!r}, now {new!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["record", "compare"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--ignore-cost", action="store_true",
                        help="leave out the per-sample cost digests (for a change that "
                             "deliberately records cost differently)")
    args = parser.parse_args()
    now = collect()
    if args.mode == "record":
        args.file.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"recorded {args.file}")
        return 0
    old = json.loads(args.file.read_text())
    diffs = _compare(old, now)
    if args.ignore_cost:
        diffs = [d for d in diffs if not d.split(":")[0].endswith("/cost")]
    for d in diffs:
        print(d)
    print("identical" if not diffs else f"{len(diffs)} differences")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
