"""Common corruptions: the robustness table of the standard and adversarially trained presets.

    python benchmarks/corruptions.py                          # the RESULTS.md figure
    python benchmarks/corruptions.py --limit 200 --out /tmp/RESULTS.md   # a quick look

For each dataset (MNIST, Fashion-MNIST) the preset models that ``benchmarks/defenses.py``
trained (``~/.cache/advkit/recipes/{dataset}-{recipe}``; a missing one is named with the
command that trains it, and skipped) are scored by ``advkit.corruptions.corruption_table``
on the first ``--limit`` test images, with the same seed, so every model sees identical
corrupted images. The table gives the accuracy averaged over the five severities per
corruption, the mean error, and the mean corruption error (mCE, Hendrycks & Dietterich
2019, eq. 1) with the dataset's standard model as the baseline (the paper normalises by
AlexNet; here the baseline is the undefended model of the same architecture, so a
defense's mCE below 1 means it makes fewer corruption errors than no defense at all).

The question the table answers: does robustness to an eps-ball carry over to
corruptions, which move far outside it? Forward passes only (a few minutes on CPU).
"""

from __future__ import annotations

import argparse
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
from kept import now  # noqa: E402

import advkit  # noqa: E402
from advkit.corruptions import CORRUPTIONS, check_benchmark, corruption_table  # noqa: E402

RUNS = Path.home() / ".cache" / "advkit" / "recipes"
RECIPES = ("standard", "pgd", "trades", "mart")
SECTION = "corruptions"
SCRIPT = "corruptions.py"


def models(dataset: str, runs: Path, log) -> dict[str, torch.nn.Module]:
    out = {}
    for recipe in RECIPES:
        path = runs / f"{dataset}-{recipe}" / "model.safetensors"
        if not path.is_file():
            log(f"no {dataset}-{recipe} model at {path} (train it with: python "
                f"benchmarks/defenses.py --preset {dataset} --defenses {recipe}); skipped")
            continue
        out[recipe] = advkit.models.load(str(path)).eval()
    if "standard" not in out:
        raise SystemExit(f"the {dataset} standard model is the mCE baseline: train it first "
                         f"with python benchmarks/defenses.py --preset {dataset} "
                         "--defenses standard")
    return out


def measure(args: argparse.Namespace, dataset: str, log) -> list[dict]:
    x, y = advkit.data.load(dataset, split="test", limit=args.limit)
    rows, base = [], None
    for recipe, model in models(dataset, args.runs, log).items():
        t0 = time.perf_counter()
        table = corruption_table(model, x, y, seed=args.seed, benchmark=args.benchmark)
        seconds = time.perf_counter() - t0
        base = base or table  # standard comes first (RECIPES' order)
        per = {name: sum(table.accuracy[name]) / len(table.accuracy[name])
               for name in table.accuracy}
        # eq. 1 divides by the baseline's errors: a corruption the baseline never gets
        # wrong on these images has no CE, and the mCE is the mean over the others
        defined = [n for n in table.accuracy if sum(base.errors(n)) > 0]
        ce = {n: sum(table.errors(n)) / sum(base.errors(n)) for n in defined}
        rows.append({"dataset": dataset, "recipe": recipe, "clean": table.clean_accuracy,
                     "per": per, "worst": {n: table.accuracy[n][-1] for n in table.accuracy},
                     "mean_error": table.mean_error(), "mce": sum(ce.values()) / len(ce),
                     "undefined": sorted(set(table.accuracy) - set(defined)),
                     "seconds": seconds})
        log(f"{dataset} {recipe}: clean {table.clean_accuracy:.1%}, mean error "
            f"{table.mean_error():.1%}, mCE {rows[-1]['mce']:.3f} ({seconds:.0f} s)")
    return rows


def section(args: argparse.Namespace, rows: list[dict], started: float) -> str:
    begin, end = markers(SECTION, SCRIPT)
    names = list(CORRUPTIONS)
    lines = [
        begin,
        f"## Common corruptions: the presets' robustness table ({args.limit} test images)",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- date: {now()}",
        f"- device: {_device_name(torch.device('cpu'))}; torch threads "
        f"{torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, advkit "
        f"{advkit.__version__}, source {args.source}",
        f"- run time {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{args.load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        f"- `corruption_table(model, x, y, seed={args.seed}, benchmark={args.benchmark!r})` "
        "on the first test images of each dataset: every model sees the same corrupted "
        "images; models: the presets of `benchmarks/defenses.py` (stride_cnn; PGD, TRADES, "
        "MART at Linf 0.3 on MNIST, 0.1 on Fashion-MNIST), cached in "
        f"`{args.runs}`",
        "- cells: accuracy averaged over severities 1-5 (s5: severity 5 alone, in the last "
        "table); mean err: the unnormalised mean error over corruptions and severities; "
        "mCE: Hendrycks & Dietterich's eq. 1 with the dataset's standard model as the "
        "baseline (not AlexNet), so the standard row is 1.000 by construction",
        f"- one image is {100 / args.limit:.1f} points",
        *[f"- {r['dataset']}: the standard model makes no error under "
          f"{', '.join(r['undefined'])} on these images, so their CE is undefined and the "
          "mCE averages the other corruptions" for r in rows
          if r["recipe"] == "standard" and r["undefined"]],
        "",
        "| dataset | recipe | clean | " + " | ".join(names) + " | mean err | mCE |",
        "|---|---|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for r in rows:
        cells = " | ".join(f"{100 * r['per'][n]:.1f}" for n in names)
        lines.append(f"| {r['dataset']} | {r['recipe']} | {100 * r['clean']:.1f} | {cells} | "
                     f"{100 * r['mean_error']:.1f} | {r['mce']:.3f} |")
    lines += ["", "Severity 5 alone:", "",
              "| dataset | recipe | " + " | ".join(names) + " |",
              "|---|---|" + "---:|" * len(names)]
    for r in rows:
        cells = " | ".join(f"{100 * r['worst'][n]:.1f}" for n in names)
        lines.append(f"| {r['dataset']} | {r['recipe']} | {cells} |")
    lines.append(end)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"],
                        choices=["mnist", "fashion-mnist"])
    parser.add_argument("--limit", type=int, default=1000, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--benchmark", default="mnist-c",
                        help="whose severity constants (advkit.corruptions.BENCHMARKS): "
                             "MNIST-C's (Mu & Gilmer 2019), made for 28x28 digits; "
                             "CIFAR-10-C's noises cost an MNIST CNN nothing")
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error(f"--limit must be >= 1 (got {args.limit})")
    try:
        check_benchmark(args.benchmark)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    args.source, args.load_before = _source_state(), os.getloadavg()[0]
    started = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows = [row for dataset in args.datasets for row in measure(args, dataset, log)]
    write_section(args.out, SECTION, section(args, rows, started), SCRIPT)
    print(f"wrote the {SECTION} section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
