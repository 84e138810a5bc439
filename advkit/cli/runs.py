"""``advkit runs``: list the evaluation runs of a result store; ``advkit runs export RUN
--format csv`` writes the per-sample table (or the whole run as JSON).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from advkit.cli._common import JsonOpt, StoreOpt, fail
from advkit.evaluation import DEFAULT_STORE

runs_app = typer.Typer(add_completion=False, invoke_without_command=True,
                       help="List the evaluation runs of a store; export one.")


@runs_app.callback()
def runs(ctx: typer.Context, store: StoreOpt = DEFAULT_STORE,
         as_json: JsonOpt = False) -> None:
    """List the runs in a store (id, status: done, running or unfinished, suite, model, data,
    robust accuracy: for an unfinished run, bounds and the count of unknown images)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from advkit.evaluation import Store, read_report
    if not store.exists():
        raise fail(f"no store at {store}; run `advkit evaluate --suite ...` first or pass "
                   "--store")
    try:
        with Store(store, read_only=True) as db:
            rows = []
            for run in db.runs():
                c, state = run["config"], db.state(run["id"])
                # A finished run's summary is stored; an unfinished one is read from its
                # samples, so that what it has not settled shows as unknown, never robust.
                s = (run["summary"] or {}) if state == "done" else \
                    read_report(db, run["id"]).summary()
                robust = s.get("robust_accuracy")
                rows.append({
                    "run": run["id"], "status": state, "created": run["created"],
                    "suite": c["suite"]["name"], "model": c["model"].get("spec", "(python)"),
                    "data": c["data"].get("dataset", "(python)"), "n": c["n"],
                    "norm": c["threat"]["norm"], "eps": c["threat"]["eps"],
                    "clean_accuracy": s.get("clean_accuracy"), "robust_accuracy": robust,
                    "robust_accuracy_bounds": s.get("robust_accuracy_bounds", [robust, robust]),
                    "unknown": s.get("unknown", 0), "reliable": s.get("reliable")})
    except ValueError as err:
        raise fail(str(err)) from err
    if as_json:
        print(json.dumps(rows, indent=2, default=_json_value))
        return
    # Short headers, one threat column and no vertical rules: readable in 80 columns.
    table = Table(title=f"runs in {store}", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    shown = {"run": "run", "status": "status", "suite": "suite", "model": "model",
             "data": "data", "n": "n", "threat": "threat", "clean_accuracy": "clean",
             "robust_accuracy": "robust", "reliable": "reliable"}
    for key, header in shown.items():
        table.add_column(header, no_wrap=key in ("status", "robust_accuracy"),
                         min_width={"status": 10, "robust_accuracy": 6}.get(key))
    for row in rows:
        table.add_row(*(_cell(k, row) for k in shown))
    Console().print(table)


@runs_app.command("export")
def export(run: Annotated[int, typer.Argument(help="run id (see `advkit runs`)")],
           fmt: Annotated[str, typer.Option("--format", help="csv (per sample) or json")] = "csv",
           out: Annotated[Path | None, typer.Option(help="file (default: stdout)")] = None,
           store: StoreOpt = DEFAULT_STORE) -> None:
    """Export a run: the per-sample table as CSV, or everything as JSON."""
    from advkit.evaluation import Store
    if not store.exists():
        raise fail(f"no store at {store}")
    try:
        with Store(store, read_only=True) as db:
            text = db.export(run, fmt)
    except ValueError as err:
        raise fail(str(err)) from err
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)


def _json_value(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _cell(key: str, row: dict) -> str:
    if key == "threat":
        return f"{row['norm']} {row['eps']:g}"
    value = row[key]
    if key == "status" and value != "done":
        return f"[bold red]{value}[/]"
    if key == "robust_accuracy" and row["unknown"]:
        low, high = row["robust_accuracy_bounds"]
        return f"{low:.1%}-{high:.1%}\n{row['unknown']} unknown"
    if value is None:
        return "-"
    if isinstance(value, float) and key.endswith("accuracy"):
        return f"{value:.1%}"
    if key == "reliable":
        return "yes" if value else "[bold red]NO[/]"
    return f"{value:g}" if isinstance(value, float) else str(value)
