"""``advkit attack``: one attack on a model and a data slice."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advkit._files import atomic_path
from advkit.cli._build import build_attack
from advkit.cli._common import (
    TABLE_KEYS,
    DatasetOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    TrustOpt,
    check_writable,
    fail,
    load_model_and_data,
    print_json,
    print_rows,
    provenance,
    resolve_device,
)
from advkit.evaluation import accuracy, run_attack, table_rows


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
    max_queries: Annotated[int | None, typer.Option(
        help="queries per sample of the query-based black-box attacks (HopSkipJump, "
             "Boundary, SimBA, NES, ZOO, Bandits, GenAttack, OnePixel)")] = None,
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

    if save is not None:
        save = save if save.suffix == ".npz" else save.with_name(save.name + ".npz")
        check_writable(save, "output file")  # before the attack, not after it
    try:
        atk = build_attack(attack_name, norm, eps, steps=steps, step_size=step_size,
                           restarts=restarts, n_queries=n_queries, max_queries=max_queries,
                           loss=loss, seed=seed)
        device = resolve_device(device)
        net, x, y = load_model_and_data(model, dataset, split, limit, trust, device)
        targets = None
        if target is not None:
            keep = y != target
            x, y = x[keep], y[keep]
            targets = torch.full_like(y, target)
        clean = accuracy(net, x, y, device=device)
        result = run_attack(atk, net, x, y, targets, batch_size=batch_size, progress=not as_json)
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise fail(str(err)) from err
    row = table_rows([result], clean)[0]
    if save is not None:
        with atomic_path(save) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, x_adv=result.x_adv.numpy(), y=result.labels.numpy(),
                                success=result.success.numpy(), norms=result.norms.numpy())
        row["saved"] = str(save)
    if as_json:
        print_json({**provenance(net, model, dataset, split, len(x), device),
                    "config": result.config, **row})
    else:
        print_rows([row], f"{result.attack} on {model} ({dataset} {split}, {len(result)} images)",
                   TABLE_KEYS)
