"""The sandwich: certified lower bounds beside the attacks' upper bounds, per image.

For each image the model classifies correctly, a certifier (IBP, CROWN, alpha-CROWN or
MILP from :mod:`advkit.verify`) gives a *certified radius*: the largest eps (up to the
run's) at which it proves every point of the ball classified correctly, found by bisection.
The attacks give an *empirical* bound from above: the norm of the smallest adversarial
perturbation any stage found (for a budgeted suite, of the one that broke the image). A
sound certifier and a correct attack can never cross: an image certified at eps that some
attack breaks within eps means one of them is wrong, and the check fails loudly (the run
is then marked unreliable).

At every eps of the curve, ``verified <= robust <= clean``: verified accuracy counts images
whose certified radius reaches eps, robust accuracy images no attack broke within eps.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from advkit.evaluation.checks import Check
from advkit.threat import ThreatModel
from advkit.verify.bounds import InputSet, network
from advkit.verify.certify import METHODS, _spec

#: Points of the accuracy-versus-eps curve (0 to the run's eps).
CURVE_POINTS = 11
#: How far above a radius a perturbation's norm may read and still count as within it.
TOLERANCE = 1e-6


def _region(x: Tensor, radii: Tensor, threat: ThreatModel) -> InputSet:
    """``ball(x_i, r_i) ∩ box`` with one radius per sample (bounds broadcast it)."""
    lo, hi = threat.bounds
    r = radii.view(-1, *([1] * (x.dim() - 1))).to(x)
    return InputSet(x, radii.view(-1, 1).to(x), threat.norm, (x - r).clamp(lo, hi),
                    (x + r).clamp(lo, hi))


def certified_radii(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                    method: str = "crown", *, upper: Tensor | None = None, steps: int = 8,
                    batch_size: int = 100, **options: object) -> tuple[Tensor, Tensor]:
    """Each image's certified radius in ``[0, threat.eps]``, by bisection.

    Args:
        model, x, y, threat: as for :func:`advkit.verify.certify` (images the model
            classifies correctly; others get radius 0).
        method: a name in :data:`advkit.verify.METHODS`.
        upper: (N,) optional radii known to be too large (an attack's distance): the
            bisection searches below them.
        steps: bisection steps below the first test at ``threat.eps`` (resolution
            ``eps / 2**steps``).
        batch_size: images bounded at once.
        options: the method's options (alpha-CROWN's steps, MILP's time_limit).

    Returns:
        ``(radii, verified)``: the certified radii (N,) and whether each image is
        certified at ``threat.eps`` itself.
    """
    if method not in METHODS:
        raise ValueError(f"unknown certification method {method!r}: use one of "
                         f"{', '.join(METHODS)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0 (got {steps})")
    params = list(model.parameters())
    x = x.to(params[0].dtype if params else x.dtype)
    net = network(model, x[:1])
    classes = net.num_classes
    spec = _spec(y, classes, x.dtype)
    with torch.no_grad():
        correct = model(x).argmax(1) == y

    def certified(rows: Tensor, radii: Tensor) -> Tensor:
        out = torch.zeros(len(rows), dtype=torch.bool, device=x.device)
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            region = _region(x[part], radii[start:start + batch_size], threat)
            with torch.no_grad():
                lower = METHODS[method](net, region, spec[part], margin_rows=classes - 1,
                                        **options)
            out[start:start + len(part)] = (lower[:, :classes - 1] > 0).all(dim=1)
        return out

    n = len(x)
    eps = torch.full((n,), float(threat.eps), dtype=torch.float64, device=x.device)
    radii = torch.zeros(n, dtype=torch.float64, device=x.device)
    verified = torch.zeros(n, dtype=torch.bool, device=x.device)
    todo = correct.nonzero().squeeze(1)
    if len(todo):
        verified[todo] = certified(todo, eps[todo])
    radii[verified] = float(threat.eps)
    # Bisection on the rest: certified at ``low``, not known at ``high``.
    rest = (correct & ~verified).nonzero().squeeze(1)
    low = torch.zeros(len(rest), dtype=torch.float64, device=x.device)
    high = eps[rest].clone()
    if upper is not None:
        high = torch.minimum(high, upper.to(high)[rest].clamp_min(0))
    for _ in range(steps if len(rest) else 0):
        mid = (low + high) / 2
        ok = certified(rest, mid)
        low = torch.where(ok, mid, low)
        high = torch.where(ok, high, mid)
    radii[rest] = low
    return radii, verified


def sandwich(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
             per_sample: list[dict], method: str = "crown", *, steps: int = 8,
             batch_size: int = 100, **options: object) -> Check:
    """The certification check of an evaluation run: per image, the certified radius
    beside the attacks' smallest perturbation, the three curves, and a ``fail`` where a
    certified image was broken (an unsound certifier or a wrong attack: either is a bug).

    ``per_sample`` holds the run's rows (``label``, ``clean_pred``, ``norm`` of the
    perturbation that broke the image, or None).
    """
    start = time.perf_counter()
    n = len(per_sample)
    found = torch.tensor([math.inf if r["norm"] is None else float(r["norm"])
                          for r in per_sample], dtype=torch.float64)
    correct = torch.tensor([r["clean_pred"] == r["label"] for r in per_sample])
    # The search starts at eps whatever the attacks found: a certifier that "proves" an
    # image an attack broke must be caught, not steered around.
    radii, verified = certified_radii(model, x, y, threat, method, steps=steps,
                                      batch_size=batch_size, **options)
    radii, verified = radii.cpu(), verified.cpu()
    # Crossings: certified at eps yet broken within eps, or a radius beyond the
    # perturbation an attack found (both impossible for sound bounds and true attacks).
    # Perturbations are float32 differences of images in [0, 1]: a norm found at eps reads
    # up to ~1e-7 above it, so "within e" allows TOLERANCE.
    crossed = correct & (found <= radii + TOLERANCE) & (radii > 0)
    crossed |= verified & (found <= threat.eps + TOLERANCE)
    grid = [threat.eps * k / (CURVE_POINTS - 1) for k in range(CURVE_POINTS)]
    clean = correct.float().mean().item() if n else 0.0
    curves = {
        "clean": [(e, clean) for e in grid],
        "robust (attacks)": [(e, (correct & (found > e + TOLERANCE)).float().mean().item()
                              if n else 0.0) for e in grid],
        f"verified ({method})": [(e, (correct & (radii >= e - 1e-12) & (
            (radii > 0) | (e == 0))).float().mean().item() if n else 0.0) for e in grid],
    }
    details = {
        "method": method, "eps": threat.eps, "norm": threat.norm, "steps": steps,
        "options": {k: v for k, v in options.items()},
        "verified_accuracy": (correct & verified).float().mean().item() if n else 0.0,
        "radius": radii.tolist(), "verified": verified.tolist(),
        "attack_norm": [None if math.isinf(v) else v for v in found.tolist()],
        "crossed": crossed.nonzero().squeeze(1).tolist(), "curves": curves,
        "seconds": time.perf_counter() - start,
    }
    share = details["verified_accuracy"]
    if crossed.any():
        idx = details["crossed"][:10]
        return Check("certification", "fail",
                     f"UNSOUND: {int(crossed.sum())} image(s) certified by {method} were "
                     f"broken by an attack within the certified radius (images {idx}): the "
                     "certifier or an attack is wrong; report this with the model", details)
    return Check("certification", "pass",
                 f"{method} certifies {share:.1%} of the images at eps {threat.eps:g} "
                 "(verified <= robust <= clean holds at every eps; no certified image was "
                 "broken)", details)
