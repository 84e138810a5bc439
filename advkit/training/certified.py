"""Certified training: IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al. 2020).

Both minimise a mix of the clean loss and a *verified* upper bound on the worst-case loss
over the threat model's ball, so that the trained network is one bound propagation can
certify (:func:`advkit.verify.certify`):

    loss = kappa * CE(z(x), y) + (1 - kappa) * CE(-m(x, eps), y)

where ``m_j(x, eps)`` is a lower bound on the margin ``z_y - z_j`` over the ball
(``m_y = 0``): ``-m`` are the worst-case logits, each class's logit minus the label's as
large as the bound allows. Cross-entropy on them upper-bounds the worst-case
cross-entropy (it only grows when a wrong class's logit grows against the label's).

* IBP: ``m`` from interval bounds, the margin specification folded into the last affine
  layers (Gowal et al.'s elision of the last layer, :func:`advkit.verify.bounds.ibp_lower`).
* CROWN-IBP: intervals for every hidden layer, then one CROWN backward pass from the
  margins to the input through them, ``m = beta * m_CROWN-IBP + (1 - beta) * m_IBP``.

Schedules (per step, as both papers ramp them): nothing robust for ``warmup_epochs``;
then over ``ramp_epochs`` eps grows linearly from 0 to ``eps_train``, kappa falls
linearly from 1 to its final value, and beta moves linearly from ``beta_start`` to
``beta_end``; then all stay. ``eps_train`` may exceed the threat model's (test) eps, as
both papers do on MNIST (0.2 for 0.1, 0.4 for 0.3).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.threat import ThreatModel
from advkit.training.recipe import Recipe, attack_mode
from advkit.verify import certify
from advkit.verify.bounds import (
    InputSet,
    backward_lower,
    ibp_lower,
    interval_bounds,
    network,
)


def margin_lower_bounds(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                        beta: float = 0.0) -> Tensor:
    """Lower bounds ``m`` (N, classes) on ``z_y - z_j`` over ``threat``'s ball around each
    image, with ``m_y = 0``, differentiable in the model's parameters.

    ``beta`` weighs CROWN-IBP's bounds against IBP's: 0 is IBP alone (no backward pass),
    1 CROWN-IBP alone. The model is read in eval mode (batch norm with its running
    statistics, no dropout): the bounds are those of the model :func:`certify` checks.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must lie in [0, 1] (got {beta})")
    # network() refuses train mode (batch norm would bound the batch's statistics); its
    # ops hold the live parameters, so gradients still flow once train mode is restored.
    with attack_mode(model) as inner:
        net = network(inner, x)
    classes = net.num_classes
    eye = torch.eye(classes, dtype=x.dtype, device=x.device)
    # Row j: e_y - e_j (the zero row at j = y bounds to exactly 0, the label's own logit).
    spec = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    region = InputSet.from_threat(x, threat)
    bounds = interval_bounds(net, region)
    lower = ibp_lower(net, region, bounds, spec) if beta < 1 else 0.0
    if beta > 0:
        crown = backward_lower(net, region, bounds, spec)
        lower = beta * crown + (1 - beta) * lower
    return lower


def robust_loss(margins: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy on the worst-case logits ``-margins`` (a bound on the worst-case CE)."""
    return F.cross_entropy(-margins, y)


class IBPTraining(Recipe):
    """Gowal, Dvijotham, Stanforth, Bunel, Qin, Uesato, Arandjelovic, Mann, Kohli. "On the
    Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models",
    2018. arXiv 1810.12715.

    ``loss = kappa * CE(z, y) + (1 - kappa) * CE(-m_IBP(eps), y)``.

    Args:
        threat: the threat model certified at test time (held-out verified accuracy is
            measured at its eps each epoch).
        eps_train: the eps trained at (default: the threat model's); the paper trains
            MNIST at 0.4 for a test eps of 0.3 and 0.2 for 0.1.
        kappa: the final weight of the clean loss, in [0, 1] (paper: 0.5).
        warmup_epochs: epochs of clean training first (paper, MNIST: 2k of 60k steps,
            3.3 of 100 epochs). Fractions are fine: the schedule moves per step.
        ramp_epochs: epochs over which eps and kappa ramp (paper, MNIST: 10k steps, 16.7
            epochs); 0 jumps to the final values after the warm-up.
        eval_batch: held-out images certified by IBP at the end of each epoch (history:
            ``ibp_verified``); 0 skips the check.
        eval_crown: certify them with CROWN too (``crown_verified``). Off by default: CROWN
            bounds every unstable hidden neuron by its own backward pass, minutes per
            hundred images on stride_cnn while many neurons are unstable (257 s for 100
            images at Linf 0.1 on a fresh stride_cnn, one thread), against milliseconds
            for IBP.
    """

    name = "ibp"

    def __init__(self, threat: ThreatModel, *, eps_train: float | None = None,
                 kappa: float = 0.5, warmup_epochs: float = 0.0, ramp_epochs: float = 0.0,
                 eval_batch: int = 500, eval_crown: bool = False) -> None:
        eps_train = threat.eps if eps_train is None else eps_train
        if not (threat.eps >= 0 and math.isfinite(threat.eps)):
            raise ValueError(f"certified training needs a finite eps >= 0 (got {threat.eps})")
        if not (eps_train >= 0 and math.isfinite(eps_train)):
            raise ValueError(f"eps_train must be a finite number >= 0 (got {eps_train})")
        if not 0 <= kappa <= 1:
            raise ValueError(f"kappa must lie in [0, 1] (got {kappa}): it weighs the clean "
                             "loss against the verified one")
        for name, value in (("warmup_epochs", warmup_epochs), ("ramp_epochs", ramp_epochs),
                            ("eval_batch", eval_batch)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 (got {value})")
        self.threat = threat
        self.eps_train = float(eps_train)
        self.kappa = float(kappa)
        self.warmup_epochs = float(warmup_epochs)
        self.ramp_epochs = float(ramp_epochs)
        self.eval_batch = int(eval_batch)
        self.eval_crown = bool(eval_crown)
        self.start_step(0, 1)

    def params(self) -> dict[str, Any]:
        return {"norm": self.threat.norm, "eps": self.threat.eps, "eps_train": self.eps_train,
                "kappa": self.kappa, "warmup_epochs": self.warmup_epochs,
                "ramp_epochs": self.ramp_epochs, "eval_batch": self.eval_batch,
                "eval_crown": self.eval_crown}

    def ramp(self, step: int, steps_per_epoch: int) -> float:
        """The schedule's progress in [0, 1] before batch ``step``: 0 through the warm-up,
        then linear over ``ramp_epochs``."""
        epochs = step / steps_per_epoch  # epochs finished before this batch
        if epochs < self.warmup_epochs:
            return 0.0
        if self.ramp_epochs == 0:
            return 1.0
        return min(1.0, (epochs - self.warmup_epochs) / self.ramp_epochs)

    def schedule(self, step: int, steps_per_epoch: int) -> dict[str, float]:
        """eps, kappa and beta (the CROWN-IBP weight) before batch ``step``."""
        r = self.ramp(step, steps_per_epoch)
        return {"eps": self.eps_train * r, "kappa": 1 + (self.kappa - 1) * r, **self._mix(r)}

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        self._current = self.schedule(step, steps_per_epoch)

    def _mix(self, r: float) -> dict[str, float]:
        return {"beta": 0.0}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        eps, kappa = self._current["eps"], self._current["kappa"]
        clean = F.cross_entropy(logits, y)
        if kappa == 1:  # the warm-up: the verified term has no weight, skip its bounds
            return clean, logits
        threat = ThreatModel(self.threat.norm, eps, self.threat.bounds)
        margins = margin_lower_bounds(model, x, y, threat, beta=self._current["beta"])
        return kappa * clean + (1 - kappa) * robust_loss(margins, y), logits

    def end_epoch(self, model: nn.Module, epoch: int, x_val: Tensor,
                  y_val: Tensor) -> dict[str, float]:
        if not self.eval_batch:
            return {}
        params = list(model.parameters())
        device = params[0].device if params else x_val.device
        x, y = x_val[:self.eval_batch].to(device), y_val[:self.eval_batch].to(device)
        metrics = {"ibp_verified": certify(model, x, y, self.threat, "ibp").verified_accuracy}
        if self.eval_crown:
            metrics["crown_verified"] = certify(model, x, y, self.threat, "crown",
                                                batch_size=100).verified_accuracy
        return metrics


class CROWNIBPTraining(IBPTraining):
    """Zhang, Chen, Xiao, Gowal, Stanforth, Li, Boning, Hsieh. "Towards Stable and Efficient
    Training of Verifiably Robust Neural Networks", ICLR 2020. arXiv 1906.06316.

    IBP training whose worst-case margins mix in CROWN-IBP's: interval bounds for the
    hidden layers, then a CROWN backward pass from the margins (adaptive lower slopes),
    ``m = beta * m_CROWN-IBP + (1 - beta) * m_IBP``. Tighter early in training, when IBP's
    bounds are loose; beta ramps from ``beta_start`` to ``beta_end`` with eps (paper:
    1 -> 0), and once it reaches 0 the backward pass is skipped (plain IBP cost).

    Args:
        kappa: the final weight of the clean loss (paper: 1 -> 0, so 0 here).
        beta_start, beta_end: the CROWN-IBP weight at the start and end of the ramp.
        The rest as :class:`IBPTraining`.
    """

    name = "crown_ibp"

    def __init__(self, threat: ThreatModel, *, eps_train: float | None = None,
                 kappa: float = 0.0, beta_start: float = 1.0, beta_end: float = 0.0,
                 warmup_epochs: float = 0.0, ramp_epochs: float = 0.0,
                 eval_batch: int = 500, eval_crown: bool = False) -> None:
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1] (got {value}): it weighs "
                                 "CROWN-IBP's bounds against IBP's")
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        super().__init__(threat, eps_train=eps_train, kappa=kappa,
                         warmup_epochs=warmup_epochs, ramp_epochs=ramp_epochs,
                         eval_batch=eval_batch, eval_crown=eval_crown)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "beta_start": self.beta_start, "beta_end": self.beta_end}

    def _mix(self, r: float) -> dict[str, float]:
        return {"beta": self.beta_start + (self.beta_end - self.beta_start) * r}
