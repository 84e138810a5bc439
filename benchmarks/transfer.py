"""Transfer figures on MNIST: the transferability matrix (FGSM, PGD, MI-FGSM and MEA as
sources) and substitute training (Papernot et al. 2017) beside ART's CopycatCNN.

    python benchmarks/transfer.py                                   # the figures (~10 min)
    python benchmarks/transfer.py --limit 100 --rounds 2 --epochs 1 --train-epochs 1  # smoke

Models (all MNIST, Linf eps 0.3 unless --eps): small_cnn (the test model,
~/.cache/advkit/test-models/small_cnn-mnist.safetensors), stride_cnn standard and PGD
adversarially trained (the ``mnist`` preset's runs, ~/.cache/advkit/recipes/mnist-standard
and mnist-pgd, trained by benchmarks/defenses.py), lenet5 and mlp trained here for
``--train-epochs`` seeded epochs (cached in ~/.cache/advkit/transfer/ARCH-standard).

Matrix: each source attack crafts on each model (early exit off: stopping once the source is
fooled leaves examples on its boundary), every model judges; a cell is the success rate on
the images its target classifies correctly (test[:limit]). MEA crafts leave-one-out on the
other four models. Substitute: the target is small_cnn behind ``labels_only``; ``S_0`` is
150 test images after the attacked ones; the substitute is lenet5; FGSM and PGD crafted on
it are judged on the target's correctly classified test[:limit]. ART's CopycatCNN steals a
lenet5 with the same number of label queries from natural test images.
The section ``Transfer`` of RESULTS.md is rewritten at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks import _device_name, _source_state  # noqa: E402
from evaluate import markers, write_section  # noqa: E402

import advkit  # noqa: E402
from advkit import ThreatModel, models  # noqa: E402
from advkit.attacks import FGSM, MEA, MIFGSM, PGD, Substitute, Transfer  # noqa: E402
from advkit.evaluation.transferability import OTHERS, transferability_matrix  # noqa: E402
from advkit.models import zoo  # noqa: E402
from advkit.training import TrainConfig, train  # noqa: E402

CACHE = Path.home() / ".cache" / "advkit"
SECTION = "transfer"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def load_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    found = {
        "small_cnn": CACHE / "test-models" / "small_cnn-mnist.safetensors",
        "stride_cnn": CACHE / "recipes" / "mnist-standard" / "model.safetensors",
        "stride_cnn-pgd": CACHE / "recipes" / "mnist-pgd" / "model.safetensors",
    }
    out = {}
    for name, path in found.items():
        if not path.exists():
            sys.exit(f"{path} is missing: run benchmarks/defenses.py --preset mnist (or the "
                     "advkit test suite for the small_cnn test model) first")
        out[name] = models.load(path)
    for arch in ("lenet5", "mlp"):
        run = train(TrainConfig(arch=arch, epochs=args.train_epochs, seed=0),
                    CACHE / "transfer" / f"{arch}-standard-{args.train_epochs}ep",
                    progress=False, log=lambda line: None)
        out[arch] = run.model.eval()
    return {name: out[name] for name in ("small_cnn", "lenet5", "mlp", "stride_cnn",
                                         "stride_cnn-pgd")}


def matrix_figure(args: argparse.Namespace, zoo_models: dict, x, y, threat) -> tuple:
    sources = {
        "FGSM": lambda t: FGSM(t),
        "PGD-40": lambda t: PGD(t, steps=40, step_size=0.01, early_exit=False),
        "MI-FGSM-10": lambda t: MIFGSM(t, steps=10, decay=1.0, early_exit=False),
    }
    ensembles = {"MEA-40": lambda t, ms: MEA(t, ms, steps=40, step_size=0.01)}
    return transferability_matrix(zoo_models, x, y, threat, sources=sources,
                                  ensembles=ensembles, log=print)


def substitute_figure(args: argparse.Namespace, target, x, y, seeds, threat) -> list[dict]:
    with torch.no_grad():
        keep = target(x).argmax(1) == y
    xs, ys = x[keep], y[keep]
    rows = []
    variants = [("Algorithm 1", {}), ("reservoir sigma=3 kappa=400", {"sigma": 3, "kappa": 400})]
    for label, extra in variants:
        for attack_name, attack in (("FGSM", FGSM(threat)),
                                    ("PGD-40", PGD(threat, steps=40, step_size=0.01,
                                                   early_exit=False))):
            sub = Substitute(threat, "lenet5", seed_images=seeds,
                             rounds=args.rounds, epochs=args.epochs, lam=0.1, attack=attack,
                             **extra)
            start = time.perf_counter()
            result = sub(models.labels_only(target), xs, ys)
            rows.append({
                "who": "advkit Substitute", "variant": label, "attack": attack_name,
                "queries": int(result.queries.sum()) - 2 * len(ys),
                "agreement": (result.extras["substitute_labels"] == ys).float().mean().item(),
                "success": result.success_rate, "seconds": time.perf_counter() - start,
                "n": len(ys)})
            print(rows[-1])
    return rows


def art_copycat(args: argparse.Namespace, target, x, y, pool, queries: int,
                threat) -> dict | None:
    try:
        from art.attacks.extraction import CopycatCNN
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        return None
    import art

    with torch.no_grad():
        keep = target(x).argmax(1) == y
    xs, ys = x[keep], y[keep]
    torch.manual_seed(0)
    thief_model = zoo.create("lenet5").train()
    wrap = dict(loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                clip_values=(0.0, 1.0))
    victim = PyTorchClassifier(target, **wrap)
    thief = PyTorchClassifier(thief_model, optimizer=torch.optim.Adam(
        thief_model.parameters(), lr=1e-3), **wrap)
    start = time.perf_counter()
    copycat = CopycatCNN(victim, batch_size_fit=128, batch_size_query=128,
                         nb_epochs=args.epochs * args.rounds, nb_stolen=queries)
    stolen = copycat.extract(pool[:queries].numpy(), thieved_classifier=thief)
    seconds = time.perf_counter() - start
    stolen_model = stolen.model.eval()
    result = Transfer(threat, [stolen_model], FGSM(threat))(models.labels_only(target), xs, ys)
    with torch.no_grad():
        agreement = (stolen_model(xs).argmax(1) == ys).float().mean().item()
    return {"who": f"ART {art.__version__} CopycatCNN", "variant": f"{queries} natural test "
            f"images, {args.epochs * args.rounds} epochs", "attack": "FGSM",
            "queries": queries, "agreement": agreement, "success": result.success_rate,
            "seconds": seconds, "n": len(ys)}


def section(args, matrix, sub_rows, started) -> str:
    begin, end = markers(SECTION, "transfer.py")
    names = matrix.models
    lines = [
        begin,
        f"## Transfer: MNIST transferability matrix and substitute training (Linf {args.eps})",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {_device_name(torch.device('cpu'))}; torch threads {torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, advkit "
        f"{advkit.__version__}, source {args.source}",
        f"- data: MNIST test[:{args.limit}]; a cell is the success rate on the images the "
        "target (column) classifies correctly: " + ", ".join(
            f"{t} {matrix.correct[t]}" for t in names) + f" of {matrix.n}",
        "- models: small_cnn (test model), lenet5 and mlp (standard, "
        f"{args.train_epochs} seeded epochs, ~/.cache/advkit/transfer/), stride_cnn (preset "
        "mnist standard) and stride_cnn-pgd (preset mnist pgd, Madry et al. adversarial "
        "training), ~/.cache/advkit/recipes/",
        "- sources: FGSM (one step of eps); PGD-40 (step 0.01, random start); MI-FGSM-10 "
        "(decay 1.0, step eps/10); MEA-40 (Liu et al.'s fused softmax, uniform weights, "
        "step 0.01, no random start) on the four models other than the target. Early exit "
        "off everywhere (an example stops being pushed once it fools its source otherwise).",
        f"- run time {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{args.load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        "",
        "| attack | source | " + " | ".join(names) + " | mean transfer (off-diagonal) | s |",
        "|---|---|" + "---:|" * (len(names) + 2),
    ]
    for row in matrix.rows():
        cells = [f"**{row[t]:.1%}**" if row["source"] == t else f"{row[t]:.1%}"
                 for t in names]
        lines.append(f"| {row['attack']} | {row['source']} | " + " | ".join(cells)
                     + f" | {row['transfer_rate']:.1%} | {row['seconds']:.1f} |")
    lines += ["", "Bold: the white-box success (source = target).", ""]
    # The papers' claims, read off this run.
    means = {a: [r["transfer_rate"] for r in matrix.rows() if r["attack"] == a]
             for a in ("FGSM", "PGD-40", "MI-FGSM-10")}
    mean = {a: sum(v) / len(v) for a, v in means.items()}
    mea = matrix.success[("MEA-40", OTHERS)]
    single = {t: max(matrix.rate("PGD-40", s, t) for s in names if s != t) for t in names}
    lines += [
        "Mean transfer rate over all off-diagonal cells: " + ", ".join(
            f"{a} {v:.1%}" for a, v in mean.items())
        + f", MEA-40 (leave-one-out) {sum(mea.values()) / len(mea):.1%}.",
        "",
        "MEA against the best single PGD-40 source among its members, per held-out target: "
        + "; ".join(f"{t} {mea[t]:.1%} vs {single[t]:.1%}" for t in names) + ".",
        "",
        "Substitute training (target small_cnn behind labels_only; substitute lenet5, "
        f"{args.epochs} Adam epochs per substitute epoch, rho={args.rounds}, lambda=0.1; "
        f"S_0 = test[{args.limit}:{args.limit + 150}]; queries = label queries of the "
        "training, besides 2 per attacked image; agreement = substitute's label equals the "
        "true label on the attacked images (all classified correctly by the target), i.e. "
        "its accuracy there):",
        "",
        "| who | variant | attack | label queries | substitute accuracy | transfer success "
        "| s | n |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        *(f"| {r['who']} | {r['variant']} | {r['attack']} | {r['queries']:,} | "
          f"{r['agreement']:.1%} | {r['success']:.1%} | {r['seconds']:.1f} | {r['n']} |"
          for r in sub_rows),
        "",
        "Papernot et al. 2017 (arXiv 1602.02697, abstract): against MetaMind's remote MNIST "
        "DNN, \"after labeling 6,400 synthetic inputs to train our substitute\", the target "
        "\"misclassifies adversarial examples crafted with our substitute at a rate of "
        "84.24%\" (FGSM; their eps for that figure is in their section 5, not quoted here "
        "because this section's author could not read it from the sources at hand).",
        end,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=1000, help="attacked test images")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--train-epochs", type=int, default=2,
                        help="epochs of the lenet5 and mlp trained here")
    parser.add_argument("--rounds", type=int, default=6, help="substitute epochs rho")
    parser.add_argument("--epochs", type=int, default=10,
                        help="training epochs per substitute epoch")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    args.source, args.load_before, started = _source_state(), os.getloadavg()[0], \
        time.perf_counter()
    threat = ThreatModel("linf", args.eps)
    x_all, y_all = advkit.data.load("mnist", split="test", limit=args.limit + 5000)
    x, y = x_all[:args.limit], y_all[:args.limit]
    seeds = x_all[args.limit:args.limit + 150]
    zoo_models = load_models(args)
    matrix = matrix_figure(args, zoo_models, x, y, threat)
    sub_rows = substitute_figure(args, zoo_models["small_cnn"], x, y, seeds, threat)
    art_row = art_copycat(args, zoo_models["small_cnn"], x, y, x_all[args.limit + 150:],
                          sub_rows[0]["queries"], threat)
    if art_row:
        print(art_row)
        sub_rows.append(art_row)
    text = section(args, matrix, sub_rows, started)
    print(text)
    if not args.no_write:
        write_section(RESULTS, SECTION, text, script="transfer.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
