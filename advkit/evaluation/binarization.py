"""The binarization test (Zimmermann, Brendel, Tramer & Carlini, NeurIPS 2022): does the
evaluation find an adversarial example that provably exists?

    check = binarization_test(model, x, y, threat, suite="fast", samples=50)

Zimmermann, Brendel, Tramer, Carlini. "Increasing Confidence in Adversarial Robustness
Evaluations", NeurIPS 2022. https://arxiv.org/abs/2206.13991

For each test image ``x`` the model's last linear layer (its readout) is replaced by a new
two-class readout trained on the model's own features so that ``x`` and ``inner`` random
points of a smaller ball around it (radius ``inner_radius * eps``) are class 0, and one
*boundary* point, a random corner of the eps-ball, is class 1. Everything before the
readout is the defended model's: its transforms, its masking, its architecture. An
adversarial example of the binarised model then provably exists inside the ball (the
boundary point, checked by a forward pass), and an evaluation that does not find one has
an attack too weak for this model: its robust accuracy there is not to be trusted.

The test runs the suite on each binarised model (label 0) and reports the share of images
on which it found an adversarial example. The paper's reading: a sound evaluation finds
one on (nearly) every image; the original evaluations of 11 of the 13 defenses the authors
re-ran did not. Verdicts: ``pass`` at ``pass_at`` or more (default 90%), ``fail`` below
``fail_below`` (default 70%), ``warn`` between. An image whose binarised readout does not
separate its points (the features do not allow it) is skipped and counted.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from advkit.evaluation.checks import Check
from advkit.threat import ThreatModel


def _readout(model: nn.Module) -> tuple[nn.Module, str]:
    """The model's last ``nn.Linear`` and its dotted name (the readout to replace)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("the binarization test replaces the model's last nn.Linear layer "
                         "(its readout), and this model has none")
    name, layer = found[-1]
    return layer, name


def _features(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """The input of ``layer`` when ``model`` runs on ``x`` (no gradient)."""
    seen: list[Tensor] = []
    hook = layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return seen[-1].flatten(1)


def binarize(model: nn.Module, x: Tensor, threat: ThreatModel, *, inner: int = 200,
             inner_radius: float = 0.5, generator: torch.Generator | None = None,
             ) -> tuple[nn.Module, Tensor] | None:
    """The binarised model for one image ``x`` (1, C, H, W) and its boundary point, or None
    where no linear readout on the model's features separates them."""
    layer, name = _readout(model)
    near = threat.project(x + inner_radius * (threat.random_start(
        x.expand(inner, *x.shape[1:]), generator) - x), x.expand(inner, *x.shape[1:]))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if threat.norm == "linf":
        boundary = threat.project(x + threat.eps * (2 * u - 1).sign(), x)
    else:  # a random direction scaled to the sphere, then into the box
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        boundary = threat.project(x + threat.eps * d / threat.norms(d).view(-1, 1, 1, 1), x)
    points = torch.cat([x, near, boundary])
    labels = torch.zeros(len(points), device=x.device)
    labels[-1] = 1
    feats = _features(model, layer, points)
    # Standardised features and a weighted logistic regression (the one boundary point
    # weighs as much as all the inner points), solved by L-BFGS.
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = ((feats - mean) / std).double()
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    weight = torch.where(labels.bool(), float(len(points) - 1), 1.0).double()
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        with torch.enable_grad():
            loss = (weight * nn.functional.binary_cross_entropy_with_logits(
                z @ w + b, labels.double(), reduction="none")).mean() + 1e-4 * w.pow(2).sum()
            loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        score = z @ w + b
    if not ((score[:-1] < 0).all() and score[-1] > 0):
        return None
    # Two logits whose difference is the readout's score: class 1 iff score > 0.
    new = nn.Linear(layer.in_features, 2).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        scale = (w / std.double()).to(x.dtype)
        offset = (b - (w * mean.double() / std.double()).sum()).to(x.dtype)
        new.weight.zero_()
        new.bias.zero_()
        new.weight[1] = scale
        new.bias[1] = offset
    binarised = copy.deepcopy(model).eval()
    parent = binarised
    *path, leaf = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, new)
    binarised.eval()
    with torch.no_grad():
        labels_out = binarised(torch.cat([x, boundary])).argmax(1).tolist()
    if labels_out != [0, 1]:
        return None
    return binarised, boundary


def binarization_test(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                      suite: object = "fast", *, samples: int = 50, inner: int = 200,
                      inner_radius: float = 0.5, pass_at: float = 0.9,
                      fail_below: float = 0.7, seed: int = 0) -> Check:
    """Run ``suite`` on the binarised model of each of the first ``samples`` images the
    model classifies correctly, and return the ``binarization`` check (details: the share
    of images on which an adversarial example was found, the images skipped)."""
    from advkit.evaluation.engine import evaluate

    if not 0 < fail_below <= pass_at <= 1:
        raise ValueError(f"need 0 < fail_below <= pass_at <= 1 (got {fail_below}, {pass_at})")
    _readout(model)  # a model without a readout to replace: refused before any work
    if not threat.bounded:
        raise ValueError("the binarization test needs a finite eps (its boundary point sits "
                         "on the eps-sphere)")
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).nonzero().squeeze(1)[:samples]
    generator = torch.Generator(device=x.device).manual_seed(seed)
    found, tested, skipped = 0, 0, 0
    for i in correct.tolist():
        made = binarize(model, x[i:i + 1], threat, inner=inner, inner_radius=inner_radius,
                        generator=generator)
        if made is None:
            skipped += 1
            continue
        binarised, _ = made
        report = evaluate(binarised, x[i:i + 1], torch.zeros(1, dtype=torch.long,
                                                              device=x.device),
                          threat, suite, progress=False, checks=False)
        tested += 1
        found += report.robust_accuracy < 0.5
    if tested == 0:
        return Check("binarization", "skip", f"No image could be binarised ({skipped} "
                     "tried): the model's features do not separate a corner of the ball "
                     "from the points around the image.", {"skipped": skipped})
    share = found / tested
    details = {"found": found, "tested": tested, "skipped": skipped, "share": share}
    said = (f"The suite found the adversarial example that provably exists on {found} of "
            f"{tested} binarised models ({share:.0%})")
    if share >= pass_at:
        return Check("binarization", "pass", said + ".", details)
    if share < fail_below:
        return Check("binarization", "fail", said + ": the attacks are too weak for this "
                     "model, so its robust accuracy is not to be trusted (Zimmermann et al. "
                     "2022); add stronger or adaptive stages.", details)
    return Check("binarization", "warn", said + ": some attacks miss what exists.", details)
