"""The ``advkit`` command: a thin shell over the Python API, one command per job."""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from advkit import attacks as attack_lib
from advkit.card import card_path
from advkit.evaluation import curve_rows, curves, finite_or_none, run_attack, table_rows
from advkit.threat import ThreatModel

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="advkit: attack, defend, certify and report adversarial robustness.")
console = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="advkit checkpoint, .onnx, TorchScript, module:factory, or zoo name")]
DatasetOpt = Annotated[str, typer.Option(help="mnist, fashion-mnist, cifar10, ...")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
TrustOpt = Annotated[bool, typer.Option("--trust", help="allow unpickling the model file "
                                                         "(only for files you trust)")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... or auto (cuda if present)")]


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(2)


def _print_json(obj: object) -> None:
    out.print_json(json.dumps(obj, default=finite_or_none))


def _fmt(key: str, value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if key.endswith("acc") or key.endswith("rate"):
            return f"{value:.1%}"
        return f"{value:.4g}"
    return str(value)


def _print_rows(rows: list[dict], title: str, keys: list[str] | None = None) -> None:
    keys = keys or list(rows[0])
    table = Table(title=title)
    for k in keys:
        table.add_column(k.replace("_", " "), justify="left" if k == "attack" else "right")
    for row in rows:
        table.add_row(*(_fmt(k, row[k]) for k in keys))
    out.print(table)


TABLE_KEYS = ["attack", "norm", "eps", "clean_acc", "robust_acc", "success_rate",
              "median_norm", "mean_norm", "images_per_s"]


@app.command("attacks")
def list_attacks(as_json: JsonOpt = False) -> None:
    """List every attack with its taxonomy tags, norms and paper."""
    rows = []
    for _, cls in sorted(attack_lib.REGISTRY.items()):
        tags = cls.taxonomy
        rows.append({"attack": cls.__name__, "kind": cls.kind, "norms": ",".join(cls.norms),
                     "falsification": tags.falsification, "knowledge": tags.knowledge,
                     "specificity": tags.specificity, "frequency": tags.frequency,
                     "scope": tags.scope, "perturbation": tags.perturbation,
                     "paper": cls.paper})
    if as_json:
        _print_json(rows)
    else:
        _print_rows(rows, "advkit attacks")


def _options_for(classes: list[type[attack_lib.Attack]],
                 options: dict[str, object]) -> list[dict[str, object]]:
    """Each given option goes to the attacks that take it; one none of them takes is an
    error (a typo, or the wrong attack)."""
    accepted = [inspect.signature(cls.__init__).parameters for cls in classes]
    given = {k: v for k, v in options.items() if v is not None}
    unused = [k for k in given if not any(k in params for params in accepted)]
    if unused:
        shown = list(dict.fromkeys(cls.__name__ for cls in classes))
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ValueError(f"{', '.join(shown)} take{'s' if len(shown) == 1 else ''} "
                         f"no option {flags}")
    return [{k: v for k, v in given.items() if k in params} for params in accepted]


def _build_attacks(names: list[str], norm: str, eps_list: list[float],
                   **options: object) -> list[attack_lib.Attack]:
    """One budgeted attack per name and eps; one uncapped run per minimal-norm attack
    (its curve gives every eps)."""
    classes = [attack_lib.get(name) for name in names]
    return [cls(ThreatModel(norm=norm, eps=eps), **opts)
            for cls, opts in zip(classes, _options_for(classes, options), strict=True)
            for eps in ([math.inf] if cls.kind == "minimal" else eps_list)]


def _build_attack(name: str, norm: str, eps: float | None,
                  **options: object) -> attack_lib.Attack:
    """One attack; no eps means 0.3 for a budgeted attack and no cap for a minimal-norm one."""
    cls = attack_lib.get(name)
    if eps is None:
        eps = math.inf if cls.kind == "minimal" else 0.3
    return cls(ThreatModel(norm=norm, eps=eps), **_options_for([cls], options)[0])


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_model_and_data(model: str, dataset: str, split: str, limit: int | None, trust: bool,
                         device: str):
    from advkit import data, models
    net = models.load(model, trust=trust, map_location=device)
    x, y = data.load(dataset, split=split, limit=limit)
    return net, x, y


def _provenance(net, model: str, dataset: str, split: str, n: int, device: str) -> dict:
    """What a result was produced with (DESIGN.md, principle 4)."""
    from advkit.environment import describe
    from advkit.models import fingerprint
    return {"model": model, "model_fingerprint": fingerprint(net),
            "data": {"dataset": dataset, "split": split, "first": n},
            "environment": describe(device)}


@app.command()
def attack(
    model: ModelOpt = "small_cnn",
    attack_name: Annotated[str, typer.Option("--attack", "-a",
                                             help="see `advkit attacks`")] = "pgd",
    norm: Annotated[str, typer.Option(help="linf, l2 or l1")] = "linf",
    eps: Annotated[float | None, typer.Option(
        help="budget in [0, 1] pixel units (default 0.3; minimal-norm attacks: a cap, "
             "none by default)")] = None,
    steps: Annotated[int | None, typer.Option(help="iterations")] = None,
    step_size: Annotated[float | None, typer.Option(help="step length")] = None,
    restarts: Annotated[int | None, typer.Option(help="random restarts (PGD, APGD)")] = None,
    n_queries: Annotated[int | None, typer.Option(help="query budget (Square)")] = None,
    loss: Annotated[str | None, typer.Option(help="ce or margin")] = None,
    target: Annotated[int | None, typer.Option(help="targeted: this class for all")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    dataset: DatasetOpt = "mnist",
    split: Annotated[str, typer.Option(help="train or test")] = "test",
    limit: Annotated[int, typer.Option(help="number of images")] = 1000,
    batch_size: Annotated[int, typer.Option(help="images per batch")] = 500,
    save: Annotated[Path | None, typer.Option(help="write x_adv, y, success, norms (.npz)")] = None,
    trust: TrustOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Run one attack on a model and a data slice; print the result (optionally save x_adv)."""
    import numpy as np
    import torch

    from advkit.evaluation import accuracy
    try:
        atk = _build_attack(attack_name, norm, eps, steps=steps, step_size=step_size,
                            restarts=restarts, n_queries=n_queries, loss=loss, seed=seed)
        device = _device(device)
        net, x, y = _load_model_and_data(model, dataset, split, limit, trust, device)
        targets = None
        if target is not None:
            keep = y != target
            x, y = x[keep], y[keep]
            targets = torch.full_like(y, target)
        clean = accuracy(net, x, y, device=device)
        result = run_attack(atk, net, x, y, targets, batch_size=batch_size, progress=not as_json)
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise _fail(str(err)) from err
    row = table_rows([result], clean)[0]
    if save is not None:
        np.savez_compressed(save, x_adv=result.x_adv.numpy(), y=result.labels.numpy(),
                            success=result.success.numpy(), norms=result.norms.numpy())
        row["saved"] = str(save)
    if as_json:
        _print_json({**_provenance(net, model, dataset, split, len(x), device),
                     "config": result.config, **row})
    else:
        _print_rows([row], f"{result.attack} on {model} ({dataset} {split}, {len(result)} images)",
                    TABLE_KEYS)


@app.command()
def evaluate(
    model: ModelOpt = "small_cnn",
    attack_names: Annotated[list[str], typer.Option("--attack", "-a", help="repeatable")] = None,
    norm: Annotated[str, typer.Option(help="linf, l2 or l1")] = "linf",
    eps: Annotated[list[float], typer.Option(
        help="repeatable: one run per eps (minimal-norm attacks run once; their curve is "
             "read at each eps)")] = None,
    steps: Annotated[int | None, typer.Option(help="iterations")] = None,
    restarts: Annotated[int | None, typer.Option(help="random restarts (PGD, APGD)")] = None,
    n_queries: Annotated[int | None, typer.Option(help="query budget (Square)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    dataset: DatasetOpt = "mnist",
    limit: Annotated[int, typer.Option(help="number of test images")] = 1000,
    batch_size: Annotated[int, typer.Option(help="images per batch")] = 500,
    report: Annotated[Path | None, typer.Option(
        help="also write an HTML report (table, accuracy-vs-eps plot, gallery) here")] = None,
    suite: Annotated[str | None, typer.Option(
        help="run an attack suite (fast, standard, thorough, rand, minimal, or a .toml/.yaml "
             "file) with per-sample worst case and masking checks, recorded in --store")] = None,
    store: Annotated[Path, typer.Option(help="suite runs: the SQLite result store")] = Path(
        "advkit-output/runs.sqlite"),
    resume: Annotated[int | None, typer.Option(
        help="continue the interrupted suite run RUN (see `advkit runs`)")] = None,
    checks: Annotated[bool, typer.Option(help="suite runs: gradient-masking checks")] = True,
    check_samples: Annotated[int, typer.Option(help="images the checks attack")] = 100,
    trust: TrustOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Clean and robust accuracy of a model under attacks at one or more eps, or under an
    attack suite (--suite) recorded in a resumable store."""
    from advkit.evaluation import accuracy
    if suite is not None or resume is not None:
        if attack_names:
            raise _fail("use either --attack (single attacks) or --suite (a suite), not both")
        if eps is not None and len(eps) > 1:
            raise _fail("a suite run has one eps; run once per eps (or use --suite minimal "
                        "for the whole curve)")
        _evaluate_suite(model=model, suite=suite or "standard", norm=norm,
                        eps=eps[0] if eps else 0.3, dataset=dataset, limit=limit,
                        batch_size=batch_size, seed=seed, store=store, resume=resume,
                        checks=checks, check_samples=check_samples, trust=trust,
                        device=device, as_json=as_json)
        return
    attack_names = attack_names or ["pgd"]
    eps_list = eps or [0.3]
    try:
        attacks = _build_attacks(attack_names, norm, eps_list, steps=steps, restarts=restarts,
                                 n_queries=n_queries, seed=seed)
        device = _device(device)
        net, x, y = _load_model_and_data(model, dataset, "test", limit, trust, device)
        clean = accuracy(net, x, y, device=device)
        results = [run_attack(a, net, x, y, batch_size=batch_size, progress=not as_json)
                   for a in attacks]
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise _fail(str(err)) from err
    rows = [row for r in results for row in (
        curve_rows(r, eps_list, clean) if r.kind == "minimal" else table_rows([r], clean))]
    provenance = _provenance(net, model, dataset, "test", len(x), device)
    if report is not None:
        _write_report(report, net, x, results, rows, curves(results, eps_list, clean),
                      provenance, dataset)
    if as_json:
        _print_json({**provenance, "n": int(x.shape[0]), "clean_accuracy": clean,
                     "results": rows, "configs": [r.config for r in results],
                     **({"report": str(report)} if report is not None else {})})
    else:
        _print_rows(rows, f"{model} on {dataset} ({x.shape[0]} test images)", TABLE_KEYS)


def _evaluate_suite(*, as_json: bool, device: str, **options: object) -> None:
    from advkit.runs_cli import evaluate_suite, print_report_tables
    try:
        summary = evaluate_suite(device=_device(device), quiet=as_json,
                                 log=(lambda _: None) if as_json else console.print, **options)
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise _fail(str(err)) from err
    if as_json:
        _print_json(summary)
    else:
        print_report_tables(summary, out)


def _write_report(path: Path, net, x, results, rows, curve_points, provenance, dataset) -> None:
    from advkit import data
    from advkit.report import gallery_items, write_html_report
    names = data.class_names(dataset)
    strongest = max(results, key=lambda r: r.success_rate)
    env = {**provenance.pop("environment"), **{k: str(v) for k, v in provenance.items()}}
    shown = ["attack", "norm", "eps", "clean_acc", "robust_acc", "success_rate", "median_norm",
             "images_per_s"]
    write_html_report(path, title=f"advkit evaluation: {provenance['model']} on {dataset}",
                      summary=[{k: row[k] for k in shown} for row in rows],
                      curves=curve_points, gallery=gallery_items(net, x, strongest, names),
                      environment=env,
                      notes=["Success is re-checked with a fresh forward pass after every attack."])


@app.command("train")
def train_cmd(
    arch: Annotated[str | None, typer.Option(help="zoo architecture [default: small_cnn]")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="mnist, fashion-mnist, cifar10, ... [default: mnist]")] = None,
    epochs: Annotated[int | None, typer.Option(help="[default: 3]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="[default: 128]")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate [default: 1e-3]")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam or sgd [default: adam]")] = None,
    schedule: Annotated[str | None, typer.Option(
        help="onecycle, cosine, step, constant [default: onecycle]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="[default: 0]")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    train_limit: Annotated[int | None, typer.Option(help="first N training images")] = None,
    defense: Annotated[str, typer.Option(
        help="standard, pgd, fgsm_rs, trades, mart, distillation, noise")] = "standard",
    preset: Annotated[str | None, typer.Option(
        help="shipped recipe settings: mnist (Linf 0.3) or fashion-mnist (Linf 0.1); "
             "explicit options override them")] = None,
    norm: Annotated[str | None, typer.Option(help="adversarial recipes: linf, l2 or l1")] = None,
    eps: Annotated[float | None, typer.Option(help="adversarial recipes: budget [default: 0.3]")
                   ] = None,
    attack_steps: Annotated[int | None, typer.Option(help="inner attack steps")] = None,
    warmup_epochs: Annotated[int | None, typer.Option(help="eps warm-up epochs")] = None,
    beta: Annotated[float | None, typer.Option(help="TRADES beta")] = None,
    lam: Annotated[float | None, typer.Option(help="MART lambda")] = None,
    temperature: Annotated[float | None, typer.Option(help="distillation T")] = None,
    sigma: Annotated[float | None, typer.Option(help="noise std")] = None,
    lipschitz: Annotated[bool | None, typer.Option(
        "--lipschitz/--no-lipschitz", help="spectrally normalised layers")] = None,
    precision: Annotated[str | None, typer.Option(
        help="fp32, or mixed precision: bf16 (CPU or GPU) or fp16 (GPU) [default: fp32]")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="run folder (checkpoints)")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = True,
    card: Annotated[bool, typer.Option(
        help="evaluate the trained model and write its model card (.card.json)")] = True,
    card_suite: Annotated[str, typer.Option(help="the model card's evaluation suite")] = "fast",
    card_limit: Annotated[int, typer.Option(help="test images the model card uses")] = 500,
    store: Annotated[Path, typer.Option(help="result store of the card's evaluation")] = Path(
        "advkit-output/runs.sqlite"),
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Train a zoo model with a recipe (checkpoint every epoch, resumable); install it so
    that `--model ARCH` (or ARCH-DATASET) finds it; write its model card (clean and robust
    accuracy under --card-suite at --norm/--eps, with the masking checks).

    `--preset mnist` (or fashion-mnist) trains the recipe measured in
    benchmarks/RESULTS.md: `advkit train --defense pgd --preset mnist`."""
    import shutil

    from advkit.models import model_dir, trained_path
    from advkit.training import resolve, train_defense
    log = (lambda _: None) if as_json else console.print
    given = {"arch": arch, "dataset": dataset, "epochs": epochs, "batch_size": batch_size,
             "lr": lr, "optimizer": optimizer, "schedule": schedule,
             "weight_decay": weight_decay, "seed": seed, "train_limit": train_limit,
             "lipschitz": lipschitz, "precision": precision, "norm": norm, "eps": eps,
             "steps": attack_steps,
             "warmup_epochs": warmup_epochs, "beta": beta, "lam": lam,
             "temperature": temperature, "sigma": sigma}
    try:
        settings = resolve(defense, preset, given)
        arch, dataset = settings["arch"], settings["dataset"]
        norm, eps = settings["norm"], settings["eps"]
        run_dir = out_dir or model_dir() / "runs" / f"{arch}-{dataset}-{defense}-seed{seed}"
        if preset:
            log(f"preset {preset}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        result = train_defense(defense, settings, run_dir, resume=resume,
                               progress=not as_json, device=_device(device), log=log)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from err
    # A defended model is installed beside the standard one: small_cnn-mnist-trades.
    installed = trained_path(f"{arch}-{dataset}" + ("" if defense == "standard" else f"-{defense}"))
    installed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.checkpoint, installed)
    summary = {"checkpoint": str(result.checkpoint), "installed": str(installed),
               "history": result.history, "seconds": result.seconds}
    if card:
        try:
            summary["card"] = _model_card(result, installed, dataset, norm, eps, card_suite,
                                          card_limit, store, _device(device), as_json, log)
        except (ValueError, FileNotFoundError) as err:
            raise _fail(f"the model is trained and installed, but its card failed: {err}") from err
    if as_json:
        _print_json(summary)
    else:
        _print_rows(result.history, f"{arch} on {dataset}")
        out.print(f"checkpoint: {result.checkpoint}\ninstalled as: {installed}")
        if card:
            ev = summary["card"]["evaluation"]
            out.print(f"model card: {card_path(installed)} ({ev['suite']} suite, {ev['norm']} "
                      f"eps={ev['eps']:g}: clean {ev['clean_accuracy']:.1%}, robust "
                      f"{ev['robust_accuracy']:.1%}" + ("" if ev["reliable"] else
                                                        ", UNRELIABLE: a check failed") + ")")


def _model_card(result, installed: Path, dataset: str, norm: str, eps: float, suite: str,
                limit: int, store: Path, device: str, quiet: bool, log) -> dict:
    """Evaluate the freshly trained model, write its card beside both checkpoints."""
    import shutil

    from advkit import data, evaluate
    from advkit.card import build_card, card_path, write_card
    from advkit.models import read_metadata
    if limit < 1:
        raise ValueError(f"--card-limit must be >= 1 (got {limit})")
    x, y = data.load(dataset, split="test", limit=limit)
    model = result.model.to(device)
    report = evaluate(model, x, y, ThreatModel(norm, eps), suite, store=store, device=device,
                      progress=not quiet, log=log, check_samples=min(100, limit),
                      describe_model={"spec": str(installed),
                                      "card": str(card_path(installed))},
                      describe_data={"dataset": dataset, "split": "test", "limit": limit})
    card = build_card(checkpoint=installed, metadata=read_metadata(installed),
                      seconds=result.seconds, device=device, evaluation=report)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the evaluation is shared
        write_card(card, card_path(result.checkpoint))
        shutil.copyfile(card_path(result.checkpoint), card_path(installed))
    return card


@app.command()
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
        raise _fail(str(err)) from err
    if as_json:
        _print_json(summary)
    else:
        _print_rows(summary["results"], f"MNIST small_cnn, {summary['n']} test images",
                    TABLE_KEYS)
        out.print(f"report: {summary['report']}")


from advkit.universal_cli import universal_app  # noqa: E402  (needs `app`'s helpers above)

app.add_typer(universal_app, name="universal")

from advkit.runs_cli import report as report_cmd  # noqa: E402
from advkit.runs_cli import runs_app  # noqa: E402

app.add_typer(runs_app, name="runs")
app.command("report")(report_cmd)


def main() -> None:
    """Entry point of the ``advkit`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
