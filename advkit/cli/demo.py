"""``advkit demo``: the main job on the embedded default, offline (see :mod:`advkit.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advkit.cli._common import TABLE_KEYS, JsonOpt, console, fail, out, print_json, print_rows


def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="where the report goes")] = Path(
        "advkit-output/demo"),
    limit: Annotated[int, typer.Option(help="test images to attack")] = 1000,
    retrain: Annotated[bool, typer.Option(help="train anew even if a cached model exists")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train (or load) a small MNIST CNN, attack it with FGSM and PGD, write an HTML report."""
    from advkit.demo import run_demo
    try:
        summary = run_demo(out_dir, limit=limit, retrain=retrain, progress=not as_json,
                           log=(lambda _: None) if as_json else console.print)
    except (ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from err
    if as_json:
        print_json(summary)
    else:
        print_rows(summary["results"], f"MNIST small_cnn, {summary['n']} test images",
                   TABLE_KEYS)
        out.print(f"report: {summary['report']}")
