"""advkit's evaluation engine versus AutoAttack's "standard" configuration, on the same models,
images and eps, in one run.

The reference is AutoAttack as published (Croce & Hein 2020): APGD-CE 100 iterations,
APGD-T 100 iterations x 9 target classes, FAB-T 100 iterations x 9 targets, Square
5,000 queries, each attack on the images that no earlier one broke. It is built from
torchattacks' components configured that way (``torchattacks.AutoAttack`` as shipped
runs 10 iterations; it is reported too), beside ART's ``AutoAttack`` as shipped.

Every library's output is judged here: an image counts as robust when it was
classified correctly and the returned adversarial image (checked to lie in the box
and the eps-ball) is still classified correctly by a fresh forward pass. advkit's
per-sample records come from its own fresh forward passes.

Models: ``standard`` (the demo's small_cnn), ``pgd`` (stride_cnn adversarially
trained with PGD by the shipped MNIST preset: ``advkit train --defense pgd
--preset mnist``, about 55 minutes on a 2-core CPU), ``masked`` (the
standard model with its logits multiplied by 10^4: the softmax saturates, so
cross-entropy gradients vanish — gradient masking by temperature, as in
defensive distillation), and the training presets' runs as ``benchmarks/defenses.py``
trains them (``mnist-pgd``, ``mnist-trades``, ``mnist-mart`` at Linf 0.3,
``fashion-mnist-*`` at 0.1, from ``~/.cache/advkit/recipes``).

Libraries: ``advkit`` (the ``standard`` suite), ``lean`` (advkit's ``lean`` suite), the
reference, torchattacks' and ART's AutoAttack. Every row gives the images sent forward and
the images a gradient flowed back through (advkit: its access layer's count; the peers: a
counting module around the model), and ``lean`` says how many images it and the reference
each break that the other does not.

Run ``python benchmarks/evaluate.py --help``. The run rewrites only its own
sections of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

os.environ.setdefault("TQDM_DISABLE", "1")  # ART and torchattacks draw progress bars otherwise
REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from attacks import _device_name, _source_state, load_model  # noqa: E402

import advkit  # noqa: E402
from advkit.evaluation import SUITES  # noqa: E402
from advkit.models.loaders import trained_path  # noqa: E402
from advkit.threat import ThreatModel  # noqa: E402

LIBRARIES = ("advkit", "lean", "reference", "torchattacks-aa", "art-aa")
#: The training presets' runs (``benchmarks/defenses.py`` and ``protection.py`` train them
#: there): the adversarially trained models of issue 19's table, with their dataset and eps.
PRESETS = {f"{data}-{defense}": (data, eps) for data, eps in (("mnist", 0.3),
                                                             ("fashion-mnist", 0.1))
           for defense in ("pgd", "trades", "mart")}
MODELS = ("standard", "pgd", "masked", *PRESETS)
RUNS = Path.home() / ".cache" / "advkit" / "recipes"


class Passes(nn.Module):
    """The model, counting the images it sends forward and the images a gradient flows
    back through (one per image per backward pass), as advkit's access layer counts them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.forward_passes, self.backward_passes = model, 0, 0

    def forward(self, x: Tensor) -> Tensor:
        self.forward_passes += x.shape[0]
        out = self.model(x)
        if out.requires_grad:
            n = x.shape[0]
            out.register_hook(lambda g: self._back(n))
        return out

    def _back(self, n: int) -> None:
        self.backward_passes += n
PGD_MODEL = "stride_cnn-mnist-pgd"
PGD_TRAIN = "advkit train --defense pgd --preset mnist --no-card"


class Scaled(nn.Module):
    """Logits times a large temperature: the softmax saturates (gradient masking)."""

    def __init__(self, model: nn.Module, factor: float = 1e4) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) * self.factor


def dataset_and_eps(name: str, eps: float) -> tuple[str, float]:
    """The dataset and eps a model is evaluated at (a preset's own; else MNIST, ``eps``)."""
    return PRESETS.get(name, ("mnist", eps))


def get_model(name: str, device: torch.device, log: Callable[[str], None]) -> nn.Module:
    if name in PRESETS:
        path = RUNS / name / "model.safetensors"
        if not path.is_file():
            data, defense = name.rsplit("-", 1)
            raise SystemExit(f"no {name} model at {path}; train it first with:\n  python "
                             f"benchmarks/defenses.py --preset {data} --defenses {defense}")
        return advkit.models.load(str(path)).to(device).eval()
    if name == "pgd":
        path = trained_path(PGD_MODEL)
        if not path.is_file():
            raise SystemExit(f"no PGD-trained model at {path}; train it first with:\n  {PGD_TRAIN}")
        return advkit.models.load(str(path)).to(device).eval()
    model = load_model("small_cnn", device, log)
    return Scaled(model).eval() if name == "masked" else model


def judge(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, eps: float) -> Tensor:
    """Per-sample: robust (correct before, correct after, the image a legal perturbation)."""
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        adv = model(x_adv).argmax(1) == y
    legal = ((x_adv - x).flatten(1).abs().amax(1) <= eps + 1e-5) & (x_adv.min() >= 0) & (
        x_adv.max() <= 1)
    if not legal.all():
        print(f"  warning: {int((~legal).sum())} returned images leave the ball or the box; "
              "counted as broken only if legal", flush=True)
    return clean & (adv | ~legal)


def run_peer(library: str, model: nn.Module, x: Tensor, y: Tensor, eps: float,
             batch_size: int) -> Tensor:
    """x_adv from torchattacks (reference or AutoAttack as shipped) or ART's AutoAttack."""
    if library == "art-aa":
        from art.attacks.evasion import AutoAttack
        from art.estimators.classification import PyTorchClassifier
        clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                nb_classes=10, clip_values=(0.0, 1.0))
        attack = AutoAttack(clf, norm="inf", eps=eps, eps_step=eps / 4, batch_size=batch_size)
        return torch.from_numpy(attack.generate(x.numpy()))
    import torchattacks as ta
    if library == "reference":
        attack = ta.MultiAttack([
            ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
            ta.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0),
            ta.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                   n_classes=10, seed=0),
            ta.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=0),
        ])
    else:
        attack = ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10,
                               seed=0)
    return torch.cat([attack(x[i:i + batch_size], y[i:i + batch_size])
                      for i in range(0, len(x), batch_size)])


def measure(args: argparse.Namespace, name: str, log: Callable[[str], None]) -> list[dict]:
    device = torch.device("cpu")
    model = get_model(name, device, log)
    dataset, eps = dataset_and_eps(name, args.eps)
    x, y = advkit.data.load(dataset, split="test", limit=args.start + args.limit)
    x, y = x[args.start:], y[args.start:]
    threat = ThreatModel("linf", eps)
    rows = []
    advkit_robust = None  # advkit's per-sample verdicts, to compare on a peer's subset
    verdicts: dict[str, Tensor] = {}  # per-sample robust, for the images each side breaks
    for library in args.libraries:
        log(f"{name}: {library} ...")
        t0 = time.perf_counter()
        if library == "lean":
            report = advkit.evaluate(model, x, y, threat, "lean", batch_size=args.batch_size,
                                     progress=False, checks=False, log=log)
            seconds = time.perf_counter() - t0
            verdicts["lean"] = torch.tensor([bool(r["robust"]) for r in report.per_sample])
            stages = ", ".join(f"{s['stage']} {s['robust_acc_after']:.1%}" for s in report.stages)
            rows.append({"library": "advkit `lean`", "robust": report.robust_accuracy,
                         "seconds": seconds, "notes": f"after each stage: {stages}",
                         **_passes(report.stages)})
            log(f"{name}: advkit lean: robust {report.robust_accuracy:.1%}, {seconds:.1f} s")
            continue
        if library == "advkit":
            report = advkit.evaluate(model, x, y, threat, "standard", batch_size=args.batch_size,
                                     progress=False, checks=False, log=log)
            seconds = time.perf_counter() - t0
            robust = report.robust_accuracy
            advkit_robust = torch.tensor([bool(r["robust"]) for r in report.per_sample])
            verdicts["advkit"] = advkit_robust
            t1 = time.perf_counter()
            checked = advkit.evaluate(model, x[:args.check_samples], y[:args.check_samples],
                                      threat, SUITES["fast"], progress=False, log=log,
                                      check_samples=args.check_samples)
            check_seconds = time.perf_counter() - t1
            failed = [c.name for c in checked.checks if c.status == "fail"]
            stages = ", ".join(f"{s['stage']} {s['robust_acc_after']:.1%}" for s in report.stages)
            extra = (f"after each stage: {stages}; checks ({check_seconds:.0f} s on "
                     f"{args.check_samples} images): " + (f"FAIL {', '.join(failed)}" if failed
                                                          else "all pass"))
            rows.append({"library": "advkit `standard`", "robust": robust, "seconds": seconds,
                         "notes": extra, **_passes(report.stages)})
            log(f"{name}: advkit standard: robust {robust:.1%}, {seconds:.1f} s")
            if name == "masked" or args.thorough:
                t2 = time.perf_counter()
                deep = advkit.evaluate(model, x, y, threat, "thorough", batch_size=args.batch_size,
                                       progress=False, checks=False, log=log)
                rows.append({"library": "advkit `thorough`", "robust": deep.robust_accuracy,
                             "seconds": time.perf_counter() - t2,
                             "notes": ", ".join(f"{s['stage']} {s['robust_acc_after']:.1%}"
                                                for s in deep.stages)})
            continue
        n = min(args.art_limit or args.limit, args.limit) if library == "art-aa" else args.limit
        cache = _cache_path(args, name, library, n)
        cached = _read_cache(cache, x[:n], y[:n]) if args.reuse else None
        if cached is not None:  # an earlier run's verdicts, passes and time, said so
            per_sample, seconds, forward, backward = cached["verdicts"], cached["seconds"], \
                cached["forward"], cached["backward"]
            log(f"{name}: {library}: reused {cache} ({cached['when']})")
        else:
            counted = Passes(model).eval()
            x_adv = run_peer(library, counted, x[:n], y[:n], eps, args.batch_size)
            seconds = time.perf_counter() - t0
            per_sample = judge(model, x[:n], y[:n], x_adv, eps)
            forward, backward = counted.forward_passes, counted.backward_passes
            _write_cache(cache, x[:n], y[:n], per_sample, seconds, forward, backward, args)
        robust = per_sample.float().mean().item()
        if n == args.limit:
            verdicts[library] = per_sample
        label = {"reference": "reference (torchattacks components as published)",
                 "torchattacks-aa": "torchattacks.AutoAttack as shipped",
                 "art-aa": "ART AutoAttack as shipped"}[library]
        notes = ""
        if n < args.limit:  # a subset: its time is not comparable, its accuracy is
            seconds = float("nan")
            notes = (f"first {n} images only ({time.perf_counter() - t0:.0f} s); advkit "
                     "`standard` on the same images: " + (
                         f"{advkit_robust[:n].float().mean().item():.1%}"
                         if advkit_robust is not None else "not run"))
        if cached is not None:
            notes = (f"{notes}; " if notes else "") + (
                f"reused from the run of {cached['when']} (source {cached['source']}, load "
                f"{cached['load']:.2f} at its start), not rerun")
        rows.append({"library": label, "robust": robust, "seconds": seconds, "notes": notes,
                     "forward": forward, "backward": backward})
        log(f"{name}: {label}: robust {robust:.1%}, {seconds:.1f} s")
    if "lean" in verdicts and "reference" in verdicts:
        lean, ref = verdicts["lean"], verdicts["reference"]
        row = next(r for r in rows if r["library"] == "advkit `lean`")
        row["notes"] += (f"; breaks {int((~lean & ref).sum())} image(s) the reference does "
                         f"not, the reference {int((lean & ~ref).sum())} that lean does not")
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    return [{"clean": clean, **r} for r in rows]


def _cache_path(args: argparse.Namespace, name: str, library: str, n: int) -> Path:
    return args.cache / f"{name}-{library}-{args.start}-{n}.json"


def _fingerprint(x: Tensor, y: Tensor) -> str:
    """The images and labels a cached peer run was measured on (reuse only on the same)."""
    return hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]


def _read_cache(path: Path, x: Tensor, y: Tensor) -> dict | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("inputs") != _fingerprint(x, y):
        return None  # other images (or another model's data): run the peer again
    return {**data, "verdicts": torch.tensor(data["verdicts"], dtype=torch.bool)}


def _write_cache(path: Path, x: Tensor, y: Tensor, verdicts: Tensor, seconds: float,
                 forward: int, backward: int, args: argparse.Namespace) -> None:
    """A peer's per-sample verdicts, passes and time: ``--reuse`` compares a changed advkit
    suite with them without rerunning the peer (the peers are seeded and unchanged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "inputs": _fingerprint(x, y), "verdicts": verdicts.tolist(), "seconds": seconds,
        "forward": forward, "backward": backward, "source": args.source,
        "when": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load": args.load_before, "threads": torch.get_num_threads()}))


def _passes(stages: list[dict]) -> dict[str, int]:
    return {"forward": sum(s["forward_passes"] for s in stages),
            "backward": sum(s["backward_passes"] for s in stages)}


def section(name: str, rows: list[dict], args: argparse.Namespace, started: float) -> str:
    versions = [f"torch {torch.__version__}", f"advkit {advkit.__version__}"]
    for dist in ("torchattacks", "adversarial-robustness-toolbox"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    ref_row = next((r for r in rows if r["library"].startswith("reference")), None)
    ref = ref_row["seconds"] if ref_row else None
    dataset, eps = dataset_and_eps(name, args.eps)
    lines = [
        f"<!-- benchmarks/evaluate.py {name}: begin -->",
        f"## Evaluation, model `{name}`: {dataset} Linf eps {eps}, {args.limit} test images"
        + (f" from test[{args.start}]" if args.start else ""),
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {_device_name(torch.device('cpu'))}; torch threads {torch.get_num_threads()}",
        f"- python {platform.python_version()}; versions: {', '.join(versions)}; advkit source "
        f"{args.source}",
        f"- run time {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{args.load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        "",
        "- passes: images sent forward / images a gradient flowed back through (advkit: its "
        "access layer's count; the peers: a counting module around the model); 'vs "
        "reference' divides seconds and backward passes by the reference's",
        "",
        "| library / configuration | clean | robust | seconds | vs reference | forward | "
        "backward | backward vs reference | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        timed = r["seconds"] == r["seconds"]  # NaN: a subset, not timed against the rest
        ratio = f"{r['seconds'] / ref:.2f}" if ref and timed else "–"
        fwd, bwd = r.get("forward"), r.get("backward")
        bratio = (f"{bwd / ref_row['backward']:.3f}" if ref_row and ref_row.get("backward")
                  and bwd is not None and timed else "–")
        lines.append(f"| {r['library']} | {r['clean']:.1%} | {r['robust']:.1%} | "
                     f"{r['seconds']:.1f} | {ratio} | "
                     f"{'–' if fwd is None or not timed else f'{fwd:,}'} | "
                     f"{'–' if bwd is None or not timed else f'{bwd:,}'} | {bratio} | "
                     f"{r['notes']} |".replace("| nan |", "| – |"))
    lines.append(f"<!-- benchmarks/evaluate.py {name}: end -->")
    return "\n".join(lines) + "\n"


def markers(name: str, script: str = "evaluate.py") -> tuple[str, str]:
    """The comments that delimit a generated section of RESULTS.md."""
    return tuple(f"<!-- benchmarks/{script} {name}: {w} -->" for w in ("begin", "end"))


def write_section(path: Path, name: str, text: str, script: str = "evaluate.py") -> None:
    """Replace the section ``name`` of ``path`` with ``text`` (or append it)."""
    begin, end = markers(name, script)
    old = path.read_text() if path.exists() else "# advkit benchmark results\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        old = head + text.rstrip("\n") + rest.split(end, 1)[1]
    else:
        old = old.rstrip("\n") + "\n\n" + text
    path.write_text(old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--limit", type=int, default=1000, help="test images")
    parser.add_argument("--start", type=int, default=0,
                        help="first test image (held-out slices for tuning: e.g. 5000)")
    parser.add_argument("--cache", type=Path,
                        default=Path.home() / ".cache" / "advkit" / "bench" / "evaluate",
                        help="where each peer run's per-sample verdicts, passes and time are "
                             "kept")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a peer's kept run on the same model and images instead of "
                             "rerunning it (its time comes from that run: the section says so)")
    parser.add_argument("--eps", type=float, default=0.3,
                        help="eps of the MNIST models that are not presets (a preset has its "
                             "own: 0.3 MNIST, 0.1 Fashion-MNIST)")
    parser.add_argument("--art-limit", type=int, default=None,
                        help="run ART's AutoAttack (5 restarts of each attack, Square "
                             "included: hours on a robust model on CPU) on the first N "
                             "images only, compared with advkit's verdicts on the same images")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--check-samples", type=int, default=100,
                        help="images for advkit's masking checks (timed apart)")
    parser.add_argument("--thorough", action="store_true",
                        help="also run advkit's thorough suite on every model (always on masked)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    args.load_before = os.getloadavg()[0]
    args.source = _source_state()  # at the start: the code the run imported
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    for name in args.models:
        started = time.perf_counter()
        rows = measure(args, name, log)
        key = f"{name} from test[{args.start}]" if args.start else name  # held out: its own
        write_section(args.out, key, section(name, rows, args, started).replace(
            f"evaluate.py {name}: ", f"evaluate.py {key}: "))
        log(f"wrote the {name} section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
