"""``advkit transfer``: the transferability matrix of a set of models.

``advkit transfer -m a.safetensors -m b.safetensors -m lenet5.safetensors --attacks
fgsm,pgd,mifgsm --mea --html transfer.html`` crafts with each attack on each model and
judges on every model (success on the images the target classifies correctly); ``--mea``
adds Liu et al.'s ensemble attack on all models but the target. The table goes to stdout
(``--json`` for machines), the heat map to the HTML report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advkit.cli._common import (
    DatasetOpt,
    DeviceOpt,
    JsonOpt,
    TrustOpt,
    check_writable,
    fail,
    print_json,
    print_rows,
    resolve_device,
)


def _names(specs: list[str]) -> list[str]:
    """Short, distinct column names for the models: file stems, numbered where they clash."""
    stems = [Path(spec).stem if Path(spec).suffix else spec for spec in specs]
    return [stem if stems.count(stem) == 1 else f"{stem}#{i + 1}"
            for i, stem in enumerate(stems)]


def transfer(
    model: Annotated[list[str], typer.Option(
        "--model", "-m", help="a model (advkit checkpoint, .onnx, TorchScript, module:factory "
                              "or zoo name); repeat for each, at least two")],
    attacks: Annotated[str, typer.Option(
        help="white-box attacks crafting on each model, comma-separated registry names "
             "(default settings, early exit off)")] = "fgsm,pgd,mifgsm",
    mea: Annotated[bool, typer.Option(
        "--mea/--no-mea", help="add MEA on all models but the target (leave-one-out)")] = True,
    norm: Annotated[str, typer.Option(help="linf, l2 or l1")] = "linf",
    eps: Annotated[float, typer.Option(help="budget in [0, 1] pixel units")] = 0.3,
    dataset: DatasetOpt = "mnist",
    limit: Annotated[int, typer.Option(help="number of test images")] = 200,
    html: Annotated[Path | None, typer.Option(help="write the HTML report (heat map) here")
                    ] = None,
    trust: TrustOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Transferability matrix: success rate on each target of the examples crafted on each
    source, for each attack (white-box success on the diagonal)."""
    from advkit import data, models
    from advkit.attacks import MEA, get
    from advkit.attacks.transfer import white_box_attack
    from advkit.environment import describe
    from advkit.evaluation.transferability import transferability_matrix
    from advkit.models import fingerprint
    from advkit.threat import ThreatModel

    if len(model) < 2:
        raise fail("give at least two models (-m A -m B): a transfer needs a source and a "
                   "target")
    if html is not None:
        check_writable(html, "--html")
    try:
        threat = ThreatModel(norm, eps)
        device = resolve_device(device)
        names = _names(model)
        nets = {name: models.load(spec, trust=trust, map_location=device)
                for name, spec in zip(names, model, strict=True)}
        x, y = data.load(dataset, split="test", limit=limit)
        x, y = x.to(device), y.to(device)
        sources = {}
        for name in filter(None, (a.strip() for a in attacks.split(","))):
            cls = get(name)
            sources[cls.name] = (lambda t, n=name: white_box_attack(n, t, {}))
        ensembles = {"MEA": lambda t, ms: MEA(t, ms)} if mea else {}
        matrix = transferability_matrix(nets, x, y, threat, sources=sources,
                                        ensembles=ensembles)
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise fail(str(err)) from err
    rows = matrix.rows()
    if as_json:
        print_json({**matrix.to_dict(), "models": dict(zip(names, model, strict=True)),
                    "fingerprints": {n: fingerprint(m) for n, m in nets.items()},
                    "data": {"dataset": dataset, "split": "test", "first": len(x)},
                    "environment": describe(device)})
    else:
        print_rows([{k: (f"{v:.1%}" if k in names or k == "transfer_rate" else v)
                     for k, v in row.items()} for row in rows],
                   f"transfer ({dataset} test, {len(x)} images, {norm} eps {eps:g})")
    if html is not None:
        _write_html(html, matrix, names, model, nets, dataset, len(x), device)


def _write_html(path: Path, matrix, names, specs, nets, dataset: str, n: int,
                device: str) -> None:
    from advkit.environment import describe
    from advkit.models import fingerprint
    from advkit.report.html import write_html_report
    from advkit.report.images import heatmap_svg

    rows = matrix.rows()
    labels = [f"{r['attack']} on {r['source']}" for r in rows]
    svg = heatmap_svg(labels, names, [[r[t] for t in names] for r in rows],
                      xlabel="target model", ylabel="attack on source model")
    caption = (f"Success rate on each target (column) of the examples crafted on each source "
               f"(row), {matrix.threat.norm} eps {matrix.threat.eps:g}, on the test images the "
               "target classifies correctly; the diagonal is the white-box success.")
    summary = [{"attack": r["attack"], "source": r["source"],
                **{f"{t} rate": r[t] for t in names},
                "transfer_rate": r["transfer_rate"], "seconds": r["seconds"]} for r in rows]
    environment = {**describe(device), "dataset": f"{dataset} test[:{n}]",
                   **{f"model {name}": f"{spec} ({fingerprint(nets[name])})"
                      for name, spec in zip(names, specs, strict=True)},
                   **{f"correct on {t}": matrix.correct[t] for t in names}}
    write_html_report(path, title="Transferability matrix", summary=summary, curves={},
                      gallery=[], environment=environment,
                      figures=[("Transferability heat map", svg, caption)])
