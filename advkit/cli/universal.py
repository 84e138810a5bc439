"""``advkit universal``: fit a universal adversarial perturbation, save it, apply it.

A typer sub-app; :mod:`advkit.cli` mounts it with
``app.add_typer(universal_app, name="universal")``.

- ``advkit universal fit --model M --dataset mnist --eps 0.2 --norm linf --limit 2000
  --out uap.safetensors [--json]`` fits ``v`` on the first ``--limit`` images of
  ``--split``, saves it with its metadata, and prints the fooling rate on the fitting
  images and on ``--heldout`` test images not used to fit.
- ``advkit universal apply --perturbation uap.safetensors --model M --limit 1000
  [--json]`` adds a saved ``v`` to test images and prints the fooling rate and the
  accuracy with and without it.
"""

from __future__ import annotations

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
    out,
    print_json,
    print_rows,
    provenance,
    resolve_device,
)
from advkit.evaluation import accuracy

universal_app = typer.Typer(add_completion=False, no_args_is_help=True,
                            help="Universal adversarial perturbations: fit one, apply one.")


def _slice(dataset: str, split: str, start: int, count: int):
    """Images ``start`` to ``start + count`` of a split (fewer if the split is shorter)."""
    from advkit import data
    x, y = data.load(dataset, split=split, limit=start + count)
    return x[start:], y[start:]


def _accuracy(net, x, y, device: str, v=None, bounds=(0.0, 1.0)) -> float:
    from advkit.attacks.universal import apply_perturbation
    return accuracy(net, apply_perturbation(x, v, bounds) if v is not None else x, y,
                    device=device)


@universal_app.command("fit")
def fit_command(
    out_path: Annotated[Path, typer.Option("--out", help="where to write v (.safetensors)")],
    model: ModelOpt = "small_cnn",
    dataset: DatasetOpt = "mnist",
    split: Annotated[str, typer.Option(help="split the fitting images come from")] = "test",
    limit: Annotated[int, typer.Option(help="number of fitting images")] = 2000,
    heldout: Annotated[int, typer.Option(help="test images not used to fit, for the "
                                                "held-out fooling rate")] = 1000,
    norm: Annotated[str, typer.Option(help="linf or l2")] = "linf",
    eps: Annotated[float, typer.Option(help="budget, [0, 1] pixel scale")] = 0.2,
    delta: Annotated[float, typer.Option(help="stop at a fooling rate of 1 - delta")] = 0.2,
    max_epochs: Annotated[int, typer.Option(help="passes over the fitting images")] = 5,
    inner: Annotated[str, typer.Option(help="inner step: gradient or deepfool")] = "gradient",
    batch_size: Annotated[int, typer.Option(help="images per inner step")] = 32,
    seed: Annotated[int, typer.Option(help="random seed (order of the images)")] = 0,
    trust: TrustOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Fit a universal perturbation on a data slice, save it, report fooling rates."""
    import time

    from advkit.attacks.universal import UniversalPerturbation, fooling_rate, save_perturbation
    from advkit.models import load as load_model
    from advkit.threat import ThreatModel
    try:
        if limit < 1 or heldout < 0:
            raise ValueError(f"--limit must be >= 1 and --heldout >= 0 (got {limit}, {heldout})")
        threat = ThreatModel(norm=norm, eps=eps)
        attack = UniversalPerturbation(threat, delta=delta, max_epochs=max_epochs, inner=inner,
                                       batch_size=batch_size, seed=seed)
        device = resolve_device(device)
        net = load_model(model, trust=trust, map_location=device)
        x, y = _slice(dataset, split, 0, limit)
        # Held-out: test images the fit never saw.
        start = x.shape[0] if split == "test" else 0
        xh, yh = _slice(dataset, "test", start, heldout)
        started = time.perf_counter()
        v = attack.fit(net, x.to(device), y.to(device), progress=not as_json).cpu()
        seconds = time.perf_counter() - started
        has_heldout = xh.shape[0] > 0
        summary = {
            "norm": threat.norm, "eps": threat.eps, "v_norm": threat.norms(v).item(),
            "n_fit": int(x.shape[0]), "n_heldout": int(xh.shape[0]),
            "fit_fooling_rate": fooling_rate(net, x, v, bounds=threat.bounds),
            "heldout_fooling_rate": (fooling_rate(net, xh, v, bounds=threat.bounds)
                                     if has_heldout else None),
            "heldout_clean_acc": _accuracy(net, xh, yh, device) if has_heldout else None,
            "heldout_perturbed_acc": (_accuracy(net, xh, yh, device, v, threat.bounds)
                                      if has_heldout else None),
            "seconds": seconds,
        }
        prov = provenance(net, model, dataset, split, int(x.shape[0]), device)
        metadata = {**summary, "bounds": list(threat.bounds), "model": model,
                    "model_fingerprint": prov["model_fingerprint"], "data": prov["data"],
                    "heldout": {"dataset": dataset, "split": "test", "start": start,
                                "count": int(xh.shape[0])},
                    "config": attack.config()}
        save_perturbation(out_path, v, metadata)
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise fail(str(err)) from err
    if as_json:
        print_json({**prov, "config": attack.config(), **summary, "saved": str(out_path)})
    else:
        print_rows([summary], f"universal perturbation on {model} ({dataset})")
        out.print(f"saved: {out_path}")


@universal_app.command("apply")
def apply_command(
    perturbation: Annotated[Path, typer.Option(help="a file written by `advkit universal fit`")],
    model: ModelOpt = "small_cnn",
    dataset: DatasetOpt = "mnist",
    split: Annotated[str, typer.Option(help="train or test")] = "test",
    start: Annotated[int, typer.Option(help="index of the first image")] = 0,
    limit: Annotated[int, typer.Option(help="number of images")] = 1000,
    trust: TrustOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Add a saved universal perturbation to images; report fooling rate and accuracy."""
    from advkit.attacks.universal import fooling_rate, load_perturbation
    from advkit.models import load as load_model
    try:
        if start < 0 or limit < 1:
            raise ValueError(f"--start must be >= 0 and --limit >= 1 (got {start}, {limit})")
        v, meta = load_perturbation(perturbation)
        bounds = tuple(meta.get("bounds", (0.0, 1.0)))
        device = resolve_device(device)
        net = load_model(model, trust=trust, map_location=device)
        x, y = _slice(dataset, split, start, limit)
        if x.shape[0] == 0:
            raise ValueError(f"--start {start} is past the end of {dataset} {split}")
        if v.shape[1:] != x.shape[1:]:
            raise ValueError(f"the perturbation has shape {tuple(v.shape[1:])}, the images of "
                             f"{dataset} {tuple(x.shape[1:])}: fit one for this dataset")
        prov = provenance(net, model, dataset, split, int(x.shape[0]), device)
        prov["data"]["start"] = start
        same_model = meta.get("model_fingerprint") == prov["model_fingerprint"]
        row = {"n": int(x.shape[0]), "norm": meta.get("norm"), "eps": meta.get("eps"),
               "fooling_rate": fooling_rate(net, x, v, bounds=bounds),
               "clean_acc": _accuracy(net, x, y, device),
               "perturbed_acc": _accuracy(net, x, y, device, v, bounds),
               "same_model": same_model}
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise fail(str(err)) from err
    if as_json:
        print_json({**prov, "perturbation": str(perturbation), "fitted_on": meta, **row})
    else:
        if not same_model:
            console.print("[yellow]note:[/] the perturbation was fitted on another model "
                          f"(fingerprint {meta.get('model_fingerprint')}): a transfer test")
        print_rows([row], f"universal perturbation {perturbation.name} on {model}")
