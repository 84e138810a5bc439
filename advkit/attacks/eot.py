"""Expectation over Transformation (Athalye, Engstrom, Ilyas & Kwok 2018).

Physical adversarial examples must survive the camera: a small rotation, a shift, a
change of scale or of light. EOT maximises the loss in expectation over a distribution
of such transformations, estimated by a sample of them at every step, and is judged on
transformations it never saw: :func:`success_under_transforms` draws fresh ones from a
generator of its own seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from advkit.attacks.ascent import LOSSES, objective, steepest_direction
from advkit.attacks.base import Attack, Oracle, Taxonomy, goal_reached, require_at_least
from advkit.corruptions import affine
from advkit.threat import ThreatModel


@dataclass(frozen=True)
class RandomTransforms:
    """The distribution of transformations: per image, independently and uniformly, a
    rotation in [-rotation, rotation] degrees, a zoom in [scale_min, scale_max], a shift
    of up to ``translation`` of the side along each axis and a brightness change in
    [-brightness, brightness]; bilinear resampling with zeros outside, then clipped to
    [0, 1]. Differentiable in the image (torch ``affine_grid`` / ``grid_sample``)."""

    rotation: float = 15.0
    translation: float = 0.1
    scale_min: float = 0.9
    scale_max: float = 1.1
    brightness: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.rotation <= 180:
            raise ValueError(f"rotation must be in [0, 180] degrees (got {self.rotation})")
        if not 0 <= self.translation < 1:
            raise ValueError(f"translation must be a fraction of the side in [0, 1) (got "
                             f"{self.translation})")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max (got {self.scale_min}, "
                             f"{self.scale_max})")
        if not 0 <= self.brightness <= 1:
            raise ValueError(f"brightness must be in [0, 1] (got {self.brightness})")

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> Tensor:
        """Parameters of ``n`` transformations, (n, 5): angle (radians), zoom, shift x,
        shift y (fractions of the side), brightness change."""
        u = torch.rand((n, 5), generator=generator, device=device) * 2 - 1
        angle = u[:, 0] * math.radians(self.rotation)
        mid, half = (self.scale_max + self.scale_min) / 2, (self.scale_max - self.scale_min) / 2
        zoom = mid + half * u[:, 1]
        return torch.stack([angle, zoom, u[:, 2] * self.translation,
                            u[:, 3] * self.translation, u[:, 4] * self.brightness], dim=1)

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        """Transform each image of ``x`` by its row of ``params``."""
        angle, zoom, tx, ty, light = params.to(x).unbind(1)
        # affine_grid maps output coordinates to input ones: the inverse of "zoom, rotate,
        # then shift", i.e. rotate by -angle, divide by the zoom, shift back.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # Normalised coordinates span 2 across the image.
        sx, sy = -2 * tx, -2 * ty
        matrix = torch.stack([torch.stack([cos, sin, cos * sx + sin * sy], 1),
                              torch.stack([-sin, cos, -sin * sx + cos * sy], 1)], 1)
        out = affine(x, matrix) + light.view(-1, 1, 1, 1)
        return out.clamp(0, 1)


def check_transforms(transforms: object, seed: int | None, eval_seed: int | None) -> int:
    """Refuse a ``transforms`` that is not a :class:`RandomTransforms` (None: the default)
    and an ``eval_seed`` equal to the crafting ``seed``; return the measuring seed (default
    ``seed + 1``): the success under transformations is measured on ones not used in
    crafting."""
    if transforms is not None and not isinstance(transforms, RandomTransforms):
        raise TypeError("transforms must be an advkit.attacks.eot.RandomTransforms "
                        f"(got {type(transforms).__name__})")
    if eval_seed is None:
        eval_seed = (seed if seed is not None else 0) + 1
    if seed is not None and eval_seed == seed:
        raise ValueError(f"eval_seed must differ from seed ({seed}): the success under "
                         "transformations is measured on ones not used in crafting")
    return eval_seed


def transformed_goal(logits_fn: Callable[[Tensor, Tensor], Tensor], x_adv: Tensor,
                      y: Tensor, targets: Tensor | None, transforms: RandomTransforms,
                      n: int, generator: torch.Generator, batch: int) -> Tensor:
    """Per sample, the fraction of ``n`` transformations drawn from ``generator`` under
    which the goal holds; ``logits_fn(images, rows)`` is the model."""
    hits = torch.zeros(x_adv.shape[0], device=x_adv.device)
    per = max(1, batch // max(1, x_adv.shape[0]))
    rows_all = torch.arange(x_adv.shape[0], device=x_adv.device)
    done = 0
    while done < n:
        k = min(per, n - done)
        rows = rows_all.repeat_interleave(k)
        params = transforms.sample(rows.shape[0], generator, x_adv.device)
        with torch.no_grad():
            logits = logits_fn(transforms.apply(x_adv[rows], params), rows)
        goal = goal_reached(logits, y[rows], targets[rows] if targets is not None else None)
        hits.index_add_(0, rows, goal.float())
        done += k
    return hits / n


def success_under_transforms(model: nn.Module, x_adv: Tensor, y: Tensor,
                             targets: Tensor | None = None, *,
                             transforms: RandomTransforms | None = None, n: int = 100,
                             seed: int = 1, batch: int = 2000) -> Tensor:
    """Per image, the fraction of ``n`` random transformations (drawn from a generator
    seeded with ``seed``, so fresh to any attack crafted with another seed) under which
    ``x_adv`` still reaches its goal: misclassified (or classified as ``targets``).

    Athalye et al.'s measure of a robust adversarial example; use it on any attack's
    output (PGD's, EOT's) with the same seed to compare them on the same transformations.
    """
    require_at_least(1, n=n, batch=batch)
    transforms = transforms or RandomTransforms()
    generator = torch.Generator(device=x_adv.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        return transformed_goal(lambda images, rows: model(images), x_adv, y, targets,
                                 transforms, n, generator, batch)
    finally:
        model.train(was_training)


class EOT(Attack):
    """PGD on the expected loss over random transformations (rotation, shift, zoom, light).

    Athalye, Engstrom, Ilyas, Kwok. "Synthesizing Robust Adversarial Examples", ICML 2018.
    https://arxiv.org/abs/1707.07397

    Each step draws ``samples`` transformations per image, takes the gradient of the mean
    loss over the transformed images (through the differentiable transformations), steps
    along the threat model's steepest-ascent direction and projects onto the ball. There
    is no early exit: success on the untransformed image is not the goal. The iterate
    kept per image is the one that reached the goal under most of that step's sampled
    transformations (the last such on ties).

    ``result.extras["transform_success"]`` is, per image, the fraction of
    ``eval_transforms`` FRESH transformations under which ``x_adv`` reaches the goal:
    drawn from a generator seeded with ``eval_seed``, never the crafting one (its model
    passes are counted in the result). ``result.success`` stays the contract's: the goal
    on ``x_adv`` itself.

    Args:
        threat: norm (linf, l2) and eps.
        steps: iterations (default 40); step_size: default ``2.5 * eps / steps``.
        samples: transformations per image per step (the expectation's sample; paper: a
            mini-batch of them).
        transforms: the distribution (:class:`RandomTransforms`).
        eval_transforms: fresh transformations per image for the measure (default 100;
            0 skips it).
        eval_seed: their generator's seed (default: ``seed + 1``); must differ from
            ``seed``.
        loss: ``"ce"`` or ``"margin"``; random_start: from a uniform point of the ball.
    """

    paper = "Athalye et al. 2018, Synthesizing Robust Adversarial Examples"
    taxonomy = Taxonomy(frequency="iterative")
    norms = ("linf", "l2")

    def __init__(self, threat: ThreatModel, *, steps: int = 40,
                 step_size: float | None = None, samples: int = 10,
                 transforms: RandomTransforms | None = None, eval_transforms: int = 100,
                 eval_seed: int | None = None, loss: str = "ce", random_start: bool = True,
                 batch: int = 2000, seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        require_at_least(1, steps=steps, samples=samples, batch=batch)
        require_at_least(0, eval_transforms=eval_transforms)
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0 (got {step_size})")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
        eval_seed = check_transforms(transforms, seed, eval_seed)
        self.steps = steps
        self.step_size = step_size if step_size is not None else 2.5 * threat.eps / steps
        self.samples = samples
        self.transforms = transforms or RandomTransforms()
        self.eval_transforms = eval_transforms
        self.eval_seed = eval_seed
        self.loss = loss
        self.random_start = random_start
        self.batch = batch

    def config(self) -> dict:
        cfg = super().config()
        cfg["transforms"] = asdict(self.transforms)
        return cfg

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None,
             ) -> tuple[Tensor, dict[str, Tensor]]:
        n, k = x.shape[0], self.samples
        rows = torch.arange(n, device=x.device).repeat_interleave(k)
        yr = y[rows]
        tr = targets[rows] if targets is not None else None
        loss = objective(self.loss, yr, tr)
        xa = self.threat.random_start(x, generator) if self.random_start else x.clone()
        best, best_rate = xa.clone(), torch.full((n,), -1.0, device=x.device)
        for _ in range(self.steps):
            params = self.transforms.sample(rows.shape[0], generator, x.device)
            xg = xa.detach().requires_grad_(True)
            with torch.enable_grad():
                xt = self.transforms.apply(xg[rows], params)
            # The model's gradient at the transformed images, then back through the
            # transformations to the image itself: the expectation's gradient (summed
            # over the k samples; the steepest direction ignores the 1/k).
            logits, grad_t = model.gradient(xt.detach(), loss, rows=rows)
            (grad,) = torch.autograd.grad(xt, xg, grad_outputs=grad_t)
            rate = goal_reached(logits, yr, tr).float().view(n, k).mean(1)
            keep = rate >= best_rate
            best[keep], best_rate[keep] = xa[keep], rate[keep]
            direction = steepest_direction(grad, self.threat.norm, xa, self.threat.bounds)
            xa = self.threat.project(xa + self.step_size * direction, x)
        extras: dict[str, Tensor] = {}
        if self.eval_transforms:
            fresh = torch.Generator(device=x.device).manual_seed(self.eval_seed)
            extras["transform_success"] = transformed_goal(
                lambda images, r: model.logits(images, rows=r), best, y, targets,
                self.transforms, self.eval_transforms, fresh, self.batch)
        return best, extras
