"""Sanity checks that catch an evaluation fooled by gradient masking (Carlini et al. 2019,
"On evaluating adversarial robustness"; Croce & Hein 2020).

Each check answers pass / warn / fail (or skip, when it does not apply) with an
explanation in plain words. A failed check marks the whole evaluation unreliable:
the robust accuracy it reports is probably an overestimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.attacks.apgd import APGD
from advkit.evaluation.suites import Suite, reactive_parts
from advkit.threat import ThreatModel

STATUSES = ("pass", "warn", "fail", "skip")
EPS_FACTORS = (0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Check:
    """The verdict of one check."""

    name: str
    status: str
    message: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check status must be one of {STATUSES} (got {self.status!r})")

    def to_dict(self) -> dict:
        return asdict(self)


def _apgd_accuracy(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, steps: int,
                   seed: int) -> Tensor:
    """Per-sample: still correctly classified after APGD-CE (the check's probe attack)."""
    result = APGD(threat, steps=steps, loss="ce", seed=seed)(model, x, y)
    return ~result.success


def forward_randomness(model: nn.Module, x: Tensor, suite: Suite) -> Check:
    with torch.no_grad():
        a, b = model(x), model(x)
    scale = a.abs().max().clamp_min(1e-12)
    diff = ((a - b).abs().max() / scale).item()
    details = {"max_relative_difference": diff}
    if diff <= 1e-5:
        return Check("randomness", "pass", "Two forward passes of the same images agree: the "
                     "model is deterministic.", details)
    if any(s.eot > 1 for s in suite.stages):
        return Check("randomness", "pass", f"The model is randomised (two passes differ by "
                     f"{diff:.2g} relative); the suite averages its gradients over draws (EOT).",
                     details)
    return Check("randomness", "fail", f"Two forward passes of the same images differ (by "
                 f"{diff:.2g} relative): the model is randomised, and attacks that follow a "
                 "single draw's gradient underestimate it. Evaluate with --suite rand "
                 "(expectation over transformation).", details)


def logit_outputs(model: nn.Module, x: Tensor) -> Check:
    with torch.no_grad():
        out = model(x)
    looks = bool(out.min() >= 0 and out.max() <= 1 and torch.allclose(
        out.sum(1), torch.ones_like(out[:, 0]), atol=1e-3))
    if looks:
        return Check("logits", "fail", "The model's outputs look like probabilities (rows in "
                     "[0, 1] summing to 1). Gradients through a softmax saturate and make "
                     "attacks look weak: remove the final softmax so the model returns logits.")
    return Check("logits", "pass", "The model returns logits, not probabilities.")


def gradient_health(model: nn.Module, x: Tensor, y: Tensor) -> Check:
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    flat = grad.reshape(len(x), -1)
    bad = ~torch.isfinite(flat).all(1)
    zero = (flat == 0).all(1) & ~bad
    share_zero, share_bad = zero.float().mean().item(), bad.float().mean().item()
    details = {"zero_gradient_share": share_zero, "non_finite_gradient_share": share_bad,
               "samples": len(x)}
    worst = share_zero + share_bad
    if worst > 0.05:
        return Check("gradients", "fail", f"{share_zero:.0%} of the correctly classified images "
                     f"have an all-zero loss gradient and {share_bad:.0%} a NaN/inf one: the "
                     "softmax saturates or the model is not differentiable (gradient masking). "
                     "Gradient attacks on the cross-entropy cannot work here; logit-margin "
                     "attacks (APGD-DLR, C&W, the 'thorough' suite) or BPDA are needed.", details)
    if worst > 0:
        return Check("gradients", "warn", f"{worst:.1%} of the correctly classified images have "
                     "a zero or non-finite loss gradient.", details)
    return Check("gradients", "pass", "Every correctly classified image has a finite, non-zero "
                 "loss gradient.", details)


def black_box_gain(per_sample: Sequence[dict], suite: Suite, black_box: dict[str, bool],
                   ) -> Check:
    """Samples that survived every white-box stage but fell to a black-box one
    (``black_box``: per stage name, whether its attack is a black box)."""
    if suite.kind != "budgeted" or not any(black_box.values()):
        return Check("black_box", "skip", "No black-box stage in this suite.")
    correct = [r for r in per_sample if r["clean_pred"] == r["label"]]
    gained = sum(1 for r in correct if r["broken_by"] and black_box.get(r["broken_by"]))
    share = gained / max(len(correct), 1)
    details = {"broken_by_black_box": gained, "clean_correct": len(correct), "share": share}
    if gained == 0:
        return Check("black_box", "pass", "The black-box attack broke no sample that the "
                     "white-box attacks had missed.", details)
    if share > 0.005:
        return Check("black_box", "fail", f"A black-box attack broke {gained} images "
                     f"({share:.1%}) that every white-box attack missed, although it knows "
                     "less: the gradients mislead (masking). Trust the black-box figure and "
                     "use adaptive attacks.", details)
    return Check("black_box", "warn", f"A black-box attack broke {gained} image(s) ({share:.2%}) "
                 "that the white-box attacks missed; a few are normal, many mean masking.",
                 details)


def eps_behaviour(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, seed: int,
                  steps: int = 25) -> list[Check]:
    """APGD-CE at multiples of eps, with a second seed at eps and an unbounded budget.

    Six probe runs: ``steps`` is kept small (25) because on a masked model no image
    leaves a run early, and a probe only has to show a trend, not the strongest attack."""
    dims = x[0].numel()
    cap = threat.max_eps(dims)
    n = len(x)
    points = []
    robust_at_eps = None
    for factor in EPS_FACTORS:
        eps = min(threat.eps * factor, cap)
        robust = _apgd_accuracy(model, x, y, ThreatModel(threat.norm, eps, threat.bounds), steps,
                                seed)
        points.append((eps, robust.float().mean().item()))
        if factor == 1.0:
            robust_at_eps = robust
    unbounded = _apgd_accuracy(model, x, y, ThreatModel(threat.norm, cap, threat.bounds), steps,
                               seed).float().mean().item()
    second = _apgd_accuracy(model, x, y, threat, steps, seed + 1)
    checks = []

    accs = [a for _, a in points]
    tolerance = max(2 / n, 0.02)
    rises = [(points[i][0], points[i + 1][0]) for i in range(len(points) - 1)
             if accs[i + 1] > accs[i] + tolerance]
    details = {"points": points + [(cap, unbounded)], "samples": n, "steps": steps}
    if rises:
        checks.append(Check("eps_monotone", "fail", "Robust accuracy rises from "
                            f"eps={rises[0][0]:g} to eps={rises[0][1]:g}: a larger budget "
                            "contains every smaller one, so the attack is failing to optimise "
                            "(masking).", details))
    elif accs[-1] >= accs[0] - tolerance and accs[0] > tolerance:
        checks.append(Check("eps_monotone", "warn", f"Robust accuracy does not decrease from "
                            f"eps={points[0][0]:g} ({accs[0]:.0%}) to eps={points[-1][0]:g} "
                            f"({accs[-1]:.0%}); a real defense degrades as the budget grows.",
                            details))
    else:
        checks.append(Check("eps_monotone", "pass", "Robust accuracy decreases as eps grows.",
                            details))

    details = {"eps": cap, "robust_accuracy": unbounded, "samples": n, "steps": steps}
    if unbounded > tolerance:
        checks.append(Check("unbounded", "fail", f"With a budget covering the whole input range "
                            f"(eps={cap:g}) APGD-CE still leaves {unbounded:.0%} of the images "
                            "correctly classified; any image can be turned into any other there, "
                            "so the attack is not working (masking or a broken gradient).",
                            details))
    else:
        checks.append(Check("unbounded", "pass", f"An unbounded attack (eps={cap:g}) brings "
                            f"accuracy to {unbounded:.0%}.", details))

    assert robust_at_eps is not None
    disagree = (robust_at_eps != second).float().mean().item()
    details = {"disagreement": disagree, "samples": n, "seeds": [seed, seed + 1]}
    if disagree > 0.05:
        checks.append(Check("restarts", "warn", f"Two APGD-CE runs from different random starts "
                            f"disagree on {disagree:.0%} of the images: the loss surface is "
                            "erratic; use more restarts ('thorough').", details))
    else:
        checks.append(Check("restarts", "pass", f"Two random restarts agree on "
                            f"{1 - disagree:.0%} of the images.", details))
    return checks


def adaptive_attacks(model: nn.Module, suite: Suite) -> Check | None:
    """Does the suite attack a reactive defense the way an adaptive attacker would?

    A pipeline's detectors need an attack that evades them while it misclassifies (a
    stage whose attack ``evades_detectors``); a transform that is random needs expectation
    over transformation (a stage with ``eot > 1``). Transforms are always differentiated
    through their declared approximation (BPDA): the engine attacks ``for_attack()``.
    None for a model with no reactive component (nothing to check).
    """
    transforms, detectors, random_transforms = reactive_parts(model)
    if not transforms and not detectors:
        return None
    missing = []
    if detectors and not any(s.attack_class.evades_detectors for s in suite.stages):
        names = ", ".join(type(d).__name__ for d in detectors)
        missing.append(f"no stage evades the detectors ({names}): a non-adaptive attack "
                       "is flagged, an attacker who knows the detector is not")
    random = [type(t).__name__ for t in random_transforms]
    if random and max(s.eot for s in suite.stages) == 1:
        missing.append(f"the transforms {', '.join(random)} are random and no stage uses "
                       "expectation over transformation (eot > 1)")
    if missing:
        return Check("adaptive", "fail",
                     "The suite is not adaptive to this pipeline: " + "; ".join(missing)
                     + ". Its robust accuracy is an upper bound that can be far too high "
                     "(Carlini & Wagner 2017; Athalye et al. 2018; Tramer et al. 2020). "
                     "Evaluate with suite='adaptive'.", {"missing": missing})
    return Check("adaptive", "pass", "Every reactive component of the pipeline meets an "
                 "attack adapted to it (detector-aware stages, BPDA through the transforms"
                 + (", EOT over random transforms" if random else "") + ").")
