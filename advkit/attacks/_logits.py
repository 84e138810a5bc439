"""Quantities read off a batch of logits that several attacks share: the best other class,
the logit margin, the DLR loss and the ranking of the other classes.

"Other" always means every class but ``cls`` (the true class, or the target).
"""

from __future__ import annotations

from torch import Tensor


def _without(logits: Tensor, cls: Tensor) -> Tensor:
    """``logits`` with each row's class ``cls`` set to -inf (out of every max and ranking)."""
    return logits.scatter(1, cls[:, None], float("-inf"))


def best_other(logits: Tensor, cls: Tensor) -> Tensor:
    """Per sample, the largest logit among the classes other than ``cls``."""
    return _without(logits, cls).amax(dim=1)


def best_other_class(logits: Tensor, cls: Tensor) -> Tensor:
    """Per sample, the class other than ``cls`` with the largest logit."""
    return _without(logits, cls).argmax(dim=1)


def top_other_classes(logits: Tensor, cls: Tensor, k: int) -> Tensor:
    """Per sample, the ``k`` classes other than ``cls`` with the largest logits, best first."""
    return _without(logits, cls).topk(k, dim=1).indices


def margin(logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    """Per sample: how far the goal is, in logits (negative once it is reached).

    Untargeted ``Z_y - max_{i != y} Z_i``; targeted ``max_{i != t} Z_i - Z_t`` (the
    Carlini-Wagner margin; attacks ascending it use its negative).
    """
    cls = targets if targets is not None else labels
    own = logits.gather(1, cls[:, None]).squeeze(1)
    others = best_other(logits, cls)
    return own - others if targets is None else others - own


def dlr_loss(logits: Tensor, labels: Tensor, targets: Tensor | None = None) -> Tensor:
    """The Difference of Logits Ratio loss, per sample (the quantity APGD ascends).

    Untargeted: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``; targeted:
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``, where ``z_pi1 >= z_pi2 >= ...``
    are the sorted logits. Dividing by a logit gap makes it invariant to shifting the
    logits and scaling them by a positive factor, so it does not vanish on models with
    a saturated softmax.
    """
    z = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    if targets is None:
        return -(z_y - best_other(logits, labels)) / (z[:, 0] - z[:, 2] + 1e-12)
    z_t = logits.gather(1, targets[:, None]).squeeze(1)
    return -(z_y - z_t) / (z[:, 0] - (z[:, 2] + z[:, 3]) / 2 + 1e-12)

