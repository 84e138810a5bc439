"""Gallery items from an attack result: the classic clean / perturbation / adversarial figure."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from advkit.attacks.base import AttackResult
from advkit.models.device import device_of
from advkit.report.html import GalleryItem


def gallery_items(model: nn.Module, x: torch.Tensor, result: AttackResult,
                  class_names: Sequence[str], per_class: int = 1,
                  limit: int = 10) -> list[GalleryItem]:
    """Up to ``per_class`` broken, originally correct examples per class (``limit`` in all).

    Predictions and confidences come from a fresh forward pass on the clean and
    the adversarial images; items are sorted by class.
    """
    device = device_of(model)
    with torch.no_grad():
        p_clean = model(x.to(device)).softmax(1).cpu()
        p_adv = model(result.x_adv.to(device)).softmax(1).cpu()
    items: list[GalleryItem] = []
    taken: dict[int, int] = {}
    for i in range(x.shape[0]):
        label = int(result.labels[i])
        c_pred, a_pred = int(p_clean[i].argmax()), int(p_adv[i].argmax())
        if not result.success[i] or c_pred != label or taken.get(label, 0) >= per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        items.append(GalleryItem(
            clean=x[i].cpu(), adversarial=result.x_adv[i].cpu(), label=class_names[label],
            clean_pred=class_names[c_pred], clean_conf=float(p_clean[i, c_pred]),
            adv_pred=class_names[a_pred], adv_conf=float(p_adv[i, a_pred]),
            attack=f"{result.attack} {result.threat.norm} eps={result.threat.eps:g}",
            norm=float(result.norms[i])))
        if len(items) >= limit:
            break
    return sorted(items, key=lambda item: list(class_names).index(item.label))
