"""Defense figures: train every recipe of a shipped preset, evaluate each with a suite.

    python benchmarks/defenses.py --preset mnist                  # every recipe
    python benchmarks/defenses.py --preset mnist --defenses pgd trades --limit 1000
    python benchmarks/defenses.py --preset fashion-mnist --limit 500

Each recipe trains exactly as ``advkit train --defense NAME --preset PRESET`` does
(``advkit.training.presets``), in ``--runs/PRESET-NAME``: a finished run there
with the same settings is reused, an interrupted one resumes, so the training
seconds reported are the trainer's own record (summed over resumed pieces, the
per-epoch held-out PGD check included). ``--lipschitz`` adds standard training
with spectrally normalised layers. Every model is then evaluated on the first
``--limit`` test images with ``--suite`` (default ``standard``: APGD-CE, APGD-T,
FAB-T, Square as AutoAttack publishes them) and the masking checks; the row is kept in
the run's ``evaluation.json`` and reused by a later run that asks for the same
evaluation of the same weights (the section lists such rows with their dates). The
section ``Defenses, PRESET`` of RESULTS.md is rewritten with the table.
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
from kept import keep, now, reuse  # noqa: E402

import advkit  # noqa: E402
from advkit.models import read_metadata  # noqa: E402
from advkit.threat import ThreatModel  # noqa: E402
from advkit.training import PRESETS, get_preset, resolve, train_defense  # noqa: E402

DEFAULT_RUNS = Path.home() / ".cache" / "advkit" / "recipes"


def measure(args: argparse.Namespace, defense: str, lipschitz: bool) -> dict:
    preset = get_preset(args.preset)
    settings = resolve(defense, args.preset, {"seed": args.seed,
                                              "lipschitz": True if lipschitz else None})
    name = defense + ("-lipschitz" if lipschitz else "")
    run_dir = args.runs / f"{args.preset}-{name}"
    log = lambda msg: print(f"[{name}] {msg}", flush=True)  # noqa: E731
    result = train_defense(defense, settings, run_dir, progress=False, log=log)
    metadata = read_metadata(result.checkpoint)
    metrics = metadata.get("metrics", {})
    # An evaluation of these very weights with the same suite, images and checks is reused
    # (rerunning the benchmark to add one recipe should not re-attack the others); the
    # section says which rows were measured in an earlier run, and when.
    key = {"fingerprint": metadata.get("fingerprint"), "suite": args.suite,
           "limit": args.limit, "check_samples": args.check_samples, "norm": preset.norm,
           "eps": preset.eps}
    cache = run_dir / "evaluation.json"
    if (kept_row := reuse(cache, key, log)) is not None:
        return kept_row
    x, y = advkit.data.load(preset.dataset, split="test", limit=args.limit)
    threat = ThreatModel(preset.norm, preset.eps)
    t0 = time.perf_counter()
    report = advkit.evaluate(result.model, x, y, threat, args.suite, progress=False,
                             check_samples=min(args.check_samples, args.limit), log=log)
    failed = [c.name for c in report.checks if c.status == "fail"]
    shown = {k: v for k, v in settings.items()
             if k not in ("dataset", "norm", "eps", "seed", "batch_size", "lr")}
    row = {
        "defense": name, "settings": ", ".join(f"{k}={v}" for k, v in shown.items()),
        "train_minutes": result.seconds / 60, "epochs": len(result.history),
        "threads": metrics.get("torch_threads"), "clean": report.clean_accuracy,
        "robust": report.robust_accuracy, "eval_seconds": time.perf_counter() - t0,
        "eval_threads": torch.get_num_threads(),
        "checks": "all pass" if not failed else "FAIL " + ", ".join(failed) + " (unreliable)",
        "stopped": metadata.get("stopped", ""),
        "measured": f"{now()}, source {args.source}",
    }
    return keep(cache, key, row)



def section(args: argparse.Namespace, rows: list[dict], started: float, planned: int) -> str:
    preset = get_preset(args.preset)
    begin, end = markers(args.preset, "defenses.py")
    reused = [r for r in rows if r.get("reused")]
    lines = [
        begin,
        f"## Defenses, {preset.description}: `{args.suite}` suite on {args.limit} test images",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- date: {now()}",
        f"- device: {_device_name(torch.device('cpu'))}; evaluation torch threads "
        f"{torch.get_num_threads()}",
        f"- data: {preset.dataset} test[:{args.limit}]" + (
            f" from ADVKIT_DATA_DIR={os.environ['ADVKIT_DATA_DIR']}"
            if os.environ.get("ADVKIT_DATA_DIR") else ""),
        f"- python {platform.python_version()}, torch {torch.__version__}, advkit "
        f"{advkit.__version__}, source {args.source}",
        f"- run time {time.perf_counter() - started:.0f} s (reused trainings and evaluations "
        f"take none); 1-minute load average {args.load_before:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end",
        "- train min: the trainer's own wall-clock record of the run (per-epoch held-out "
        "checks included); threads: torch threads it trained with",
        "",
        *([f"- **partial**: {len(rows)} of the {planned} recipes of this run measured so far",
           ""] if len(rows) < planned else []),
        *(["- evaluations reused from earlier runs of this script (same weights, suite, "
           "images and checks; cached in the run's evaluation.json): " + "; ".join(
               f"{r['defense']} ({r.get('measured', '?')})" for r in reused), ""]
          if reused else []),
        "| defense | settings | train min | threads | clean | robust | checks | eval s |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        stopped = f" (stopped early: {r['stopped']})" if r["stopped"] else ""
        lines.append(f"| {r['defense']} | {r['settings']}{stopped} | {r['train_minutes']:.1f} | "
                     f"{r['threads'] or '?'} | {r['clean']:.1%} | {r['robust']:.1%} | "
                     f"{r['checks']} | {r['eval_seconds']:.0f} |")
    lines.append(end)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="mnist", help="mnist or fashion-mnist")
    parser.add_argument("--defenses", nargs="+", default=None,
                        help="recipes to train and measure (default: all of the preset's)")
    parser.add_argument("--lipschitz", action="store_true",
                        help="also standard training with spectrally normalised layers")
    parser.add_argument("--suite", default="standard")
    parser.add_argument("--limit", type=int, default=1000, help="test images evaluated")
    parser.add_argument("--check-samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS,
                        help="training runs live here (reused when finished)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    args.preset = next(k for k, v in PRESETS.items() if v is preset)
    defenses = args.defenses or list(preset.defenses)
    for d in defenses:
        preset.settings(d)  # an unknown recipe fails here, before hours of training
    args.load_before = os.getloadavg()[0]
    args.source = _source_state()  # at the start: the code the run imported
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    planned = [(d, False) for d in defenses] + ([("standard", True)] if args.lipschitz else [])
    rows: list[dict] = []
    for defense, lipschitz in planned:
        rows.append(measure(args, defense, lipschitz))
        # written after every recipe: an interrupted run keeps what it measured
        write_section(args.out, args.preset, section(args, rows, started, len(planned)),
                      "defenses.py")
        print(f"wrote the defenses {args.preset} section of {args.out} "
              f"({len(rows)} of {len(planned)} recipes)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
