"""``certify``: per-sample certificates of robustness from bound propagation.

``certify(model, x, y, threat, method="crown")`` proves, for each image, that every point of
the threat model's set (the eps-ball around ``x`` intersected with the input box) is
classified ``y``: a lower bound on every logit margin ``z_y - z_j`` above zero. Bounds are
sound but incomplete: an image not verified may still be robust (MILP, later, decides).

Methods are plain functions in :data:`METHODS`, one entry each, so a new one (MILP) is a
function and a line::

    method(net, region, spec, *, margin_rows, **options) -> lower bounds (N, S)

bounding ``spec · logits`` (``spec``: N, S, classes) from below over ``region``; the first
``margin_rows`` rows are the margins that decide verification (a method may stop working
on a sample once they are all positive), the rest bound the logits themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from advkit.progress import progress_bar
from advkit.threat import ThreatModel
from advkit.verify.bounds import (
    InputSet,
    Interval,
    Network,
    alpha_crown_lower,
    backward_lower,
    ibp_lower,
    interval_bounds,
    layer_bounds,
    network,
)


@dataclass(frozen=True)
class Certificate:
    """What bound propagation proved about each image.

    Attributes:
        method: ``"ibp"``, ``"crown"``, ``"alpha-crown"`` or ``"milp"``.
        threat: the threat model certified against.
        verified: (N,) bool: every margin lower bound is > 0, so every point of the set is
            classified as the label (and the clean image too).
        lower_bounds: (N, classes): a lower bound on ``z_y - z_j`` over the set for each
            class ``j``; ``+inf`` at ``j == y`` (no margin to the label itself), so
            ``lower_bounds.min(1).values`` is the certified worst-case margin.
        logit_lower, logit_upper: (N, classes): bounds on every logit over the set.
        seconds: wall time of the whole call.
        options: the method's settings (alpha-CROWN's steps and learning rate).
    """

    method: str
    threat: ThreatModel
    verified: Tensor
    lower_bounds: Tensor
    logit_lower: Tensor
    logit_upper: Tensor
    seconds: float
    options: dict = field(default_factory=dict)

    @property
    def verified_accuracy(self) -> float:
        """The share of images verified (a lower bound on robust accuracy)."""
        return float(self.verified.float().mean()) if len(self.verified) else 0.0


def _ibp(net: Network, region: InputSet, spec: Tensor, **_: object) -> Tensor:
    return ibp_lower(net, region, interval_bounds(net, region), spec)


def _crown(net: Network, region: InputSet, spec: Tensor, *, intersect_ibp: bool = True,
           **_: object) -> Tensor:
    bounds = layer_bounds(net, region, "crown", intersect_ibp=intersect_ibp)
    return _crown_lower(net, region, bounds, spec, intersect_ibp)


def _crown_lower(net: Network, region: InputSet, bounds: list[Interval], spec: Tensor,
                 intersect_ibp: bool) -> Tensor:
    """CROWN's lower bounds on ``spec · logits``; with ``intersect_ibp``, never below the
    interval bound from the same layer bounds. Both are sound, and neither dominates: on
    certifiably trained models the interval bound is often the tighter one (measured in
    benchmarks/RESULTS.md, "Certified training"), so the final bound, like the
    intermediate ones, keeps the better of the two at the cost of one interval pass."""
    lower = backward_lower(net, region, bounds, spec)
    if intersect_ibp:
        lower = torch.maximum(lower, ibp_lower(net, region, bounds, spec))
    return lower


def _alpha_crown(net: Network, region: InputSet, spec: Tensor, *, margin_rows: int,
                 steps: int = 20, lr: float = 0.1, intersect_ibp: bool = True,
                 **_: object) -> Tensor:
    bounds = layer_bounds(net, region, "crown", intersect_ibp=intersect_ibp)
    lower = _crown_lower(net, region, bounds, spec, intersect_ibp)
    # Optimise only the samples CROWN leaves unverified.
    todo = (lower[:, :margin_rows] <= 0).any(dim=1).nonzero().squeeze(1)
    if len(todo):
        sub = InputSet(region.center[todo], region.eps, region.norm, region.lower[todo],
                       region.upper[todo])
        sub_bounds = [(lo[todo], hi[todo]) for lo, hi in bounds]
        better = alpha_crown_lower(net, sub, sub_bounds, spec[todo], steps=steps, lr=lr)
        lower = lower.clone()
        lower[todo] = torch.maximum(lower[todo], better)
    return lower


def _milp(net: Network, region: InputSet, spec: Tensor, **options: object) -> Tensor:
    from advkit.verify.milp import milp_lower  # scipy's MILP: imported when asked for

    return milp_lower(net, region, spec, **options)


#: Certification methods by name (see the module docstring for the signature).
METHODS: dict[str, Callable[..., Tensor]] = {
    "ibp": _ibp, "crown": _crown, "alpha-crown": _alpha_crown, "milp": _milp,
}


def _spec(y: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """Rows: ``e_y - e_j`` for the ``classes - 1`` classes ``j != y``, then ``e_j`` and
    ``-e_j`` for every class (lower and upper logit bounds). (N, 3 * classes - 1, classes)."""
    n = len(y)
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    others = torch.arange(classes, device=y.device).expand(n, classes)
    others = others[others != y[:, None]].view(n, classes - 1)
    margins = eye[y].unsqueeze(1) - eye[others]
    logits = eye.expand(n, classes, classes)
    return torch.cat([margins, logits, -logits], dim=1)


def _check(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> None:
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be an advkit.ThreatModel (got {type(threat).__name__})")
    if not threat.eps >= 0:
        raise ValueError(f"eps must be >= 0 (got {threat.eps})")
    if not threat.bounded:
        raise ValueError("certify needs a finite eps (got inf): the set would be the whole box")
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"x must be (N, ...) and y (N,) with the same N (got x "
                         f"{tuple(x.shape)}, y {tuple(y.shape)})")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels (got dtype {y.dtype})")
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or inf values")
    lo, hi = threat.bounds
    if len(x) and (x.min() < lo or x.max() > hi):
        raise ValueError(f"x lies outside threat.bounds {threat.bounds} (min {x.min():.4g}, "
                         f"max {x.max():.4g}): pass images in the model's input range")
    params = [p for p in model.parameters()] + [b for b in model.buffers()]
    if params and params[0].device != x.device:
        raise ValueError(f"the model is on {params[0].device} and x on {x.device}: move them "
                         "to one device")


def certify(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
            method: str = "crown", *, steps: int = 20, lr: float = 0.1,
            time_limit: float = 60.0, batch_size: int | None = None,
            progress: bool = False, sigma: float | None = None,
            **smoothing: object) -> Certificate:
    """Certify each image's label against every perturbation in ``threat``'s set.

    Args:
        model: an eval-mode ``nn.Sequential`` chain of Linear, Conv2d, ReLU, Flatten,
            Normalize, BatchNorm (eval), AvgPool2d, MaxPool2d (see
            :data:`advkit.verify.bounds.SUPPORTED`), taking [0, 1] images to logits.
        x: (N, C, H, W) images inside ``threat.bounds``.
        y: (N,) labels.
        threat: the norm (linf, l2, l1), eps and box.
        method: ``"ibp"`` (interval bound propagation, Gowal et al. 2018), ``"crown"``
            (backward linear relaxation, Zhang et al. 2018; each margin keeps the better
            of CROWN's and the interval bound, so it is never looser than ``"ibp"``) or
            ``"alpha-crown"`` (CROWN with lower slopes optimised, Xu et al. 2021),
            ``"milp"`` (complete: each margin
            CROWN leaves unproven minimised exactly by HiGHS, Tjeng et al. 2019; Linf and
            L1 only, small ReLU networks; :func:`advkit.verify.milp.verify` also returns
            counter-examples), or any name in :data:`METHODS`.
        steps, lr: alpha-CROWN's Adam steps and learning rate on the slopes (only for the
            images CROWN leaves unverified).
        time_limit: MILP's solver seconds per image; where it runs out, the margin's
            bound is the solver's proven one and the image may stay unverified.
        sigma, smoothing: with ``method="smoothing"`` (L2 only): the noise level and
            :func:`advkit.verify.smoothing.certify_smoothing`'s options (``n0``, ``n``,
            ``alpha``, ``batch_size``, ``seed``); the result is a
            :class:`~advkit.verify.smoothing.SmoothingResult` about the *smoothed*
            classifier (``verified``, ``verified_accuracy`` at ``threat.eps``).
        batch_size: images bounded at once (all by default); a smaller one saves memory.
        progress: a progress bar over batches.

    Returns:
        A :class:`Certificate` (per-sample ``verified``, ``lower_bounds`` on the margins,
        logit bounds, time).

    Raises:
        ValueError: an unknown method, a negative or infinite eps, x outside the box, x and
            y of different lengths, a label out of range, a train-mode model, a layer
            bound propagation does not support (named with its position).
    """
    start = time.perf_counter()
    if method == "smoothing":
        # Randomised smoothing certifies another classifier (the smoothed one), by sampling:
        # not a bound method, so not in METHODS (the sandwich check refuses it).
        from advkit.verify.smoothing import certify_smoothing

        if sigma is None:
            raise ValueError("method='smoothing' needs sigma= (the noise the base model was "
                             "trained with, e.g. 0.25)")
        return certify_smoothing(model, x, y, threat, sigma=sigma, progress=progress,
                                 **smoothing)
    if sigma is not None or smoothing:
        raise ValueError("sigma= and the sampling options go with method='smoothing'")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}, "
                         "smoothing")
    _check(model, x, y, threat)
    params = list(model.parameters())
    if params:
        x = x.to(params[0].dtype)
    net = network(model, x[:1] if len(x) else torch.zeros(1, *x.shape[1:], dtype=x.dtype,
                                                                device=x.device))
    classes = net.num_classes
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes - 1}] for a model of {classes} "
                         f"classes (got {int(y.min())}..{int(y.max())})")
    options = ({"steps": steps, "lr": lr} if method == "alpha-crown"
               else {"time_limit": time_limit} if method == "milp" else {})
    size = batch_size or max(1, len(x))
    spec = _spec(y.to(x.device), classes, x.dtype)
    lower = []
    with torch.no_grad(), progress_bar(progress, f"certify ({method})", len(x)) as bar:
        for begin in range(0, len(x), size):
            chunk = slice(begin, begin + size)
            region = InputSet.from_threat(x[chunk], threat)
            lower.append(METHODS[method](net, region, spec[chunk], margin_rows=classes - 1,
                                         **options))
            bar.advance(steps=len(x[chunk]))
    bounds = (torch.cat(lower) if lower
              else x.new_zeros(0, 3 * classes - 1))
    margins = bounds[:, :classes - 1]
    lower_bounds = torch.full((len(x), classes), float("inf"), dtype=x.dtype, device=x.device)
    others = ~torch.nn.functional.one_hot(y.to(x.device), classes).bool()
    lower_bounds[others] = margins.reshape(-1)
    return Certificate(
        method=method, threat=threat, verified=(margins > 0).all(dim=1),
        lower_bounds=lower_bounds, logit_lower=bounds[:, classes - 1:2 * classes - 1],
        logit_upper=-bounds[:, 2 * classes - 1:], seconds=time.perf_counter() - start,
        options=options)
