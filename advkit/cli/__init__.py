"""The ``advkit`` command: a thin shell over the Python API, one command per job.

Each job has its module (``attacks_list``, ``attack``, ``evaluate``, ``train``, ``defend``,
``certify``, ``demo``, ``report``, ``runs``, ``universal``, ``transfer``, ``serve``);
``_common`` holds what they share. This module only mounts them, in the order ``advkit
--help`` lists them.
"""

from __future__ import annotations

import sys

import typer

from advkit.cli import (
    attack,
    attacks_list,
    certify,
    defend,
    demo,
    evaluate,
    report,
    runs,
    serve,
    train,
    transfer,
    universal,
)
from advkit.cli._common import console, guard

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="advkit: attack, defend, certify and report adversarial robustness.")
app.command("attacks")(attacks_list.list_attacks)
app.command("attack")(attack.attack)
app.command("evaluate")(evaluate.evaluate)
app.command("train")(train.train_cmd)
app.command("defend")(defend.defend)
app.command("certify")(certify.certify)
app.command("demo")(demo.demo)
app.command("transfer")(transfer.transfer)
app.add_typer(universal.universal_app, name="universal")
app.add_typer(runs.runs_app, name="runs")
app.command("report")(report.report)
app.command("serve")(serve.serve)

# Every command, sub-commands included: a user's mistake is an `error:` line, not a traceback.
for _group in [app, *(g.typer_instance for g in app.registered_groups)]:
    for _info in _group.registered_commands:
        _info.callback = guard(_info.callback)


def main() -> None:
    """Entry point of the ``advkit`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
