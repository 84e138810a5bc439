"""Measuring a protected pipeline: one row of figures per attack.

What the protection experiment reports for a fitted :class:`~advkit.defenses.Protected`
pipeline and the adversarial images of each attack (:func:`measure_protection`): the
pipeline's metrics (:func:`~advkit.defenses.protection_metrics`: clean accuracy, false
rejection, robust accuracy and its two parts), and for a pipeline with detectors the
detection figures (AUROC, true-positive rate at the fitted false-positive rate) with
Tramer's sanity check. It also crafts the adversarial images of the standard attacks:
non-adaptive ones on the base model (:func:`oblivious_examples`: the attacker does not
know the defense) and the adaptive suite against the pipeline itself
(:func:`adaptive_examples`).

Tramer 2022 ("Detecting adversarial examples is (nearly) as hard as classifying them",
ICML 2022, https://arxiv.org/abs/2107.11630, theorem 4): a detector (classifier with a
reject option) whose robust risk at eps is R yields an inefficient classifier whose robust
risk at eps / 2 is at most R. A detection result therefore claims a classifier robust at
eps / 2 with accuracy ``1 - R``; where that exceeds the best robust accuracy known at
eps / 2, the detection result is suspect (the attack was probably too weak).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from advkit.defenses.pipeline import Protected, protection_metrics
from advkit.threat import ThreatModel

__all__ = ["OBLIVIOUS_ATTACKS", "SOTA_ROBUST_ACCURACY", "ProtectionRow", "adaptive_examples",
           "detection_scores", "measure_protection", "oblivious_examples"]

#: Best robust accuracies known (to us) per (data set, norm, eps), the references of
#: Tramer's check, which compares a detector's implied classifier at eps / 2 with them.
#: Where no figure at exactly eps / 2 was at hand, a figure at a larger eps is used: a
#: model's robust accuracy only grows as eps shrinks, so it is a lower bound of the best
#: known at eps / 2, and a flag against it says "at least as robust as the best classifier
#: we know of at the larger eps" (a conservative check: it may flag too often, never too
#: rarely against that classifier).
#:   MNIST Linf 0.15: 96% (96.07% rounded down: a lower reference only flags more), TRADES'
#:     released MNIST SmallCNN at eps 0.3 against 40-step PGD (natural accuracy 99.48%;
#:     the white-box leaderboard of the authors' repository, github.com/yaodongyu/TRADES,
#:     README; Zhang et al. 2019, ICML).
#:   Fashion-MNIST Linf 0.05: 78.5%, the most robust of this repository's Fashion-MNIST
#:     presets at eps 0.05 (PGD 78.5%, TRADES 78.1%; clean 84.8% and 84.2%), the standard
#:     suite (APGD-CE, APGD-DLR) on the first 1,000 test images: `python
#:     benchmarks/protection.py --preset fashion-mnist --bases pgd trades --reference 1000`
#:     (2026-12-07, one CPU thread). No published figure at eps <= 0.1 was verified, so this
#:     is what we can train, a lower bound of the state of the art.
SOTA_ROBUST_ACCURACY: dict[tuple[str, str, float], float] = {
    ("mnist", "linf", 0.15): 0.96,
    ("fashion-mnist", "linf", 0.05): 0.785,
}

#: The non-adaptive attacks of the experiment, crafted on the base model.
OBLIVIOUS_ATTACKS = ("fgsm", "pgd", "cw")


@dataclass(frozen=True)
class ProtectionRow:
    """How a pipeline fares against one attack's adversarial images.

    Every figure is a share of all ``n`` samples unless stated otherwise.

    Attributes:
        attack: the attack's name.
        n: samples.
        clean_accuracy, false_rejection, robust_accuracy, detected, correct_accepted: as in
            :class:`~advkit.defenses.ProtectionMetrics`.
        fooled: share of samples the base model (``pipeline.model`` on the raw image: no
            transform, no detector) gets right when clean and wrong on their adversarial
            image: the successful adversarial examples a detector is meant to catch, as
            detection papers count them.
        auroc: for a pipeline with detectors, the ROC AUC of the detectors' combined score
            (the largest score minus threshold over the detectors) with the clean images as
            negatives and the fooling adversarial images as positives; NaN without
            detectors or without a fooling image.
        tpr: the share of those fooling adversarial images that the detectors flag
            (true-positive rate at the thresholds fitted for the false-positive rate); NaN
            as for ``auroc``.
        implied_robust_accuracy_at_half_eps: Tramer's implied classifier at eps / 2: the
            pipeline's robust accuracy at eps (clean errors and false rejections count
            against it), the accuracy of ``1 - R`` of theorem 4; NaN without detectors.
        reference_robust_accuracy: the best robust accuracy known at eps / 2 (from
            :data:`SOTA_ROBUST_ACCURACY`), or NaN when none is known.
        tramer_flag: the implied figure exceeds the reference: the detection result claims
            more than the state of the art, so the attack was probably too weak.
    """

    attack: str
    n: int
    clean_accuracy: float
    false_rejection: float
    robust_accuracy: float
    detected: float
    correct_accepted: float
    fooled: float
    auroc: float
    tpr: float
    implied_robust_accuracy_at_half_eps: float
    reference_robust_accuracy: float
    tramer_flag: bool

    def to_dict(self) -> dict:
        return asdict(self)


def detection_scores(pipeline: Protected, x: Tensor) -> Tensor:
    """Per image, the pipeline's combined detection score: the largest ``score - threshold``
    over its detectors (positive where some detector flags the image). (N,) on the CPU."""
    if not pipeline.detectors:
        raise ValueError("the pipeline has no detectors to score with")
    margins = [d.score(x).cpu().double() - float(d.threshold) for d in pipeline.detectors]
    return torch.stack(margins).amax(dim=0)


def measure_protection(pipeline: Protected, x: Tensor, y: Tensor,
                       x_adv_by_attack: Mapping[str, Tensor], *,
                       reference: float | None = None) -> list[ProtectionRow]:
    """One :class:`ProtectionRow` per attack for the fitted ``pipeline``.

    Args:
        pipeline: a :class:`Protected` pipeline, its detectors fitted.
        x, y: the clean images and their labels.
        x_adv_by_attack: attack name -> adversarial images of ``x`` (same shape).
        reference: the best robust accuracy known at eps / 2 for Tramer's check (see
            :data:`SOTA_ROBUST_ACCURACY`); None: no reference, no flag.
    Returns:
        the rows, in the order of ``x_adv_by_attack``.
    """
    if not isinstance(pipeline, Protected):
        raise TypeError(f"pipeline must be an advkit.defenses.Protected "
                        f"(got {type(pipeline).__name__})")
    y = y.cpu()
    with torch.no_grad():
        right = _predictions(pipeline.model, x) == y
    clean_scores = detection_scores(pipeline, x) if pipeline.detectors else None
    ref = math.nan if reference is None else float(reference)
    rows = []
    for attack, x_adv in x_adv_by_attack.items():
        metrics = protection_metrics(pipeline, x, y, x_adv)
        with torch.no_grad():
            fooling = right & (_predictions(pipeline.model, x_adv) != y)
        auroc = tpr = implied = math.nan
        if clean_scores is not None:
            implied = metrics.robust_accuracy
            if fooling.any():
                adv_scores = detection_scores(pipeline, x_adv[fooling])
                tpr = float((adv_scores > 0).double().mean())
                truth = np.r_[np.zeros(len(clean_scores)), np.ones(len(adv_scores))]
                auroc = float(roc_auc_score(truth, torch.cat([clean_scores, adv_scores])))
        rows.append(ProtectionRow(
            attack=attack, n=metrics.n, clean_accuracy=metrics.clean_accuracy,
            false_rejection=metrics.false_rejection, robust_accuracy=metrics.robust_accuracy,
            detected=metrics.detected, correct_accepted=metrics.correct_accepted,
            fooled=float(fooling.double().mean()), auroc=auroc, tpr=tpr,
            implied_robust_accuracy_at_half_eps=implied, reference_robust_accuracy=ref,
            tramer_flag=bool(implied > ref)))  # False where either is NaN
    return rows


def _predictions(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """The labels ``model`` predicts for ``x``, in batches, on the CPU."""
    return torch.cat([model(x[i:i + batch_size]).argmax(dim=1).cpu()
                      for i in range(0, len(x), batch_size)])


def oblivious_examples(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                       attacks: Sequence[str] = OBLIVIOUS_ATTACKS, seed: int = 0,
                       ) -> dict[str, tuple[Tensor, float]]:
    """Adversarial images crafted on the base ``model`` alone (the attacker ignores the
    defense: the "oblivious" setting), to be judged by a pipeline around it.

    Attacks: ``"fgsm"`` (one step), ``"pgd"`` (40 steps, random start) and ``"cw"``
    (Carlini & Wagner's Linf attack, 100 Adam steps per attempt, capped at eps: an image
    whose smallest example found is larger than eps stays clean).

    Returns:
        attack name -> (adversarial images, seconds spent crafting them).
    """
    from advkit.attacks import FGSM, PGD, CarliniWagnerLinf

    builders = {
        "fgsm": lambda: FGSM(threat, seed=seed),
        "pgd": lambda: PGD(threat, steps=40, seed=seed),
        "cw": lambda: CarliniWagnerLinf(threat, seed=seed),
    }
    out = {}
    for name in attacks:
        if name not in builders:
            raise ValueError(f"unknown oblivious attack {name!r}: use {', '.join(builders)}")
        t0 = time.perf_counter()
        result = builders[name]()(model, x, y)
        out[name] = (result.x_adv, time.perf_counter() - t0)
    return out


def adaptive_examples(pipeline: Protected, x: Tensor, y: Tensor, threat: ThreatModel, *,
                      seed: int = 0, detector_aware_only: bool = False) -> Tensor:
    """The adaptive suite against ``pipeline``: the stages of
    ``advkit.evaluation.get_suite("adaptive", pipeline)`` in turn, each on the images no
    earlier stage got past the pipeline (misclassified and accepted), as the evaluation
    engine runs a budgeted suite. Each stage attacks ``pipeline.for_attack()`` (the
    transforms' BPDA approximations), through an EOT average where the stage asks for it.
    Stage ``i`` is seeded with ``seed + i``.

    Args:
        detector_aware_only: run only the stages that evade detectors (orthogonal PGD and
            its variants), not APGD.
    Returns:
        per image, the first successful adversarial image, or the last stage's attempt.
    """
    from advkit.evaluation import ExpectedLogits, get_suite

    stages = get_suite("adaptive", pipeline).stages
    if detector_aware_only:
        stages = tuple(s for s in stages if s.attack_class.evades_detectors)
    attacked = pipeline.for_attack()
    out, todo = x.clone(), torch.arange(len(x))
    for i, stage in enumerate(stages):
        model = attacked if stage.eot == 1 else ExpectedLogits(attacked, stage.eot)
        result = stage.build(threat, seed=seed + i)(model, x[todo], y[todo])
        out[todo] = result.x_adv.to(out.device)
        todo = todo[~result.success.cpu()]
        if not len(todo):
            break
    return out
