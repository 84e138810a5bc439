"""``advkit defend``: build a pipeline file's reactive defenses around a model, fit them, and
measure them: clean accuracy, false rejection, and per attack (non-adaptive ones crafted on
the bare model, and the adaptive suite against the pipeline) robust accuracy, detection
AUROC, true-positive rate and Tramer's sanity check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from advkit.cli._common import (
    DatasetOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    TrustOpt,
    console,
    fail,
    load_model_and_data,
    print_json,
    print_rows,
    provenance,
    resolve_device,
)


def defend(
    pipeline: Annotated[Path, typer.Option(
        help="the pipeline file (.toml/.json): transforms and detectors with their options "
             "(see advkit.defenses.spec)")],
    model: ModelOpt = "small_cnn",
    dataset: DatasetOpt = "mnist",
    norm: Annotated[str, typer.Option(help="linf or l2")] = "linf",
    eps: Annotated[float, typer.Option(help="the attacks' budget")] = 0.3,
    limit: Annotated[int, typer.Option(help="test images measured")] = 200,
    attacks: Annotated[list[str], typer.Option(
        "--attack", help="repeatable: fgsm, pgd, cw (crafted on the bare model: the "
                         "non-adaptive figures) and adaptive (the adaptive suite against "
                         "the pipeline)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the attacks")] = 0,
    trust: TrustOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Fit a pipeline file's transforms and detectors around a model and measure them against
    non-adaptive attacks and the adaptive suite (the figures of a reactive defense)."""
    from advkit.cli.evaluate import protect
    from advkit.defenses.measure import (
        SOTA_ROBUST_ACCURACY,
        adaptive_examples,
        measure_protection,
        oblivious_examples,
    )
    from advkit.threat import ThreatModel

    names = attacks or ["fgsm", "pgd", "adaptive"]
    for name in names:
        if name not in ("fgsm", "pgd", "cw", "adaptive"):
            raise fail(f"unknown --attack {name!r}: use fgsm, pgd, cw or adaptive")
    log = (lambda _: None) if as_json else console.print
    try:
        threat = ThreatModel(norm, eps)
        device = resolve_device(device)
        net, x, y = load_model_and_data(model, dataset, "test", limit, trust, device)
        pipe = protect(net, pipeline, dataset, norm, eps, device, log)
        crafted = {}
        oblivious = [n for n in names if n != "adaptive"]
        if oblivious:
            log(f"crafting {', '.join(oblivious)} on the bare model ({len(x)} images)")
            crafted.update({n: adv for n, (adv, _) in oblivious_examples(
                net, x, y, threat, attacks=oblivious, seed=seed).items()})
        if "adaptive" in names:
            log(f"running the adaptive suite against the pipeline ({len(x)} images)")
            crafted["adaptive"] = adaptive_examples(pipe, x, y, threat, seed=seed)
        reference = SOTA_ROBUST_ACCURACY.get((dataset.replace("_", "-"), norm, eps / 2))
        rows = [r.to_dict() for r in measure_protection(pipe, x, y, crafted,
                                                         reference=reference)]
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise fail(str(err)) from err
    components = [{"component": type(t).__name__, "role": "transform",
                   "adaptive": str(getattr(t, "adaptive", "differentiable")),
                   "threshold": None, "held_out_fpr": None} for t in pipe.transforms]
    components += [{"component": d.name, "role": "detector", "adaptive": "orthogonal PGD",
                    "threshold": d.threshold, "held_out_fpr": d.held_out_fpr}
                   for d in pipe.detectors]
    if as_json:
        print_json({**provenance(net, model, dataset, "test", len(x), device),
                    "pipeline": str(pipeline), "norm": norm, "eps": eps,
                    "components": components, "results": rows})
        return
    print_rows(components, f"pipeline {pipeline}")
    def pct(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.1%}"

    table = [{"attack": r["attack"], "clean": pct(r["clean_accuracy"]),
              "false rej": pct(r["false_rejection"]), "robust": pct(r["robust_accuracy"]),
              "detected": pct(r["detected"]), "correct": pct(r["correct_accepted"]),
              "auroc": "-" if math.isnan(r["auroc"]) else f"{r['auroc']:.3f}",
              "tpr": pct(r["tpr"]), "tramer": "FLAG" if r["tramer_flag"] else "-"}
             for r in rows]
    print_rows(table, f"{model} behind {pipeline.name} on {dataset} ({len(x)} test images, "
                      f"{norm} eps {eps:g})")
    if "adaptive" not in names:
        console.print("[bold yellow]warning:[/] only non-adaptive attacks were run: their "
                      "figures are upper bounds (add --attack adaptive)")
