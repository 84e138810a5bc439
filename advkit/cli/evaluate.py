"""``advkit evaluate``: clean and robust accuracy under single attacks at one or more eps, or
under an attack suite recorded in a resumable store.

- ``advkit evaluate --attack pgd --eps 0.1 --eps 0.3 --model M [--report F] [--json]`` runs
  each attack at each eps (a minimal-norm attack once, its curve read at each eps).
- ``advkit evaluate --suite standard --model M --eps 0.3 [--store F] [--json]`` runs a
  suite and records it in the store (``--store``, default
  :data:`advkit.evaluation.DEFAULT_STORE`);
  ``advkit evaluate --resume RUN`` continues an interrupted run (model and data are
  reloaded from the run's record).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from advkit.cli._build import build_attacks
from advkit.cli._common import (
    TABLE_KEYS,
    DatasetOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    TrustOpt,
    console,
    fail,
    load_model_and_data,
    out,
    print_json,
    print_rows,
    provenance,
    resolve_device,
)
from advkit.distributed import World
from advkit.evaluation import DEFAULT_STORE, accuracy, curve_rows, curves, run_attack, table_rows
from advkit.evaluation.suites import DEFAULT_SUITE

#: What a suite run records and ``--resume`` takes from the run instead of the command line.
_RUN_SETTINGS = ("model", "attack_names", "norm", "eps", "seed", "dataset", "limit",
                 "batch_size", "suite", "checks", "check_samples", "pipeline", "access",
                 "remote", "binarization", "certify")


def evaluate(
    ctx: typer.Context,
    model: ModelOpt = "small_cnn",
    attack_names: Annotated[list[str], typer.Option("--attack", "-a", help="repeatable")] = None,
    norm: Annotated[str, typer.Option(help="linf, l2 or l1")] = "linf",
    eps: Annotated[list[float], typer.Option(
        help="repeatable: one run per eps (minimal-norm attacks run once; their curve is "
             "read at each eps)")] = None,
    steps: Annotated[int | None, typer.Option(help="iterations")] = None,
    restarts: Annotated[int | None, typer.Option(help="random restarts (PGD, APGD)")] = None,
    n_queries: Annotated[int | None, typer.Option(help="query budget (Square)")] = None,
    max_queries: Annotated[int | None, typer.Option(
        help="queries per sample of the query-based black-box attacks (HopSkipJump, "
             "Boundary, SimBA, NES, ZOO, Bandits, GenAttack, OnePixel)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    dataset: DatasetOpt = "mnist",
    limit: Annotated[int, typer.Option(help="number of test images")] = 1000,
    batch_size: Annotated[int, typer.Option(help="images per batch")] = 500,
    report: Annotated[Path | None, typer.Option(
        help="also write an HTML report (table, accuracy-vs-eps plot, query efficiency of "
             "black-box attacks, gallery) here")] = None,
    suite: Annotated[str | None, typer.Option(
        help="run an attack suite (lean: the recommended one, AutoAttack's strength for "
             "about a sixth of its gradient passes; standard: AutoAttack's published "
             "attacks; fast, thorough, rand, minimal, adaptive, blackbox, or a .toml/.yaml "
             "file) with per-sample worst case and masking checks, recorded in --store")] = None,
    store: Annotated[Path, typer.Option(help="suite runs: the SQLite result store")
                     ] = DEFAULT_STORE,
    resume: Annotated[int | None, typer.Option(
        help="continue the interrupted suite run RUN (see `advkit runs`)")] = None,
    checks: Annotated[bool, typer.Option(help="suite runs: gradient-masking checks")] = True,
    check_samples: Annotated[int, typer.Option(help="images the checks attack")] = 100,
    binarization: Annotated[int, typer.Option(
        help="suite runs: with the checks, run the binarization test (Zimmermann et al. "
             "2022: does the suite find an adversarial example that provably exists?) on "
             "this many images; 0: off")] = 0,
    certify: Annotated[str | None, typer.Option(
        help="suite runs: after the attacks, certify every image (ibp, crown, alpha-crown, "
             "milp) and record its certified radius beside the smallest perturbation found "
             "(verified <= robust <= clean curves; a certified image an attack broke fails "
             "the run)")] = None,
    pipeline: Annotated[Path | None, typer.Option(
        help="evaluate the model behind the transforms and detectors of this pipeline file "
             "(.toml/.json; see advkit.defenses.spec): detectors are fitted on training "
             "images first; use --suite adaptive")] = None,
    access: Annotated[str, typer.Option(
        help="suite runs: what the attacks may ask of --model: gradients (white box), "
             "scores or labels (a black box; use --suite blackbox)")] = "gradients",
    remote: Annotated[str | None, typer.Option(
        help="suite runs: evaluate the model served at this URL (advkit serve) instead of "
             "--model, as the black box it serves; use --suite blackbox")] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="ADVKIT_API_KEY", help="the --remote endpoint's API key (never stored)")] = None,
    trust: TrustOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Clean and robust accuracy of a model under attacks at one or more eps, or under an
    attack suite (--suite) recorded in a resumable store."""
    if access not in ("gradients", "scores", "labels"):
        raise fail(f"--access must be gradients, scores or labels (got {access!r})")
    if (access != "gradients" or remote is not None) and suite is None and resume is None:
        raise fail("--access and --remote go with suite runs: add --suite blackbox")
    if resume is not None:
        given = [name for name in _RUN_SETTINGS
                 # typer's ParameterSource lives in a private module; its member name does not
                 if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]
        if given:
            options = ", ".join("--" + ("attack" if n == "attack_names" else n.replace("_", "-"))
                                for n in given)
            raise fail(f"--resume {resume} continues the run with the settings it was started "
                       f"with; drop {options} (or start a new run without --resume)")
    if suite is not None or resume is not None:
        if attack_names:
            raise fail("use either --attack (single attacks) or --suite (a suite), not both")
        if eps is not None and len(eps) > 1:
            raise fail("a suite run has one eps; run once per eps (or use --suite minimal "
                       "for the whole curve)")
        _evaluate_suite(model=model, suite=suite or DEFAULT_SUITE, norm=norm,
                        eps=eps[0] if eps else 0.3, dataset=dataset, limit=limit,
                        batch_size=batch_size, seed=seed, store=store, resume=resume,
                        checks=checks, check_samples=check_samples, trust=trust,
                        device=device, as_json=as_json, pipeline=pipeline, access=access,
                        remote=remote, api_key=api_key, binarization=binarization,
                        certify=certify)
        return
    attack_names = attack_names or ["pgd"]
    eps_list = eps or [0.3]
    try:
        attacks = build_attacks(attack_names, norm, eps_list, steps=steps, restarts=restarts,
                                n_queries=n_queries, max_queries=max_queries, seed=seed)
        device = resolve_device(device)
        net, x, y = load_model_and_data(model, dataset, "test", limit, trust, device)
        attacked = net
        if pipeline is not None:
            net = protect(net, pipeline, dataset, norm, eps_list[0], device,
                          log=(lambda _: None) if as_json else console.print)
            attacked = net.for_attack()  # BPDA through the transforms; same predictions
            if net.rejects_inputs and not any(a.evades_detectors for a in attacks):
                console.print("[bold yellow]warning:[/] no attack evades the pipeline's "
                              "detectors (use --attack orthogonalpgd, or --suite adaptive): "
                              "these robust accuracies are upper bounds that can be far too "
                              "high")
        clean = accuracy(net, x, y, device=device)
        results = [run_attack(a, attacked, x, y, batch_size=batch_size, progress=not as_json)
                   for a in attacks]
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise fail(str(err)) from err
    rows = [row for r in results for row in (
        curve_rows(r, eps_list, clean) if r.kind == "minimal" else table_rows([r], clean))]
    prov = provenance(net, model, dataset, "test", len(x), device)
    if report is not None:
        _write_report(report, net, x, results, rows, curves(results, eps_list, clean),
                      prov, dataset, eps_list)
    if as_json:
        print_json({**prov, "n": int(x.shape[0]), "clean_accuracy": clean,
                    "results": rows, "configs": [r.config for r in results],
                    **({"report": str(report)} if report is not None else {})})
    else:
        print_rows(rows, f"{model} on {dataset} ({x.shape[0]} test images)", TABLE_KEYS)


def _evaluate_suite(*, as_json: bool, device: str, **options: object) -> None:
    try:
        summary = evaluate_suite(device=resolve_device(device), quiet=as_json,
                                 log=(lambda _: None) if as_json else console.print, **options)
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise fail(str(err)) from err
    World.leave()  # under torchrun: both processes done before either exits
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun every process has the report; one prints it
    if as_json:
        print_json(summary)
    else:
        print_report_tables(summary)


def _write_report(path: Path, net, x, results, rows, curve_points, provenance, dataset,
                  eps_list) -> None:
    from advkit import data
    from advkit.report import QueryEfficiency, gallery_items, write_html_report
    names = data.class_names(dataset)
    strongest = max(results, key=lambda r: r.success_rate)
    env = {**provenance.pop("environment"), **{k: str(v) for k, v in provenance.items()}}
    shown = ["attack", "norm", "eps", "clean_acc", "robust_acc", "success_rate", "median_norm",
             "images_per_s"]
    write_html_report(path, title=f"advkit evaluation: {provenance['model']} on {dataset}",
                      summary=[{k: row[k] for k in shown} for row in rows],
                      curves=curve_points, gallery=gallery_items(net, x, strongest, names),
                      environment=env,
                      notes=["Success is re-checked with a fresh forward pass after every attack."],
                      # Robust accuracy versus queries only at the run's one eps: with
                      # several, which one the panel shows would be arbitrary.
                      query_efficiency=QueryEfficiency.from_results(
                          results, eps=eps_list[0] if len(eps_list) == 1 else None))


def protect(net, pipeline: Path | dict, dataset: str, norm: str, eps: float, device,
            log) -> object:
    """``net`` behind the pipeline of a file (or of a recorded spec), its detectors fitted
    on the first training images of ``dataset``."""
    from advkit import data
    from advkit.defenses.spec import PipelineSpec, build_pipeline, load_spec

    spec = PipelineSpec.from_dict(pipeline) if isinstance(pipeline, dict) else \
        load_spec(pipeline)
    x_fit, y_fit = data.load(dataset, split="train", limit=spec.fit_images)
    return build_pipeline(spec, net, x_fit.to(device), y_fit.to(device), eps=eps, norm=norm,
                          log=log)


def evaluate_suite(*, model: str, suite: str, norm: str, eps: float, dataset: str, limit: int,
                   batch_size: int, seed: int, store: Path, resume: int | None, checks: bool,
                   check_samples: int, trust: bool, device: str, quiet: bool, log,
                   pipeline: Path | None = None, access: str = "gradients",
                   remote: str | None = None, api_key: str | None = None,
                   binarization: int = 0, certify: str | None = None) -> dict:
    """Run (or resume) one suite evaluation; return its JSON summary."""
    from advkit import data, models
    from advkit.evaluation import Store
    from advkit.evaluation import evaluate as evaluate_model
    from advkit.threat import ThreatModel

    if resume is not None:
        # Read-only: a missing store is refused, not created empty.
        with Store(store, read_only=True) as db:
            config = db.run(resume)["config"]
        if not config.get("model") or not config.get("data"):
            raise ValueError(f"run {resume} was made from Python, not the command line: resume "
                             "it with advkit.evaluate(..., resume=RUN)")
        model, dataset = config["model"]["spec"], config["data"]["dataset"]
        pipeline_spec = config["model"].get("pipeline")
        access = config["model"].get("access", "gradients")
        remote = config["model"].get("remote")
        limit, split = config["data"]["limit"], config["data"]["split"]
        threat = ThreatModel(config["threat"]["norm"], config["threat"]["eps"],
                             tuple(config["threat"]["bounds"]))
        suite_arg: object = config["suite"]
        seed, batch_size = config["seed"], config["batch_size"]
        checks, check_samples = config["checks"], config["check_samples"]
        binarization = config.get("binarization", 0)
        certify = (config.get("certify") or {}).get("method")
    else:
        threat, split, suite_arg = ThreatModel(norm, eps), "test", suite
        pipeline_spec = None
        if pipeline is not None:
            from advkit.defenses.spec import load_spec
            pipeline_spec = load_spec(pipeline).to_dict()
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        import torch
        torch.cuda.set_device(device)
    if remote is not None:
        if pipeline_spec is not None:
            raise ValueError("--pipeline wraps a local model; a --remote endpoint serves its "
                             "own: drop one of them")
        # The endpoint says what it serves; only the URL is recorded (never the key).
        net = models.remote(remote, api_key=api_key)
        model, access = remote, net.level
    else:
        net = models.load(model, trust=trust, map_location=device)
        if pipeline_spec is not None:
            net = protect(net, pipeline_spec, dataset, threat.norm, threat.eps, device, log)
        if access != "gradients":
            net = (models.scores_only if access == "scores" else models.labels_only)(net)
    x, y = data.load(dataset, split=split, limit=limit)
    if isinstance(suite_arg, dict):
        from advkit.evaluation import Suite
        suite_arg = Suite.from_dict(suite_arg)
    report = evaluate_model(net, x, y, threat, suite_arg, seed=seed, batch_size=batch_size,
                            store=store, resume=resume, checks=checks,
                            check_samples=check_samples, binarization=binarization,
                            certify=certify,
                            device=device, progress=not quiet,
                            log=log, describe_model={"spec": model, **(
                                {"pipeline": pipeline_spec} if pipeline_spec else {}), **(
                                {"access": access} if access != "gradients" else {}), **(
                                {"remote": remote} if remote is not None else {})},
                            describe_data={"dataset": dataset, "split": split, "limit": limit})
    return {**report.summary(), "store": str(store), "chunks_run": report.chunks_run,
            "stages": report.stages, "checks": [c.to_dict() for c in report.checks]}


def print_report_tables(summary: dict) -> None:
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
    rejection = summary.get("rejection")
    if rejection:
        parts = [f"false rejection {rejection['false_rejection']:.1%} of clean images"]
        if rejection["detected"] is not None:
            parts.append(f"robust = detected {rejection['detected']:.1%} + correct and "
                         f"accepted {rejection['correct_accepted']:.1%}")
        out.print("pipeline: " + "; ".join(parts))
    out.print(f"robust accuracy {summary['robust_accuracy']:.1%}"
              + ("" if summary["reliable"] else " (UNRELIABLE)") + f" - stored as run "
              f"{summary['run']} in {summary['store']}")
