"""The Basic Iterative Method and the Iterative Least-Likely Class method (Kurakin et al.)."""

from __future__ import annotations

from torch import Tensor

from advkit.attacks.base import Taxonomy
from advkit.attacks.pgd import PGD
from advkit.threat import ThreatModel


def _kurakin_steps(eps: float) -> int:
    # Kurakin et al.'s rule, with eps in [0, 1] units: min(eps*255 + 4, 1.25 * eps*255).
    return max(1, int(min(eps * 255 + 4, 1.25 * eps * 255)))


class BIM(PGD):
    """Iterative FGSM: small sign steps from the clean image, clipped to the eps-ball.

    Kurakin, Goodfellow, Bengio. "Adversarial Examples in the Physical World",
    ICLR workshop 2017. https://arxiv.org/abs/1607.02533

    PGD without the random start. Defaults follow the paper: step 1/255 and
    ``min(eps*255 + 4, 1.25 * eps*255)`` steps.

    Args:
        threat: norm (linf, l2, l1), eps, bounds.
        steps: default from the paper's rule above.
        step_size: default 1/255.
        loss, early_exit, seed: as in :class:`PGD`.
    """

    paper = "Kurakin et al. 2017, Adversarial Examples in the Physical World"
    taxonomy = Taxonomy(frequency="iterative")

    def __init__(self, threat: ThreatModel, *, steps: int | None = None,
                 step_size: float = 1 / 255, loss: str = "ce", early_exit: bool = True,
                 seed: int | None = 0) -> None:
        super().__init__(threat, steps=steps or _kurakin_steps(threat.eps), step_size=step_size,
                         random_start=False, loss=loss, early_exit=early_exit, seed=seed)


class ILLC(BIM):
    """Iterative least-likely class: BIM *towards* the class the model finds least likely.

    Kurakin, Goodfellow, Bengio. "Adversarial Examples in the Physical World",
    ICLR workshop 2017. https://arxiv.org/abs/1607.02533

    The target of each sample is the argmin of its clean logits; the result is a
    targeted one (``result.targets`` holds those classes and ``success`` means the
    target was reached). With ``steps=1`` it is the one-step "step l.l." method.
    """

    taxonomy = Taxonomy(specificity="targeted", frequency="iterative")

    def _needs_clean_pass(self) -> bool:
        return True  # the targets come from the clean logits, before any objective exists

    def _choose_targets(self, clean_logits: Tensor, y: Tensor,
                        targets: Tensor | None) -> Tensor:
        if targets is not None:
            raise ValueError("ILLC chooses its own targets (the least-likely classes); use "
                             "BIM or PGD with targets= for targets of your choice")
        return clean_logits.argmin(dim=1)
