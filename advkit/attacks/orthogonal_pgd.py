"""Detector-aware projected gradient descent: misclassify and evade the detectors at once.

Bryniarski, Hingun, Pachuca, Wang, Carlini. "Evading Adversarial Example Detection
Defenses with Orthogonal Projected Gradient Descent", ICLR 2022.
https://arxiv.org/abs/2106.15023
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advkit.attacks._logits import margin
from advkit.attacks.ascent import steepest_direction
from advkit.attacks.base import Attack, Oracle, Taxonomy, goal_reached, require_at_least
from advkit.threat import ThreatModel

MODES = ("orthogonal", "selective", "combined")


def find_detectors(model: nn.Module) -> list:
    """The detectors of the pipeline ``model`` is, or wraps (an EOT average, a BPDA
    version): the first module down the ``.model`` chain with ``detectors``."""
    seen = model
    for _ in range(8):
        detectors = getattr(seen, "detectors", None)
        if detectors is not None:
            return list(detectors)
        seen = getattr(seen, "model", None)
        if not isinstance(seen, nn.Module):
            break
    return []


class OrthogonalPGD(Attack):
    """PGD against a classifier guarded by detectors: the adversarial example must be
    misclassified and accepted by every detector.

    Bryniarski, Hingun, Pachuca, Wang, Carlini. "Evading Adversarial Example Detection
    Defenses with Orthogonal Projected Gradient Descent", ICLR 2022.
    https://arxiv.org/abs/2106.15023; the combined loss is Carlini & Wagner's,
    "Adversarial Examples Are Not Easily Detected", AISec 2017.
    https://arxiv.org/abs/1705.07263

    Two objectives per sample: the classifier's logit margin ``c`` (best other logit minus
    the true one; the target's minus the best other for a targeted attack), to raise until
    the image is misclassified, and the detectors' excess ``d = sum_k relu(s_k(x) - t_k)``
    (each detector's differentiable score over its threshold), to bring to zero. Each
    step moves along one direction, chosen per sample by ``mode``:

    - ``"orthogonal"`` (the paper's main attack): while the image is classified correctly,
      ``grad c`` with its component along ``grad d`` removed; once misclassified, ``-grad d``
      with its component along ``grad c`` removed. Each step makes progress on one
      objective without undoing the other (to first order).
    - ``"selective"``: ``grad c`` while classified correctly, ``-grad d`` after; the paper's
      simpler variant.
    - ``"combined"``: Carlini & Wagner 2017's single loss ``c - weight * d``, ascended.

    A sample stops at its first point that is misclassified and that no detector flags
    (early exit). The classifier's logits are the model's own (for a
    :class:`~advkit.defenses.Protected` pipeline, the classifier on the reconstructed
    input; pass ``pipeline.for_attack()`` to differentiate its transforms through their
    BPDA approximations); the detectors are the pipeline's, on the raw input. On a model
    without detectors the attack is PGD on the margin loss.

    Cost: one forward and two backward passes per image and step (each pass of a
    pipeline runs its detectors on the same input; a detector's own forward passes
    through the base model are part of that query).

    Args:
        threat: norm (linf, l2), eps, bounds.
        steps: iterations (default 100).
        step_size: default ``2.5 * eps / steps`` (Madry et al.'s rule).
        mode: ``"orthogonal"`` (default), ``"selective"`` or ``"combined"``.
        weight: the weight of the detectors' excess in the combined loss (default 1).
        confidence: the logit margin by which the image must be misclassified before the
            attack turns to evading (default 0; C&W's kappa).
        random_start: start from a uniform point of the ball (default True).
        seed: seed of the random start.
    """

    paper = ("Bryniarski et al. 2022, Evading Adversarial Example Detection Defenses with "
             "Orthogonal Projected Gradient Descent")
    taxonomy = Taxonomy(frequency="iterative")
    norms = ("linf", "l2")
    evades_detectors = True

    def __init__(self, threat: ThreatModel, *, steps: int = 100,
                 step_size: float | None = None, mode: str = "orthogonal",
                 weight: float = 1.0, confidence: float = 0.0, random_start: bool = True,
                 seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        require_at_least(1, steps=steps)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0 (got {step_size})")
        if not weight > 0:
            raise ValueError(f"weight must be > 0 (got {weight})")
        if not confidence >= 0:
            raise ValueError(f"confidence must be >= 0 (got {confidence})")
        self.steps = steps
        self.step_size = step_size if step_size is not None else 2.5 * threat.eps / steps
        self.mode = mode
        self.weight = float(weight)
        self.confidence = float(confidence)
        self.random_start = random_start

    def _needs_clean_pass(self) -> bool:
        return False

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None) -> Tensor:
        detectors = find_detectors(model.model)
        xa = self.threat.random_start(x, generator) if self.random_start else x.clone()
        out = xa.clone()
        active = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.steps):
            ya = y[active]
            ta = targets[active] if targets is not None else None

            def objectives(logits: Tensor, xg: Tensor, ya: Tensor = ya,
                           ta: Tensor | None = ta) -> tuple[Tensor, Tensor]:
                excess = torch.zeros(xg.shape[0], device=xg.device)
                for detector in detectors:
                    excess = excess + (detector.attack_score(xg).to(xg.device)
                                       - detector.threshold).clamp_min(0)
                return -margin(logits, ya, ta), excess

            logits, (gap, excess), (grad_c, grad_d) = model.gradients(
                xa[active], objectives, rows=active)
            reached = goal_reached(logits, ya, ta)
            done = reached & (excess <= 0)
            # The attack turns to evading once the image is misclassified by a margin: a
            # confident mistake survives what detectors do to it (a squeezed copy, a
            # reconstruction) more easily.
            fooled = reached & (gap >= self.confidence)
            if done.any():
                out[active[done]] = xa[active[done]]
                keep = ~done
                active, fooled = active[keep], fooled[keep]
                grad_c, grad_d = grad_c[keep], grad_d[keep]
                if active.numel() == 0:
                    return out
            direction = self._direction(grad_c, grad_d, fooled)
            step = steepest_direction(direction, self.threat.norm)
            xa[active] = self.threat.project(xa[active] + self.step_size * step, x[active])
        out[active] = xa[active]
        return out

    def _direction(self, grad_c: Tensor, grad_d: Tensor, fooled: Tensor) -> Tensor:
        """Per sample, the direction to ascend (its norm's steepest step follows it)."""
        if self.mode == "combined":
            return grad_c - self.weight * grad_d
        view = (-1,) + (1,) * (grad_c.dim() - 1)
        evade = -grad_d
        if self.mode == "orthogonal":
            classify = grad_c - _along(grad_c, grad_d)
            evade = evade - _along(evade, grad_c)
        else:
            classify = grad_c
        return torch.where(fooled.view(view), evade, classify)


def _along(v: Tensor, u: Tensor) -> Tensor:
    """The component of ``v`` along ``u``, per sample (zero where ``u`` is zero)."""
    n = v.shape[0]
    vf, uf = v.reshape(n, -1), u.reshape(n, -1)
    coef = (vf * uf).sum(dim=1) / (uf * uf).sum(dim=1).clamp_min(1e-30)
    return (coef[:, None] * uf).view_as(v)
