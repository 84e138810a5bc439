"""Adversarial patch (Brown, Mané, Roy, Abadi & Gilmer 2017): one universal sticker.

A square patch covering a stated fraction of the image, trained so that wherever it is
pasted, on whatever image, the model answers the target class; judged on held-out images
at fresh random positions. Unlike the eps-ball attacks the patch replaces the pixels it
covers (no norm bound), so it is exported beside the registered attacks, not registered:
the registry's ``attack(model, x, y)`` crafts per image, the patch is fitted once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.attacks.base import eval_mode, require_at_least
from advkit.corruptions import check_images


@dataclass
class PatchResult:
    """A fitted patch and what fitting it cost.

    ``patch``: (C, side, side) in [0, 1]; ``history``: the mean targeted success on the
    training batches, per step; passes: images sent forward / backward while fitting.
    """

    patch: Tensor
    target: int
    area: float
    history: list[float] = field(default_factory=list)
    forward_passes: int = 0
    backward_passes: int = 0
    seconds: float = 0.0


def patch_side(area: float, height: int, width: int) -> int:
    """The side of a square patch covering ``area`` of an H x W image (at least 1 pixel);
    a clear error when it does not fit."""
    if not 0 < area <= 1:
        raise ValueError(f"area must be a fraction of the image in (0, 1] (got {area})")
    side = max(1, round(math.sqrt(area * height * width)))
    if side > min(height, width):
        raise ValueError(f"a square patch of area {area} ({side}x{side} pixels) is larger "
                         f"than the {height}x{width} image: use area <= "
                         f"{min(height, width) ** 2 / (height * width):.3g}")
    return side


def random_positions(n: int, side: int, height: int, width: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """(n, 2) top-left corners (row, column), uniform over the places the patch fits."""
    rows = torch.randint(0, height - side + 1, (n,), generator=generator)
    cols = torch.randint(0, width - side + 1, (n,), generator=generator)
    return torch.stack([rows, cols], dim=1)


def apply_patch(x: Tensor, patch: Tensor, positions: Tensor) -> Tensor:
    """Paste ``patch`` (C, s, s) onto each image of ``x`` at its top-left ``positions``
    (n, 2). Differentiable in the patch (and in x outside it)."""
    n, c, h, w = x.shape
    s = patch.shape[-1]
    if patch.shape != (c, s, s):
        raise ValueError(f"the patch must have shape ({c}, side, side) for images with {c} "
                         f"channels (got {tuple(patch.shape)})")
    if s > min(h, w):
        raise ValueError(f"the {s}x{s} patch is larger than the {h}x{w} images")
    # Pad the patch to the image at each position: a sum of shifted copies, no in-place
    # writes, so gradients reach the patch from every image.
    canvas, mask = [], []
    ones = torch.ones((1, s, s), dtype=x.dtype, device=x.device)
    for top, left in positions.tolist():
        pad = (left, w - s - left, top, h - s - top)
        canvas.append(F.pad(patch, pad))
        mask.append(F.pad(ones, pad))
    canvas_t, mask_t = torch.stack(canvas), torch.stack(mask)
    return x * (1 - mask_t) + canvas_t * mask_t


class AdversarialPatch:
    """A universal targeted patch of ``area`` (fraction of the image), at random positions.

    Brown, Mané, Roy, Abadi, Gilmer. "Adversarial Patch", 2017.
    https://arxiv.org/abs/1712.09665

    :meth:`fit` maximises the expected log-probability of ``target`` over training images
    and random positions (the paper's expectation over locations; its rotations and
    scales are left out here) with Adam, ``steps`` batches of ``batch_size`` images, the
    patch kept in [0, 1]. :meth:`success` measures the targeted success on other images
    (held out: those not labelled ``target``), each at ``positions`` fresh random places
    drawn from their own seed.

    Args:
        target: the class the patch asks for.
        area: the patch's share of the image (a square, side rounded).
        steps, batch_size, lr: the optimisation.
        seed: the patch's start and the fitting's batches and positions.
    """

    paper = "Brown et al. 2017, Adversarial Patch"

    def __init__(self, target: int, *, area: float = 0.1, steps: int = 200,
                 batch_size: int = 32, lr: float = 0.05, seed: int = 0) -> None:
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ValueError(f"target must be a class index >= 0 (got {target!r})")
        if area > 1:
            raise ValueError(f"a patch of area {area} is larger than the image: area is the "
                             "fraction of the image the patch covers, in (0, 1]")
        if not area > 0:
            raise ValueError(f"area must be a fraction of the image in (0, 1] (got {area})")
        require_at_least(1, steps=steps, batch_size=batch_size)
        if not lr > 0:
            raise ValueError(f"lr must be > 0 (got {lr})")
        self.target, self.area, self.steps = target, area, steps
        self.batch_size, self.lr, self.seed = batch_size, lr, seed

    def fit(self, model: nn.Module, x: Tensor) -> PatchResult:
        """Fit the patch on training images ``x`` (N, C, H, W in [0, 1])."""
        start = time.perf_counter()
        check_images(x)
        n, c, h, w = x.shape
        side = patch_side(self.area, h, w)
        g = torch.Generator().manual_seed(self.seed)
        patch = torch.rand((c, side, side), generator=g).to(x).requires_grad_(True)
        opt = torch.optim.Adam([patch], lr=self.lr)
        result = PatchResult(patch=patch.detach(), target=self.target, area=self.area)
        with eval_mode(model):
            for _ in range(self.steps):
                idx = torch.randint(0, n, (min(self.batch_size, n),), generator=g)
                pos = random_positions(idx.shape[0], side, h, w, g)
                with torch.enable_grad():
                    logits = model(apply_patch(x[idx], patch, pos))
                    if not 0 <= self.target < logits.shape[1]:
                        raise ValueError(f"target {self.target} is not a class of a model "
                                         f"with {logits.shape[1]} classes")
                    goal = torch.full((idx.shape[0],), self.target, device=x.device)
                    loss = F.cross_entropy(logits, goal)
                    opt.zero_grad()
                    loss.backward()
                opt.step()
                with torch.no_grad():
                    patch.clamp_(0, 1)
                result.forward_passes += idx.shape[0]
                result.backward_passes += idx.shape[0]
                result.history.append((logits.argmax(1) == goal).float().mean().item())
        result.patch = patch.detach().clone()
        result.seconds = time.perf_counter() - start
        return result

    def success(self, model: nn.Module, x: Tensor, y: Tensor, patch: Tensor | PatchResult,
                *, positions: int = 10, seed: int = 1) -> float:
        """Targeted success on ``x`` (labels ``y``): the fraction of (image, position)
        pairs classified as the target, over the images not labelled the target, each at
        ``positions`` random places drawn from ``seed``."""
        if isinstance(patch, PatchResult):
            patch = patch.patch
        check_images(x)
        require_at_least(1, positions=positions)
        keep = y != self.target
        if not keep.any():
            raise ValueError(f"every image is labelled the target {self.target}: targeted "
                             "success needs images of other classes")
        xs = x[keep]
        side = patch.shape[-1]
        g = torch.Generator().manual_seed(seed)
        hits = 0
        with eval_mode(model), torch.no_grad():
            for _ in range(positions):
                pos = random_positions(xs.shape[0], side, *x.shape[-2:], g)
                hits += int((model(apply_patch(xs, patch.to(x), pos)).argmax(1)
                             == self.target).sum())
        return hits / (xs.shape[0] * positions)
