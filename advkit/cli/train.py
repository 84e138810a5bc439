"""``advkit train``: train a zoo model with a recipe, install it, write its model card."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import safetensors.torch
import torch
import typer

from advkit._files import atomic_write
from advkit.card import card_path
from advkit.cli._common import (
    DeviceOpt,
    JsonOpt,
    check_writable,
    console,
    fail,
    out,
    print_json,
    print_rows,
    resolve_device,
)
from advkit.evaluation import DEFAULT_STORE
from advkit.threat import ThreatModel


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
        help="standard, pgd, fgsm_rs, trades, mart, distillation, noise; ibp, crown_ibp "
             "(certified training: use a preset, it sets eps_train and the ramp); or denoising: "
             "MagNet's denoising autoencoder for advkit.defenses.magnet (its reformer and "
             "detector); it defaults to --arch magnet_ae --lr 0.03 --batch-size 32")] = "standard",
    preset: Annotated[str | None, typer.Option(
        help="shipped recipe settings: mnist (Linf 0.3), fashion-mnist (Linf 0.1) or "
             "mnist-0.1 (Linf 0.1: ibp and crown_ibp only); explicit options override them")
    ] = None,
    norm: Annotated[str | None, typer.Option(help="adversarial recipes: linf, l2 or l1")] = None,
    eps: Annotated[float | None, typer.Option(help="adversarial recipes: budget [default: 0.3]")
                   ] = None,
    attack_steps: Annotated[int | None, typer.Option(help="inner attack steps")] = None,
    warmup_epochs: Annotated[int | None, typer.Option(help="eps warm-up epochs")] = None,
    beta: Annotated[float | None, typer.Option(help="TRADES beta")] = None,
    lam: Annotated[float | None, typer.Option(help="MART lambda")] = None,
    temperature: Annotated[float | None, typer.Option(help="distillation T")] = None,
    sigma: Annotated[float | None, typer.Option(help="noise std")] = None,
    noise: Annotated[float | None, typer.Option(
        help="denoising: std of the noise added to training images [default: 0.1]")] = None,
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
    store: Annotated[Path, typer.Option(help="result store of the card's evaluation")
                     ] = DEFAULT_STORE,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Train a zoo model with a recipe (checkpoint every epoch, resumable); install it so
    that `--model ARCH` (or ARCH-DATASET) finds it; write its model card (clean and robust
    accuracy under --card-suite at --norm/--eps, with the masking checks).

    `--preset mnist` (or fashion-mnist) trains the recipe measured in
    benchmarks/RESULTS.md: `advkit train --defense pgd --preset mnist`."""
    from advkit.models import model_dir, trained_path
    from advkit.training import RECIPES, resolve, train_defense
    log = (lambda _: None) if as_json else console.print
    reconstructs = defense in RECIPES and RECIPES[defense].reconstructs
    given = {"arch": arch, "dataset": dataset, "epochs": epochs, "batch_size": batch_size,
             "lr": lr, "optimizer": optimizer, "schedule": schedule,
             "weight_decay": weight_decay, "seed": seed, "train_limit": train_limit,
             "lipschitz": lipschitz, "precision": precision, "norm": norm, "eps": eps,
             "steps": attack_steps,
             "warmup_epochs": warmup_epochs, "beta": beta, "lam": lam,
             "temperature": temperature, "sigma": sigma, "noise": noise}
    try:
        settings = resolve(defense, preset, given)
        arch, dataset = settings["arch"], settings["dataset"]
        norm, eps = settings["norm"], settings["eps"]
        run_dir = out_dir or model_dir() / "runs" / f"{arch}-{dataset}-{defense}-seed{seed}"
        check_writable(run_dir, "run folder")
        check_writable(model_dir(), "installed-model folder")
        if preset:
            log(f"preset {preset}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        result = train_defense(defense, settings, run_dir, resume=resume,
                               progress=not as_json, device=resolve_device(device), log=log)
    except (ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from err
    # A defended model is installed beside the standard one: small_cnn-mnist-trades.
    installed = trained_path(f"{arch}-{dataset}" + ("" if defense == "standard" else f"-{defense}"))
    data = result.checkpoint.read_bytes()
    if not _holds_weights(data, result.model):
        # Never put a file that does not hold the trained weights over an installed model.
        raise fail(f"{result.checkpoint} does not hold the trained weights; {installed} was "
                   "left as it was")
    atomic_write(installed, data)
    summary = {"checkpoint": str(result.checkpoint), "installed": str(installed),
               "history": result.history, "seconds": result.seconds}
    if card and reconstructs:
        log("no model card: the card evaluates a classifier's robustness, and this model is "
            "an autoencoder (advkit.defenses.magnet.Reformer / MagNetDetector take it)")
    elif card:
        try:
            summary["card"] = _model_card(result, installed, dataset, norm, eps, card_suite,
                                          card_limit, store, resolve_device(device), as_json, log)
        except (ValueError, FileNotFoundError) as err:
            raise fail(f"the model is trained and installed, but its card failed: {err}") from err
    if as_json:
        print_json(summary)
    else:
        print_rows(result.history, f"{arch} on {dataset}")
        out.print(f"checkpoint: {result.checkpoint}\ninstalled as: {installed}")
        if "card" in summary:
            ev = summary["card"]["evaluation"]
            out.print(f"model card: {card_path(installed)} ({ev['suite']} suite, {ev['norm']} "
                      f"eps={ev['eps']:g}: clean {ev['clean_accuracy']:.1%}, robust "
                      f"{ev['robust_accuracy']:.1%}" + ("" if ev["reliable"] else
                                                        ", UNRELIABLE: a check failed") + ")")


def _holds_weights(data: bytes, model: torch.nn.Module) -> bool:
    """Whether checkpoint bytes hold exactly ``model``'s tensors (checked on the very bytes
    that get installed)."""
    try:
        tensors = safetensors.torch.load(data)
    except Exception:  # safetensors raises several types for damaged bytes
        return False
    state = model.state_dict()
    return set(tensors) == set(state) and all(
        torch.equal(tensors[k], v.detach().cpu()) for k, v in state.items())


def _model_card(result, installed: Path, dataset: str, norm: str, eps: float, suite: str,
                limit: int, store: Path, device: str, quiet: bool, log) -> dict:
    """Evaluate the freshly trained model, write its card beside both checkpoints."""
    from advkit import data, evaluate
    from advkit.card import build_card, write_card
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
        write_card(card, card_path(installed))
    return card
