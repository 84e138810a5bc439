"""The Ground-Truth Attack: the provably smallest adversarial perturbation, by MILP."""

from __future__ import annotations

import torch
from torch import Tensor

from advkit.attacks.base import Attack, Taxonomy
from advkit.models.access import Oracle
from advkit.threat import ThreatModel


class GroundTruth(Attack):
    """The provably minimal Linf or L1 adversarial perturbation of each image.

    Carlini, Katz, Barrett & Dill. "Provably Minimally-Distorted Adversarial Examples",
    2017. https://arxiv.org/abs/1709.10207

    A ReLU network is encoded exactly as a mixed-integer linear program and the
    perturbation's norm minimised as its objective (:func:`advkit.verify.milp.ground_truth`
    does the work: HiGHS, big-M constants from CROWN). The result is the distance every
    other minimal-norm attack can only approach from above, which is what it is for: a
    measure of how tight FAB, C&W or DeepFool are on a small network. It reads the weights
    (an ``nn.Sequential`` ReLU network, no max pooling), so only the entry check and the
    final success pass go through the model; the work grows exponentially with the number
    of unstable neurons (small networks only). An image the solver cannot settle within
    ``time_limit`` seconds is returned unchanged (not broken).

    The threat model's eps is a cap (searched up to it; ``inf`` searches up to ``cap``).

    Args:
        threat: norm (``linf`` or ``l1``: an L2 ball is a quadratic constraint), eps (a cap).
        cap: the search radius when eps is inf (default 1.0, the whole [0, 1] box in Linf).
        delta: the logit margin the minimal example must reach over the label (1e-4).
        time_limit: solver seconds per image (default 120).
        seed: unused (the search is deterministic); kept for the common signature.
    """

    paper = ("Carlini, Katz, Barrett & Dill 2017, Provably Minimally-Distorted Adversarial "
             "Examples")
    taxonomy = Taxonomy(specificity="untargeted", frequency="iterative",
                        perturbation="optimized")
    norms = ("linf", "l1")
    kind = "minimal"

    def __init__(self, threat: ThreatModel, *, cap: float = 1.0, delta: float = 1e-4,
                 time_limit: float = 120.0, seed: int | None = 0) -> None:
        from advkit.verify.milp import check_ground_truth_options

        super().__init__(threat, seed=seed)
        check_ground_truth_options(cap, delta, time_limit)
        self.cap, self.delta, self.time_limit = float(cap), float(delta), float(time_limit)

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor, generator: torch.Generator | None) -> Tensor:
        from advkit.verify.milp import ground_truth  # scipy's MILP, loaded when used

        if targets is not None:
            raise ValueError("the Ground-Truth Attack is untargeted (its goal is any "
                             "misclassification)")
        out = x.clone()
        todo = (clean_logits.argmax(1) == y).nonzero().squeeze(1)
        if todo.numel() == 0:
            return out
        cap = self.threat.eps if self.threat.bounded else self.cap
        found = ground_truth(model.model, x[todo], y[todo], self.threat.norm, cap=cap,
                             delta=self.delta, time_limit=self.time_limit,
                             bounds=self.threat.bounds)
        solved = torch.isfinite(found.distance) & torch.isfinite(found.x_adv.flatten(1)).all(1)
        out[todo[solved]] = found.x_adv[solved].to(out)
        return out
