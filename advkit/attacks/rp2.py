"""Robust Physical Perturbations, RP2 (Eykholt et al. 2018): a sticker confined to a mask.

The stop sign that a few black and white stickers turn into a speed limit. RP2 optimises a
perturbation ``delta`` that only exists inside a mask ``M`` (where the stickers go), added
to the object and clipped to the image range, so that the object's pictures under varying
viewing conditions are classified as the target:

    min_delta  lam * ||M . delta||_p  +  E_{x_i in X^V, T}  CE(f(T(clip(x_i + M . delta))), t)

X^V are pictures of the object, T the conditions (here :class:`~advkit.attacks.eot.
RandomTransforms`: rotation, shift, zoom, brightness, sampled afresh each step as in EOT).
Without a given mask the paper's recipe finds one: a first pass with the L1 norm and the
whole image as the mask, whose sparse result shows where the perturbation matters, then a
mask of the largest ``mask_area`` of the image (pixels, or ``block`` x ``block`` squares:
sticker-like regions) and a second pass with the L2 norm inside it.

Two uses:

- :meth:`RP2.fit` / :meth:`RP2.success`: the paper's setting, one sticker for one object
  fitted over a set of its pictures X^V and judged on held-out pictures under fresh
  transformations (a generator of another seed).
- ``RP2(threat)(model, x, y, targets=t)``: the registered attack, each image its own
  object (its X^V: its transformations), one sticker per image;
  ``result.extras["transform_success"]`` is the share of fresh transformations under which
  the stuck image is classified as its target, ``result.extras["mask"]`` the masks.

The paper's non-printability score (NPS: how far the sticker's colours are from the ones
a given printer reproduces, measured by printing a palette and photographing it) is off by
default: there is no printer here to measure. Pass ``printable=`` (K, C) colours and
``nps_weight`` to add Sharif et al.'s sum over the mask of the product of distances.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.attacks.base import (
    Attack,
    AttackResult,
    Oracle,
    Taxonomy,
    eval_mode,
    require_at_least,
)
from advkit.attacks.eot import (
    RandomTransforms,
    check_transforms,
    success_under_transforms,
    transformed_goal,
)
from advkit.corruptions import check_images
from advkit.models.access import ModelAccess
from advkit.threat import ThreatModel

#: The authors' Adam settings (gtsrb-cnn-attack/run_gennoise_yadav.sh): beta1 0.9,
#: beta2 0.999, epsilon 1e-4; their rate 0.25 is for a 256-pixel sign in [-0.5, 0.5].
_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-4


def check_mask(mask: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
    """``mask`` (H, W) as a boolean tensor, with a clear error unless it is a non-empty 0/1
    mask of the images' ``height`` and ``width`` (None: any size)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape (H, W) (got "
                        f"{type(mask).__name__})")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (H, W), one value per pixel (got "
                         f"{tuple(mask.shape)})")
    mh, mw = mask.shape
    height = mh if height is None else height
    width = mw if width is None else width
    if mh > height or mw > width:
        raise ValueError(f"the {mh}x{mw} mask is larger than the {height}x{width} images: "
                         "give a mask of the images' size")
    if (mh, mw) != (height, width):
        raise ValueError(f"the mask's shape ({mh}, {mw}) does not match the images' "
                         f"({height}, {width}): give a mask of the images' size, True "
                         "where the sticker goes")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be binary (0/1 or bool): True where the sticker goes")
        mask = mask.bool()
    if not mask.any():
        raise ValueError("the mask is empty: it must allow the sticker at least one pixel")
    return mask


def stick(x: Tensor, delta: Tensor, mask: Tensor) -> Tensor:
    """``clip(x + M . delta)``: the object with the sticker. Exactly ``x`` outside the
    mask (a select, not a product, so no rounding and no NaN leaks out). Broadcasts
    (N or 1, C, H, W) ``delta`` and (N or 1, H, W) ``mask``; differentiable in delta."""
    return torch.where(mask.unsqueeze(-3), (x + delta).clamp(0, 1), x)


def top_mask(importance: Tensor, area: float, block: int = 1) -> Tensor:
    """Per object, the mask of the ``area`` share of the image where ``importance`` (P, H,
    W) is largest: single pixels, or ``block`` x ``block`` squares (ranked by their mean
    importance; those cut by the border count what lies inside)."""
    p, h, w = importance.shape
    if block == 1:
        k = max(1, min(h * w, round(area * h * w)))
        flat = importance.reshape(p, -1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask.scatter_(1, flat.topk(k, dim=1).indices, True)
        return mask.view(p, h, w)
    tiles = F.avg_pool2d(importance.unsqueeze(1), block, ceil_mode=True).squeeze(1)
    th, tw = tiles.shape[-2:]
    k = max(1, min(th * tw, round(area * h * w / block ** 2)))
    chosen = torch.zeros((p, th * tw), dtype=torch.bool, device=importance.device)
    chosen.scatter_(1, tiles.reshape(p, -1).topk(k, dim=1).indices, True)
    chosen = chosen.view(p, th, tw).repeat_interleave(block, 1).repeat_interleave(block, 2)
    return chosen[:, :h, :w]


def non_printability(colours: Tensor, mask: Tensor, printable: Tensor) -> Tensor:
    """Sharif et al.'s non-printability score, per object: over the pixels in the mask,
    the sum of the products of the distances from the pixel's colour to each printable
    colour. ``colours`` (P, C, H, W), ``mask`` (P, H, W), ``printable`` (K, C)."""
    diff = colours.unsqueeze(1) - printable[None, :, :, None, None].to(colours)
    dist = diff.pow(2).sum(2).clamp_min(1e-12).sqrt()          # (P, K, H, W)
    return (dist.prod(1) * mask).flatten(1).sum(1)


def _norm(v: Tensor, p: int) -> Tensor:
    flat = v.flatten(1)
    if p == 1:
        return flat.abs().sum(1)
    # The subgradient 0 at 0 (a zero sticker starts the L2 pass).
    return flat.pow(2).sum(1).clamp_min(1e-24).sqrt()


@dataclass
class _Pass:
    """One pass of RP2's optimisation (the settings shared by both uses)."""

    steps: int
    lam: float
    p: int
    lr: float
    samples: int
    transforms: RandomTransforms
    printable: Tensor | None
    nps_weight: float


def _optimise(model: Oracle, x: Tensor, owner: Tensor, targets: Tensor, mask: Tensor,
              cfg: _Pass, generator: torch.Generator | None,
              views: Callable[[], Tensor]) -> tuple[Tensor, Tensor, list[float]]:
    """Adam on one sticker per object (``mask`` (P, H, W)); ``x`` are the pictures, picture
    i of object ``owner[i]`` wanting ``targets[i]``; ``views()`` picks the pictures of a
    step. Returns the best sticker per object (the largest share of the step's sampled
    transformations sent to the target, then the lower loss), that share, and the mean
    share per step."""
    n_obj = mask.shape[0]
    delta = torch.zeros((n_obj, *x.shape[1:]), device=x.device, dtype=x.dtype,
                        requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr, betas=_ADAM_BETAS, eps=_ADAM_EPS)
    best = delta.detach().clone()
    best_rate = torch.full((n_obj,), -1.0, device=x.device)
    best_loss = torch.full((n_obj,), math.inf, device=x.device)
    history: list[float] = []
    for _ in range(cfg.steps):
        idx = views()
        rows = idx.repeat_interleave(cfg.samples)
        obj = owner[rows]
        params = cfg.transforms.sample(rows.shape[0], generator, x.device)
        with torch.enable_grad():
            stuck = stick(x[rows], delta[obj], mask[obj])
            xt = cfg.transforms.apply(stuck, params)
        goal = targets[rows]
        logits, grad_t = model.gradient(
            xt.detach(), lambda z, goal=goal: F.cross_entropy(z, goal, reduction="none"),
            rows=rows)
        # Each object's loss is the mean over its rows this step.
        count = torch.bincount(obj, minlength=n_obj).clamp_min(1).to(x.dtype)
        with torch.enable_grad():
            reg = cfg.lam * _norm(mask.unsqueeze(1) * delta, cfg.p)
            if cfg.printable is not None and cfg.nps_weight > 0:
                # The colours printed are the stuck picture's inside the mask.
                nps = non_printability(stuck, mask[obj], cfg.printable) / count[obj]
                reg = reg + cfg.nps_weight * torch.zeros_like(reg).index_add(0, obj, nps)
            delta.grad = torch.autograd.grad(
                [xt, reg.sum()], delta,
                grad_outputs=[grad_t / count[obj].view(-1, 1, 1, 1), None])[0]
        ce = F.cross_entropy(logits, goal, reduction="none")
        hit = (logits.argmax(1) == goal).to(x.dtype)
        rate = torch.zeros(n_obj, device=x.device).index_add_(0, obj, hit) / count
        loss = torch.zeros(n_obj, device=x.device).index_add_(0, obj, ce) / count
        loss = loss + reg.detach()
        seen = torch.bincount(obj, minlength=n_obj) > 0
        keep = seen & ((rate > best_rate) | ((rate == best_rate) & (loss < best_loss)))
        best[keep], best_rate[keep], best_loss[keep] = (delta.detach()[keep], rate[keep],
                                                         loss[keep])
        history.append(hit.mean().item())
        opt.step()
        with torch.no_grad():
            # A larger step than the image's range changes nothing (the image is clipped).
            delta.clamp_(-1, 1)
    return best, best_rate, history


@dataclass
class RP2Result:
    """A fitted sticker: ``delta`` (C, H, W), zero outside ``mask`` (H, W); ``target``;
    ``history``: per step of the final pass, the share of that step's sampled (picture,
    transformation) pairs sent to the target; ``l1_delta``: the first pass's perturbation
    when the mask was found (else None); passes: images sent forward / backward."""

    delta: Tensor
    mask: Tensor
    target: int
    history: list[float] = field(default_factory=list)
    l1_delta: Tensor | None = None
    forward_passes: int = 0
    backward_passes: int = 0
    seconds: float = 0.0

    def apply(self, x: Tensor) -> Tensor:
        """The pictures ``x`` with the sticker: ``clip(x + M . delta)``."""
        return stick(x, self.delta.to(x).unsqueeze(0), self.mask.to(x.device).unsqueeze(0))


class RP2(Attack):
    """Robust Physical Perturbations: a targeted sticker confined to a mask, robust to
    viewing conditions.

    Eykholt, Evtimov, Fernandes, Li, Rahmati, Xiao, Prakash, Kohno, Song. "Robust
    Physical-World Attacks on Deep Learning Visual Classification", CVPR 2018.
    https://arxiv.org/abs/1707.08945

    Minimises ``lam * ||M . delta||_2`` plus the mean cross-entropy of the target over the
    object's pictures under ``samples`` random transformations per picture per step
    (Adam; the perturbation kept in [-1, 1], the stuck image clipped to [0, 1]). Without
    ``mask`` it first runs ``l1_steps`` with ``l1_lam * ||delta||_1`` over the whole image
    and keeps as the mask the ``mask_area`` share of the image where that perturbation is
    largest (``block`` x ``block`` squares when ``block`` > 1), as the paper. The kept
    sticker is the step's with the largest share of sampled transformations sent to the
    target (then the lowest loss), as the authors' code keeps its best.

    As an attack (``RP2(threat)(model, x, y, targets=t)``, targeted only) each image gets
    its own sticker; ``threat`` is ``l2`` with ``eps`` a cap on the sticker's norm
    (``float("inf")``: none, the paper's). See :meth:`fit` for the paper's setting, one
    sticker over several pictures of an object.

    Args:
        threat: ``ThreatModel("l2", eps)``, eps a cap (inf for none).
        mask: (H, W), True (1) where the sticker may go; None: found by the L1 pass.
        mask_area: the found mask's share of the image (0, 1].
        block: the found mask's unit, in pixels (1: single pixels).
        steps, lam: the L2 pass. l1_steps, l1_lam: the L1 pass (no given mask).
        lr: Adam's learning rate (per pass).
        samples: transformations per picture per step.
        transforms: their distribution (:class:`~advkit.attacks.eot.RandomTransforms`).
        batch_size: pictures per step of :meth:`fit` (all of them as an attack).
        eval_transforms: fresh transformations per image for the attack's measure
            (``extras["transform_success"]``; 0 skips it).
        eval_seed: their seed (default ``seed + 1``), never the crafting seed.
        printable, nps_weight: optional printable colours (K, C) and the NPS weight.
        seed: the crafting seed: the same seed gives the same sticker bit for bit with one
            torch thread; with more, CPU kernels may sum in another order and two fits
            differ slightly (measured at 2 threads).
    """

    paper = "Eykholt et al. 2018, Robust Physical-World Attacks on Deep Learning Visual " \
            "Classification"
    taxonomy = Taxonomy(specificity="targeted", frequency="iterative",
                        perturbation="optimized")
    norms = ("l2",)
    kind = "minimal"
    targeted_only = True

    def __init__(self, threat: ThreatModel | None = None, *, mask: Tensor | None = None,
                 mask_area: float = 0.1, block: int = 1, steps: int = 100,
                 lam: float = 0.01, l1_steps: int = 50, l1_lam: float = 0.002,
                 lr: float = 0.1, samples: int = 8,
                 transforms: RandomTransforms | None = None, batch_size: int = 32,
                 eval_transforms: int = 100, eval_seed: int | None = None,
                 printable: Tensor | None = None, nps_weight: float = 0.0,
                 seed: int | None = 0) -> None:
        super().__init__(threat if threat is not None else ThreatModel("l2", math.inf),
                         seed=seed)
        require_at_least(1, steps=steps, l1_steps=l1_steps, samples=samples,
                         batch_size=batch_size, block=block)
        require_at_least(0, eval_transforms=eval_transforms)
        if mask_area > 1:
            raise ValueError(f"a mask of area {mask_area} is larger than the image: "
                             "mask_area is the share of the image the sticker covers, in "
                             "(0, 1]")
        if not mask_area > 0:
            raise ValueError(f"mask_area must be a share of the image in (0, 1] (got "
                             f"{mask_area})")
        for name, value in (("lr", lr),):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 (got {value})")
        for name, value in (("lam", lam), ("l1_lam", l1_lam), ("nps_weight", nps_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 (got {value})")
        if mask is not None:
            mask = check_mask(mask)
        if printable is not None and (not isinstance(printable, Tensor)
                                      or printable.dim() != 2 or printable.shape[0] < 1):
            raise ValueError("printable must be a (K, C) tensor of K printable colours in "
                             "[0, 1]")
        eval_seed = check_transforms(transforms, seed, eval_seed)
        self.mask, self.mask_area, self.block = mask, mask_area, block
        self.steps, self.lam, self.l1_steps, self.l1_lam = steps, lam, l1_steps, l1_lam
        self.lr, self.samples, self.batch_size = lr, samples, batch_size
        self.transforms = transforms or RandomTransforms()
        self.eval_transforms, self.eval_seed = eval_transforms, eval_seed
        self.printable, self.nps_weight = printable, nps_weight

    def config(self) -> dict:
        cfg = super().config()
        cfg["transforms"] = asdict(self.transforms)
        cfg["mask"] = None if self.mask is None else int(self.mask.sum())
        if self.printable is not None:
            cfg["printable"] = self.printable.tolist()
        return cfg

    # -- the two passes ------------------------------------------------------------------

    def _pass(self, steps: int, lam: float, p: int) -> _Pass:
        return _Pass(steps=steps, lam=lam, p=p, lr=self.lr, samples=self.samples,
                     transforms=self.transforms, printable=self.printable,
                     nps_weight=self.nps_weight if p == 2 else 0.0)

    def _craft(self, model: Oracle, x: Tensor, owner: Tensor, targets: Tensor, n_obj: int,
               generator: torch.Generator | None, views: Callable[[], Tensor],
               ) -> tuple[Tensor, Tensor, Tensor, list[float], Tensor | None]:
        h, w = x.shape[-2:]
        l1_delta = None
        if self.mask is not None:
            mask = check_mask(self.mask, h, w).to(x.device).expand(n_obj, h, w)
        else:
            everywhere = torch.ones((n_obj, h, w), dtype=torch.bool, device=x.device)
            l1_delta, _, _ = _optimise(model, x, owner, targets, everywhere,
                                       self._pass(self.l1_steps, self.l1_lam, 1), generator,
                                       views)
            mask = top_mask(l1_delta.abs().sum(1), self.mask_area, self.block)
        delta, rate, history = _optimise(model, x, owner, targets, mask,
                                         self._pass(self.steps, self.lam, 2), generator, views)
        return delta * mask.unsqueeze(1), mask, rate, history, l1_delta

    # -- the paper's setting: one object, several pictures ----------------------------------

    def fit(self, model: nn.Module, x: Tensor, target: int) -> RP2Result:
        """One sticker for the object whose pictures are ``x`` (N, C, H, W in [0, 1]: X^V),
        sending them to class ``target`` under random transformations; each step takes
        ``batch_size`` pictures (seeded)."""
        start = time.perf_counter()
        check_images(x)
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ValueError(f"target must be a class index >= 0 (got {target!r})")
        if self.mask is not None:
            check_mask(self.mask, *x.shape[-2:])
        n = x.shape[0]
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.seed if self.seed is not None else 0)
        oracle = Oracle(model, n, device=x.device, who="RP2")
        oracle.check_first = lambda logits: _check_target(target, logits.shape[1])
        owner = torch.zeros(n, dtype=torch.long, device=x.device)
        goal = torch.full((n,), target, dtype=torch.long, device=x.device)
        k = min(self.batch_size, n)

        def views() -> Tensor:
            return torch.randperm(n, generator=generator, device=x.device)[:k]

        with eval_mode(model):
            delta, mask, _, history, l1_delta = self._craft(oracle, x, owner, goal, 1,
                                                            generator, views)
        return RP2Result(delta=delta[0], mask=mask[0], target=target, history=history,
                         l1_delta=None if l1_delta is None else l1_delta[0],
                         forward_passes=oracle.forward_passes,
                         backward_passes=oracle.backward_passes,
                         seconds=time.perf_counter() - start)

    def success(self, model: nn.Module, x: Tensor, y: Tensor, result: RP2Result, *,
                n: int = 100, seed: int | None = None) -> float:
        """Targeted success of the fitted sticker on pictures ``x`` (labels ``y``; held
        out: not used in :meth:`fit`): over those not labelled the target, the mean share
        of ``n`` fresh random transformations (generator ``seed``, default the attack's
        ``eval_seed``; never the crafting seed) under which the stuck picture is classified
        as the target."""
        check_images(x)
        seed = self.eval_seed if seed is None else seed
        if self.seed is not None and seed == self.seed:
            raise ValueError(f"seed must differ from the crafting seed ({self.seed}): "
                             "success is measured on transformations not used in crafting")
        check_mask(result.mask, *x.shape[-2:])
        keep = y != result.target
        if not keep.any():
            raise ValueError(f"every picture is labelled the target {result.target}: "
                             "targeted success needs pictures of other classes")
        stuck = result.apply(x[keep])
        goal = torch.full((stuck.shape[0],), result.target, dtype=torch.long,
                          device=x.device)
        rate = success_under_transforms(model, stuck, y[keep], goal,
                                        transforms=self.transforms, n=n, seed=seed)
        return float(rate.mean())

    # -- the attack: one sticker per image ----------------------------------------------------

    def __call__(self, model: nn.Module | ModelAccess, x: Tensor, y: Tensor,
                 targets: Tensor | None = None, **options: Tensor | None) -> AttackResult:
        """As :meth:`Attack.__call__`; a given mask that does not fit the images is
        refused before any model pass."""
        if self.mask is not None and isinstance(x, Tensor) and x.dim() == 4:
            check_mask(self.mask, *x.shape[-2:])
        return super().__call__(model, x, y, targets, **options)

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None,
             ) -> tuple[Tensor, dict[str, Tensor]]:
        assert targets is not None  # targeted_only: the base refuses a call without
        n = x.shape[0]
        everyone = torch.arange(n, device=x.device)
        delta, mask, _, _, _ = self._craft(model, x, everyone, targets, n, generator,
                                           lambda: everyone)
        x_adv = stick(x, delta, mask)
        extras: dict[str, Tensor] = {"mask": mask}
        if self.eval_transforms:
            fresh = torch.Generator(device=x.device).manual_seed(self.eval_seed)
            extras["transform_success"] = transformed_goal(
                lambda images, r: model.logits(images, rows=r), x_adv, y, targets,
                self.transforms, self.eval_transforms, fresh, 2000)
        return x_adv, extras


def _check_target(target: int, classes: int) -> None:
    if not 0 <= target < classes:
        raise ValueError(f"target {target} is not a class of a model with {classes} classes")


__all__ = ["RP2", "RP2Result", "check_mask", "non_printability", "stick", "top_mask"]
