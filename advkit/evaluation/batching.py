"""Running attacks over a data set: batching, progress, merged results, and sweeps over eps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from advkit.attacks.base import Attack, AttackResult
from advkit.models.device import device_of
from advkit.progress import progress_bar


def run_attack(attack: Attack, model: nn.Module, x: Tensor, y: Tensor,
               targets: Tensor | None = None, *, batch_size: int = 500,
               progress: bool = True, device: str | torch.device | None = None) -> AttackResult:
    """Run ``attack`` on (x, y) in batches and merge the per-batch results into one.

    Images travel to ``device`` (default: the model's) batch by batch; the merged
    result's tensors are on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if device is None:
        device = device_of(model)
    parts: list[AttackResult] = []
    n = x.shape[0]
    with progress_bar(progress, f"{type(attack).__name__} {attack.threat.norm} "
                      f"eps={attack.threat.eps:g}", n) as bar:
        for i in range(0, n, batch_size):
            t = targets[i:i + batch_size].to(device) if targets is not None else None
            part = attack(model, x[i:i + batch_size].to(device), y[i:i + batch_size].to(device), t)
            parts.append(_to_cpu(part))
            broken = sum(int(p.success.sum()) for p in parts)
            seen = sum(len(p) for p in parts)
            bar.advance(f"success {broken / seen:.1%}", steps=len(part))
    return merge(parts)


def merge(parts: Sequence[AttackResult]) -> AttackResult:
    """One result from the results of consecutive batches of the same attack."""
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return replace(
        first, x_adv=cat("x_adv"), success=cat("success"), norms=cat("norms"),
        predictions=cat("predictions"), labels=cat("labels"),
        targets=cat("targets") if first.targets is not None else None,
        forward_passes=sum(p.forward_passes for p in parts),
        backward_passes=sum(p.backward_passes for p in parts),
        seconds=sum(p.seconds for p in parts),
        extras={k: torch.cat([p.extras[k] for p in parts]) for k in first.extras},
    )


def sweep(model: nn.Module, x: Tensor, y: Tensor, attacks: Sequence[Attack], *,
          batch_size: int = 500, progress: bool = True) -> list[AttackResult]:
    """Run each configured attack on the same images; one result per attack."""
    return [run_attack(a, model, x, y, batch_size=batch_size, progress=progress)
            for a in attacks]


def table_rows(results: Sequence[AttackResult], clean_accuracy: float) -> list[dict]:
    """Rows for tables and JSON: clean and robust accuracy, success, norms, speed."""
    rows = []
    for r in results:
        s = r.summary()
        rows.append({
            "attack": s["attack"], "norm": s["norm"], "eps": s["eps"], "n": s["n"],
            "clean_acc": clean_accuracy, "robust_acc": s["robust_acc"],
            "success_rate": s["success_rate"],
            "median_norm": s["median_norm"], "mean_norm": s["mean_norm"],
            "images_per_s": s["images_per_s"], "seconds": s["seconds"],
            "forward_passes": s["forward_passes"], "backward_passes": s["backward_passes"],
        })
    return rows


def curve_rows(result: AttackResult, eps_list: Sequence[float],
               clean_accuracy: float) -> list[dict]:
    """Rows like :func:`table_rows`, one per eps, read off a minimal-norm attack's curve."""
    base = table_rows([result], clean_accuracy)[0]
    return [{**base, "eps": eps, "robust_acc": acc, "success_rate": 1.0 - acc}
            for eps, acc in result.curve(eps_list)]


def curves(results: Sequence[AttackResult], eps_list: Sequence[float],
           clean_accuracy: float) -> dict[str, list[tuple[float, float]]]:
    """Robust accuracy versus eps per attack: budgeted runs grouped by attack and norm,
    minimal-norm runs read off at ``eps_list``; every curve starts at (0, clean)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        key = f"{r.attack} ({r.threat.norm})"
        points = (r.curve(eps_list) if r.kind == "minimal"
                  else [(r.threat.eps, r.robust_accuracy)])
        out.setdefault(key, [(0.0, clean_accuracy)]).extend(points)
    return {k: sorted(set(v)) for k, v in out.items()}


def _to_cpu(result: AttackResult) -> AttackResult:
    move = lambda t: t.cpu() if isinstance(t, Tensor) else t  # noqa: E731
    return replace(result, x_adv=move(result.x_adv), success=move(result.success),
                   norms=move(result.norms), predictions=move(result.predictions),
                   labels=move(result.labels), targets=move(result.targets),
                   extras={k: move(v) for k, v in result.extras.items()})


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or inf: map them to null."""
    return value if isinstance(value, float) and math.isfinite(value) else (
        None if isinstance(value, float) else value)
