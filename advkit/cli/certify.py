"""``advkit certify``: certified robustness of a model on a data slice (bound propagation,
MILP), the lower bound beside the attacks' upper bound.

- ``advkit certify --model M --eps 0.1 --method crown`` prints clean and verified accuracy;
- ``--method milp`` decides each image (verified, falsified with a counter-example,
  timeout);
- ``--radius`` also bisects each image's certified radius up to eps.
"""

from __future__ import annotations

from typing import Annotated

import typer

from advkit.cli._common import (
    DatasetOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    TrustOpt,
    fail,
    load_model_and_data,
    print_json,
    print_rows,
    provenance,
    resolve_device,
)

KEYS = ["method", "norm", "eps", "images", "clean_acc", "verified_acc", "falsified",
        "timeout", "mean_radius", "seconds"]


def certify(
    model: ModelOpt = "small_cnn",
    method: Annotated[str, typer.Option(
        help="ibp, crown, alpha-crown or milp (complete; Linf and L1, small ReLU networks)")
    ] = "crown",
    norm: Annotated[str, typer.Option(help="linf, l2 or l1")] = "linf",
    eps: Annotated[float, typer.Option(help="radius in [0, 1] pixel units")] = 0.1,
    dataset: DatasetOpt = "mnist",
    limit: Annotated[int, typer.Option(help="number of test images")] = 100,
    batch_size: Annotated[int, typer.Option(help="images bounded at once")] = 100,
    time_limit: Annotated[float, typer.Option(help="milp: solver seconds per image")] = 60.0,
    radius: Annotated[bool, typer.Option(
        "--radius", help="also bisect each image's certified radius in [0, eps]")] = False,
    trust: TrustOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Certify a model's predictions on test images: every point of the eps-ball (inside
    the [0, 1] box) provably gets the label. A lower bound on robust accuracy."""
    import torch

    from advkit.threat import ThreatModel
    from advkit.verify import certify as certify_images
    from advkit.verify.milp import verify

    try:
        threat = ThreatModel(norm, eps)
        device = resolve_device(device)
        net, x, y = load_model_and_data(model, dataset, "test", limit, trust, device)
        with torch.no_grad():
            correct = net(x).argmax(1) == y
        row = {"method": method, "norm": threat.norm, "eps": eps, "images": len(x),
               "clean_acc": correct.float().mean().item()}
        per_image: dict[str, list] = {}
        if method == "milp":
            result = verify(net, x, y, threat, time_limit=time_limit, progress=not as_json)
            verified = result.verified & correct.cpu()
            row.update(falsified=int((result.falsified & correct.cpu()).sum()),
                       timeout=sum(s == "timeout" for s in result.status),
                       seconds=float(result.seconds.sum()))
            per_image["status"] = result.status
        else:
            cert = certify_images(net, x, y, threat, method, batch_size=batch_size,
                                  progress=not as_json)
            verified = cert.verified.cpu() & correct.cpu()
            row["seconds"] = cert.seconds
        row["verified_acc"] = verified.float().mean().item()
        if radius:
            from advkit.evaluation.certification import certified_radii
            options = {"time_limit": time_limit} if method == "milp" else {}
            radii, _ = certified_radii(net, x, y, threat, method, batch_size=batch_size,
                                       **options)
            row["mean_radius"] = radii[correct].mean().item() if correct.any() else 0.0
            per_image["radius"] = radii.tolist()
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise fail(str(err)) from err
    if as_json:
        print_json({**provenance(net, model, dataset, "test", len(x), device), **row,
                    "verified": verified.tolist(), **per_image})
    else:
        print_rows([{k: row[k] for k in KEYS if k in row}],
                   f"certify {model} ({dataset} test, {len(x)} images)")
