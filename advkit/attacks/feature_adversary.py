"""Feature adversaries (Sabour et al., 2016): an image whose representation is another's."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn

from advkit.attacks.base import (
    Attack,
    AttackResult,
    Oracle,
    Taxonomy,
    check_inputs,
    eval_mode,
    require_at_least,
)
from advkit.models.access import ModelAccess, allows, as_access
from advkit.threat import ThreatModel


class FeatureAdversary(Attack):
    """Make ``x`` look like a guide image to one layer of the model, within an eps-ball.

    Sabour, Cao, Faghri, Fleet. "Adversarial Manipulation of Deep Representations",
    ICLR 2016. https://arxiv.org/abs/1511.05122

    Solves ``min ||phi_k(x') - phi_k(g)||_2^2  s.t.  ||x' - x||_inf <= eps`` and x' in
    the box, where ``phi_k`` is the output of layer ``k`` and ``g`` the guide image.
    The paper uses L-BFGS-B with box constraints; here it is projected steepest
    descent in pure torch: ``steps`` steps along the sign of the gradient (Linf; the
    normalised gradient for L2), of a length that decays linearly from ``step_size``
    to ``step_size / steps`` so the iterate settles, each followed by the projection
    onto the ball and the box. The point with the smallest feature distance seen is
    kept per sample.

    Guides: give them to the constructor (``guides=``) or take a configured copy with
    :meth:`with_guides`. Shape (N, C, H, W) matching ``x``, or (1, C, H, W) for one
    guide shared by every image. The attack is targeted at the guides' classes: the
    targets are the model's predictions on the guides (one counted forward pass), and
    success means ``x_adv`` is classified as its guide is. ``targets=`` is therefore
    refused, and so is a guide the model puts in its source image's true class.

    ``result.extras``: ``"feature_distance_before"`` (N,) is ``||phi_k(x) - phi_k(g)||_2``
    and ``"feature_distance"`` (N,) the same for ``x_adv``.

    Args:
        threat: norm (linf, the paper's; or l2), eps (the paper uses 10/255 on ImageNet),
            bounds.
        layer: the representation: a module name from ``model.named_modules()`` (such as
            ``"features.3"``) or, for an ``nn.Sequential`` model, an index (negative
            counts from the end). The layer's output must be a tensor.
        guides: the guide images, or None to give them later with :meth:`with_guides`.
        steps: descent steps (default 100).
        step_size: the first step's length in the threat model's norm (default
            ``eps / 4``).
        seed: unused (the attack is deterministic); kept for the contract.
    """

    paper = "Sabour et al. 2016, Adversarial Manipulation of Deep Representations"
    taxonomy = Taxonomy(specificity="targeted", frequency="iterative")
    norms = ("linf", "l2")

    def __init__(self, threat: ThreatModel, *, layer: str | int, guides: Tensor | None = None,
                 steps: int = 100, step_size: float | None = None,
                 seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        if isinstance(layer, bool) or not isinstance(layer, str | int):
            raise TypeError(f"layer must be a module name (str) or an index into an "
                            f"nn.Sequential (int) (got {type(layer).__name__})")
        require_at_least(1, steps=steps)
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0 (got {step_size})")
        if guides is not None and not isinstance(guides, Tensor):
            raise TypeError(f"guides must be a torch.Tensor of images (got "
                            f"{type(guides).__name__})")
        self.layer = layer
        self.steps = steps
        self.step_size = step_size if step_size is not None else threat.eps / 4
        self._guides = guides.detach() if guides is not None else None

    def with_guides(self, guides: Tensor) -> FeatureAdversary:
        """A copy of this attack with ``guides`` (N or 1, C, H, W) as its guide images."""
        if not isinstance(guides, Tensor):
            raise TypeError(f"guides must be a torch.Tensor of images (got "
                            f"{type(guides).__name__})")
        other = copy.copy(self)
        other._guides = guides.detach()
        return other

    def config(self) -> dict:
        cfg = super().config()
        cfg["guides"] = list(self._guides.shape) if self._guides is not None else None
        return cfg

    def __call__(self, model: nn.Module | ModelAccess, x: Tensor, y: Tensor,
                 targets: Tensor | None = None) -> AttackResult:
        """Attack ``model`` on ``x`` towards the guides' representations (see the class)."""
        start = time.perf_counter()
        if targets is not None:
            raise ValueError("FeatureAdversary takes its targets from the guides (the model's "
                             "predictions on them); pass guides, not targets=")
        if self._guides is None:
            raise ValueError("FeatureAdversary needs guide images: FeatureAdversary(threat, "
                             "layer=..., guides=g) or attack.with_guides(g)")
        access = as_access(model)
        if not allows(access.level, self.access):
            return super().__call__(model, x, y)  # refused there, with the common message
        x, y, _ = check_inputs(access, x, y, None, self.threat)
        guides = self._check_guides(x)
        module = resolve_layer(access.module, self.layer)
        guide_pass = Oracle(access, x.shape[0], device=x.device, who=self.name)
        with eval_mode(access.module):
            with capture(module) as feats:
                guide_labels = guide_pass.labels(guides)
            same = guide_labels == y
            if same.any():
                raise ValueError(f"{int(same.sum())} guides are classified as their source "
                                 "image's true class; a guide must come from another class")
            # The layer and the guides' features travel on a copy made for this call, so
            # the configured attack keeps no per-call state (and may be called concurrently).
            worker = copy.copy(self)
            worker._work = (module, feats["out"])
            result = Attack.__call__(worker, access, x, y, guide_labels)
        return replace(result, forward_passes=result.forward_passes + guide_pass.forward_passes,
                       queries=result.queries + guide_pass.queries,
                       seconds=time.perf_counter() - start)

    def _check_guides(self, x: Tensor) -> Tensor:
        g = self._guides
        if g.dim() != 4 or g.shape[1:] != x.shape[1:] or g.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"guides must have shape ({x.shape[0]} or 1, "
                             f"{', '.join(map(str, x.shape[1:]))}) to match x (got "
                             f"{tuple(g.shape)})")
        if not g.is_floating_point() or not torch.isfinite(g).all():
            raise ValueError("guides must be finite floating-point images")
        lo, hi = self.threat.bounds
        if g.min() < lo or g.max() > hi:
            raise ValueError(f"guides have values outside the bounds {self.threat.bounds}")
        return g.to(device=x.device, dtype=x.dtype).expand_as(x)

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor, generator: torch.Generator | None,
             ) -> tuple[Tensor, dict[str, Tensor]]:
        module, guide_feats = self._work
        n, expand = x.shape[0], (-1, *[1] * (x.dim() - 1))
        best, best_d = x.clone(), torch.full((n,), math.inf, device=x.device)
        before = best_d
        xa = x
        with capture(module) as feats:
            def distance(_: Tensor) -> Tensor:
                return (feats["out"] - guide_feats).flatten(1).pow(2).sum(1)

            for i in range(self.steps + 1):
                if i < self.steps:
                    _, grad = model.gradient(xa, lambda logits: -distance(logits))
                else:  # the last point only needs its distance
                    model.logits(xa)
                d = distance(clean_logits).detach()
                if i == 0:
                    before = d.sqrt()
                better = d < best_d
                best = torch.where(better.view(expand), xa, best)
                best_d = torch.where(better, d, best_d)
                if i < self.steps:
                    size = self.step_size * (1 - i / self.steps)
                    xa = self.threat.project(xa + size * _steepest(grad, self.threat.norm), x)
        return best, {"feature_distance_before": before, "feature_distance": best_d.sqrt()}


def _steepest(grad: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return grad.sign()
    size = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / size.view(-1, *[1] * (grad.dim() - 1))


def resolve_layer(model: nn.Module, layer: str | int) -> nn.Module:
    """The module ``layer`` names in ``model`` (a ``named_modules`` name, or a Sequential index).

    Raises ValueError listing the valid names when there is no such module.
    """
    names = dict(model.named_modules())
    if isinstance(layer, int):
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"layer={layer} is an index, which needs an nn.Sequential model "
                             f"(got {type(model).__name__}); use a module name: "
                             f"{_list(names)}")
        if not -len(model) <= layer < len(model):
            raise ValueError(f"layer={layer} is out of range for a Sequential of {len(model)} "
                             f"modules (valid: {-len(model)} to {len(model) - 1})")
        return model[layer]
    if layer not in names or layer == "":
        raise ValueError(f"the model has no layer {layer!r}; valid layer names: {_list(names)}")
    return names[layer]


def _list(names: dict[str, nn.Module]) -> str:
    shown = [f"{k} ({type(m).__name__})" for k, m in names.items() if k]
    return ", ".join(shown) if shown else "(none: the model has no submodules)"


@contextmanager
def capture(module: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record ``module``'s latest output in ``captured["out"]`` while the context is open."""
    captured: dict[str, Tensor] = {}

    def hook(_: nn.Module, __: object, output: object) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(f"layer {type(module).__name__} returns {type(output).__name__}, "
                            "not a tensor; choose a layer whose output is a tensor")
        captured["out"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


