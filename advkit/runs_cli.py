"""The evaluation engine on the command line: ``advkit evaluate --suite``, ``advkit runs``
and ``advkit report RUN``.

- ``advkit evaluate --suite standard --model M --eps 0.3 [--store F] [--json]`` runs a
  suite and records it in the store (``advkit-output/runs.sqlite`` by default);
  ``advkit evaluate --resume RUN`` continues an interrupted run (model and data are
  reloaded from the run's record).
- ``advkit runs`` lists the runs of a store; ``advkit runs export RUN --format csv``
  writes the per-sample table (or the whole run as JSON).
- ``advkit report RUN`` writes a self-contained HTML report of a stored run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

StoreOpt = Annotated[Path, typer.Option("--store", help="the SQLite result store")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]

runs_app = typer.Typer(add_completion=False, invoke_without_command=True,
                       help="List the evaluation runs of a store; export one.")


def evaluate_suite(*, model: str, suite: str, norm: str, eps: float, dataset: str, limit: int,
                   batch_size: int, seed: int, store: Path, resume: int | None, checks: bool,
                   check_samples: int, trust: bool, device: str, quiet: bool, log) -> dict:
    """Run (or resume) one suite evaluation; return its JSON summary."""
    from advkit import data, models
    from advkit.evaluation import Store, evaluate
    from advkit.threat import ThreatModel

    if resume is not None:
        with Store(store) as db:
            config = db.run(resume)["config"]
        if not config.get("model") or not config.get("data"):
            raise ValueError(f"run {resume} was made from Python, not the command line: resume "
                             "it with advkit.evaluate(..., resume=RUN)")
        model, dataset = config["model"]["spec"], config["data"]["dataset"]
        limit, split = config["data"]["limit"], config["data"]["split"]
        threat = ThreatModel(config["threat"]["norm"], config["threat"]["eps"],
                             tuple(config["threat"]["bounds"]))
        suite_arg: object = config["suite"]
        seed, batch_size = config["seed"], config["batch_size"]
        checks, check_samples = config["checks"], config["check_samples"]
    else:
        threat, split, suite_arg = ThreatModel(norm, eps), "test", suite
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        import torch
        torch.cuda.set_device(device)
    net = models.load(model, trust=trust, map_location=device)
    x, y = data.load(dataset, split=split, limit=limit)
    if isinstance(suite_arg, dict):
        from advkit.evaluation import Suite
        suite_arg = Suite.from_dict(suite_arg)
    report = evaluate(net, x, y, threat, suite_arg, seed=seed, batch_size=batch_size,
                      store=store, resume=resume, checks=checks, check_samples=check_samples,
                      device=device, progress=not quiet, log=log,
                      describe_model={"spec": model},
                      describe_data={"dataset": dataset, "split": split, "limit": limit})
    return {**report.summary(), "store": str(store), "chunks_run": report.chunks_run,
            "stages": report.stages, "checks": [c.to_dict() for c in report.checks]}


def print_report_tables(summary: dict, out) -> None:
    from rich.table import Table
    flag = "" if summary["reliable"] else "  [bold red]UNRELIABLE: a masking check failed[/]"
    table = Table(title=f"run {summary['run']}: {summary['suite']} suite, {summary['norm']} "
                        f"eps={summary['eps']:g}, {summary['n']} images{flag}")
    for col in ("stage", "attack", "attacked", "broken", "robust acc after", "seconds"):
        table.add_column(col, justify="left" if col in ("stage", "attack") else "right")
    table.add_row("clean", "-", str(summary["n"]), "-", f"{summary['clean_accuracy']:.1%}", "-")
    for s in summary["stages"]:
        table.add_row(s["stage"], s["attack"], str(s["attacked"]), str(s["broken"]),
                      f"{s['robust_acc_after']:.1%}", f"{s['seconds']:.1f}")
    out.print(table)
    checks = Table(title="checks")
    for col in ("check", "status", "explanation"):
        checks.add_column(col)
    colour = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
    for c in summary["checks"]:
        checks.add_row(c["name"], f"[{colour[c['status']]}]{c['status']}[/]", c["message"])
    out.print(checks)
    out.print(f"robust accuracy {summary['robust_accuracy']:.1%}"
              + ("" if summary["reliable"] else " (UNRELIABLE)") + f" - stored as run "
              f"{summary['run']} in {summary['store']}")


@runs_app.callback()
def runs(ctx: typer.Context, store: StoreOpt = Path("advkit-output/runs.sqlite"),
         as_json: JsonOpt = False) -> None:
    """List the runs in a store (id, status, suite, model, data, robust accuracy)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from advkit.evaluation import Store
    if not store.exists():
        raise _fail(f"no store at {store}; run `advkit evaluate --suite ...` first or pass "
                    "--store")
    try:
        with Store(store) as db:
            rows = []
            for run in db.runs():
                c, s = run["config"], run["summary"] or {}
                rows.append({
                    "run": run["id"], "status": run["status"], "created": run["created"],
                    "suite": c["suite"]["name"], "model": c["model"].get("spec", "(python)"),
                    "data": c["data"].get("dataset", "(python)"), "n": c["n"],
                    "norm": c["threat"]["norm"], "eps": c["threat"]["eps"],
                    "clean_accuracy": s.get("clean_accuracy"),
                    "robust_accuracy": s.get("robust_accuracy"), "reliable": s.get("reliable")})
    except ValueError as err:
        raise _fail(str(err)) from err
    if as_json:
        print(json.dumps(rows, indent=2, default=_json_value))
        return
    table = Table(title=f"runs in {store}")
    shown = ["run", "status", "suite", "model", "data", "n", "norm", "eps", "clean_accuracy",
             "robust_accuracy", "reliable"]
    for key in shown:
        table.add_column(key.replace("_", " "))
    for row in rows:
        table.add_row(*(_cell(k, row[k]) for k in shown))
    Console().print(table)


@runs_app.command("export")
def export(run: Annotated[int, typer.Argument(help="run id (see `advkit runs`)")],
           fmt: Annotated[str, typer.Option("--format", help="csv (per sample) or json")] = "csv",
           out: Annotated[Path | None, typer.Option(help="file (default: stdout)")] = None,
           store: StoreOpt = Path("advkit-output/runs.sqlite")) -> None:
    """Export a run: the per-sample table as CSV, or everything as JSON."""
    from advkit.evaluation import Store
    if not store.exists():
        raise _fail(f"no store at {store}")
    try:
        with Store(store) as db:
            text = db.export(run, fmt)
    except ValueError as err:
        raise _fail(str(err)) from err
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)


def report(run: Annotated[int, typer.Argument(help="run id (see `advkit runs`)")],
           out: Annotated[Path | None, typer.Option(
               help="HTML file (default advkit-output/run-RUN.html)")] = None,
           store: StoreOpt = Path("advkit-output/runs.sqlite"),
           as_json: JsonOpt = False) -> None:
    """Write a self-contained HTML report of a stored evaluation run (and its JSON twin)."""
    from advkit.report.evaluation import write_run_report
    if not store.exists():
        raise _fail(f"no store at {store}; pass --store")
    out = out or Path("advkit-output") / f"run-{run}.html"
    try:
        html, js = write_run_report(store, run, out)
    except ValueError as err:
        raise _fail(str(err)) from err
    if as_json:
        print(json.dumps({"html": str(html), "json": str(js)}))
    else:
        print(f"report: {html}")


def _fail(message: str) -> typer.Exit:
    from rich.console import Console
    Console(stderr=True).print(f"[bold red]error:[/] {message}")
    return typer.Exit(2)


def _json_value(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and key.endswith("accuracy"):
        return f"{value:.1%}"
    if key == "reliable":
        return "yes" if value else "[bold red]NO[/]"
    return f"{value:g}" if isinstance(value, float) else str(value)
