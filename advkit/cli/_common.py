"""What the commands share: the consoles, the option types, the one error exit, table and
JSON output, device choice, model and data loading, and the provenance of a result."""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from advkit.evaluation import finite_or_none

#: Messages, progress and errors go to stderr; results to stdout.
console = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="advkit checkpoint, .onnx, TorchScript, module:factory, or zoo name")]
DatasetOpt = Annotated[str, typer.Option(help="mnist, fashion-mnist, cifar10, ...")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
TrustOpt = Annotated[bool, typer.Option("--trust", help="allow unpickling the model file "
                                                         "(only for files you trust)")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... or auto (cuda if present)")]
StoreOpt = Annotated[Path, typer.Option("--store", help="the SQLite result store")]

#: The columns of an attack's result table (`advkit attack`, `advkit evaluate`, the demo).
TABLE_KEYS = ["attack", "norm", "eps", "clean_acc", "robust_acc", "success_rate",
              "median_norm", "mean_norm", "images_per_s"]


def fail(message: str) -> typer.Exit:
    """The exit of a command that cannot go on: the message on stderr, status 2.

    Raise what it returns (``raise fail(...) from err``) so that the caller's control flow
    shows that the command ends there.
    """
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(2)


def print_json(obj: object) -> None:
    out.print_json(json.dumps(obj, default=finite_or_none))


def _fmt(key: str, value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if key.endswith("acc") or key.endswith("rate"):
            return f"{value:.1%}"
        return f"{value:.4g}"
    return str(value)


def print_rows(rows: list[dict], title: str, keys: list[str] | None = None) -> None:
    keys = keys or list(rows[0])
    # A light frame: more of the width goes to the figures.
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for k in keys:
        # Fold what does not fit (an 80-column pipe, a narrow terminal) instead of
        # truncating it to "…": a cut number is a wrong number.
        table.add_column(k.replace("_", " "), justify="left" if k == "attack" else "right",
                         overflow="fold")
    for row in rows:
        table.add_row(*(_fmt(k, row[k]) for k in keys))
    out.print(table)


def resolve_device(name: str) -> str:
    """``name``, with ``auto`` read as cuda where a GPU is present and cpu otherwise; a
    device torch does not know, or a GPU this machine lacks, is an error now."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise fail(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from err
    if device.type == "cuda" and (not torch.cuda.is_available() or (
            device.index is not None and device.index >= torch.cuda.device_count())):
        raise fail(f"--device {name}: this machine has no such CUDA device; use --device cpu "
                   "(or auto)")
    if device.type not in ("cpu", "cuda"):
        raise fail(f"--device {name}: advkit runs on cpu or cuda")
    return name


def check_writable(path: Path, what: str) -> None:
    """Fail now, before any long work, if ``path`` cannot be written (its folder is made
    if missing): a bad output path must not cost a finished attack or training run."""
    folder = path if what.endswith("folder") else path.parent
    try:
        if path.is_dir() and not what.endswith("folder"):
            raise IsADirectoryError(f"{path} is a directory")
        folder.mkdir(parents=True, exist_ok=True)
        # A real file, not os.access: access() says yes to root on a read-only mount.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".advkit-probe-"):
            pass
    except OSError as err:
        raise fail(f"cannot write the {what} {path}: {err.strerror or err}") from err


#: What a command's user can cause and fix: reported as one ``error:`` line with status 2.
#: Anything else is a bug in advkit and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError,
                                                 sqlite3.DatabaseError)


def guard(command: Callable[..., object]) -> Callable[..., object]:
    """``command`` with the errors its user can fix turned into ``error:`` lines (exit 2)."""
    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as err:
            raise fail(str(err) or type(err).__name__) from err
    return run


def load_model_and_data(model: str, dataset: str, split: str, limit: int | None, trust: bool,
                        device: str):
    from advkit import data, models
    net = models.load(model, trust=trust, map_location=device)
    x, y = data.load(dataset, split=split, limit=limit)
    return net, x, y


def provenance(net, model: str, dataset: str, split: str, n: int, device: str) -> dict:
    """What a result was produced with (DESIGN.md, principle 4)."""
    from advkit.environment import describe
    from advkit.models import fingerprint
    return {"model": model, "model_fingerprint": fingerprint(net),
            "data": {"dataset": dataset, "split": split, "first": n},
            "environment": describe(device)}
