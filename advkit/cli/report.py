"""``advkit report RUN``: a self-contained HTML report of a stored evaluation run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from advkit.cli._common import JsonOpt, StoreOpt, console, fail
from advkit.evaluation import DEFAULT_STORE


def report(run: Annotated[int, typer.Argument(help="run id (see `advkit runs`)")],
           out: Annotated[Path | None, typer.Option(
               help="HTML file (default advkit-output/run-RUN.html)")] = None,
           store: StoreOpt = DEFAULT_STORE,
           as_json: JsonOpt = False) -> None:
    """Write a self-contained HTML report of a stored evaluation run (and its JSON twin)."""
    from advkit.report.evaluation import write_run_report
    if not store.exists():
        raise fail(f"no store at {store}; pass --store")
    out = out or Path("advkit-output") / f"run-{run}.html"
    try:
        html, js = write_run_report(store, run, out)
    except ValueError as err:
        raise fail(str(err)) from err
    # An unfinished run's report opens with a warning; the terminal gets the same words.
    banner = json.loads(js.read_text())["banner"]
    if as_json:
        print(json.dumps({"html": str(html), "json": str(js), "banner": banner}))
    else:
        if banner:
            console.print(f"[bold red]warning:[/] {banner}")
        print(f"report: {html}")
