"""The threat model: which perturbations an adversary may apply.

A :class:`ThreatModel` is a norm (``linf``, ``l2``, ``l1``), a budget ``eps`` in
pixel units of the [0, 1] scale, and the box ``bounds`` every valid image lies in.
Attacks, defenses and certifiers share it, so "eps=0.3 in Linf" means the same
thing everywhere.

Projections are onto the *intersection* of the eps-ball around the clean image
and the box. For Linf the intersection is a box, so clipping is exact. For L2 and
L1 "scale into the ball, then clip into the box" is not the projection (clipping
can move the point far from the nearest feasible one), so both are solved from
their optimality conditions:

* L2: the projection of ``v`` is ``clip(t * v)`` for the largest ``t`` in (0, 1]
  whose image stays in the ball. The squared norm of ``clip(t * v)`` is increasing,
  concave and piecewise linear in ``t^2``; Newton's method finds ``t`` exactly in a
  few steps (no sort).
* L1: the projection is ``sign(v) * clip(|v| - lam, 0, u)`` (soft thresholding,
  capped at the box). The threshold ``lam`` is found by bisection in float64;
  the returned point always lies inside the ball, and its distance from the
  exact projection is below 1e-6 of eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Norm = Literal["linf", "l2", "l1"]
NORMS: tuple[str, ...] = ("linf", "l2", "l1")

_ALIASES = {
    "linf": "linf", "inf": "linf", "l_inf": "linf", "li": "linf",
    "l2": "l2", "2": "l2", "l1": "l1", "1": "l1",
}


def canonical_norm(norm: str) -> str:
    """Return the canonical spelling of a norm name (``"Linf"`` -> ``"linf"``)."""
    key = str(norm).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
    return _ALIASES[key]


def norms(delta: Tensor, norm: str) -> Tensor:
    """Per-sample norm of a batch of perturbations, shape (N,)."""
    flat = delta.flatten(1)
    norm = canonical_norm(norm)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    return flat.abs().sum(dim=1)


@dataclass(frozen=True)
class ThreatModel:
    """A perturbation set: ``{x' : ||x' - x||_norm <= eps, lo <= x' <= hi}``.

    Args:
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        eps: the budget in pixel units of the [0, 1] scale (0.3 on MNIST Linf,
            8/255 on CIFAR-10 Linf). ``float("inf")`` means unbounded: minimal-norm
            attacks read eps as a cap, and inf as "no cap".
        bounds: the box valid images lie in.
    """

    norm: str = "linf"
    eps: float = 0.3
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", canonical_norm(self.norm))
        eps = float(self.eps)
        if math.isnan(eps) or eps < 0:
            raise ValueError(f"eps must be >= 0 (got {self.eps})")
        lo, hi = (float(b) for b in self.bounds)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise ValueError(f"bounds must be finite with lo < hi (got {self.bounds})")
        if self.norm == "linf" and math.isfinite(eps) and eps > hi - lo:
            raise ValueError(
                f"eps={eps} is larger than the box allows for linf (at most {hi - lo}): "
                f"every image in the box would be allowed; use eps <= {hi - lo} (a budgeted "
                "attack needs a finite eps), or eps=float('inf') with a minimal-norm attack"
            )
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "bounds", (lo, hi))

    @property
    def bounded(self) -> bool:
        """True when eps is finite (a budget), False for eps=inf (no cap)."""
        return math.isfinite(self.eps)

    def max_eps(self, dim: int) -> float:
        """The largest meaningful eps for images of ``dim`` values: the box's diameter."""
        width = self.bounds[1] - self.bounds[0]
        return {"linf": width, "l2": width * math.sqrt(dim), "l1": width * dim}[self.norm]

    def check_eps_for(self, x: Tensor) -> None:
        """Raise if eps exceeds the diameter of the box for images shaped like ``x``."""
        if not self.bounded:
            return
        limit = self.max_eps(x[0].numel())
        if self.eps > limit * (1 + 1e-6):
            raise ValueError(
                f"eps={self.eps} is larger than the box allows for {self.norm} on images of "
                f"{x[0].numel()} values (at most {limit:.4g}); use eps <= {limit:.4g} (a budgeted "
                "attack needs a finite eps), or eps=float('inf') with a minimal-norm attack"
            )

    def norms(self, delta: Tensor) -> Tensor:
        """Per-sample norms of ``delta`` in this threat model's norm."""
        return norms(delta, self.norm)

    def clip(self, x: Tensor) -> Tensor:
        """Clip into the box."""
        return x.clamp(*self.bounds)

    def project(self, x_adv: Tensor, x: Tensor, eps: Tensor | float | None = None) -> Tensor:
        """Project ``x_adv`` onto the eps-ball around ``x`` intersected with the box.

        ``eps`` overrides the budget: a float, or a per-sample tensor of shape (N,).
        """
        eps = self.eps if eps is None else eps
        if self.norm == "linf" and not isinstance(eps, Tensor):
            # The hot path of every Linf attack step: clamp into [x - eps, x + eps], then
            # into the box (exact: the two intervals meet, both contain x). Five passes
            # over the batch instead of the nine of the general perturbation form.
            lo, hi = self.bounds
            return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(lo, hi)
        return x + project_delta(x_adv - x, x, eps, self.norm, self.bounds)

    def random_start(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A point drawn uniformly from the eps-ball around ``x``, then clipped into the box.

        Linf: uniform in the cube. L2 and L1: uniform in the ball (direction from a
        Gaussian or Laplace sample, radius eps * U^(1/d)). Requires a finite eps.
        """
        if not self.bounded:
            raise ValueError("random_start needs a finite eps")
        return self.clip(x + random_in_ball(x.shape, self.eps, self.norm, x, generator))


def random_in_ball(
    shape: torch.Size, eps: float | Tensor, norm: str, like: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Uniform samples from the eps-ball of ``norm`` (one per row of ``shape``)."""
    norm = canonical_norm(norm)
    opts = {"device": like.device, "dtype": like.dtype, "generator": generator}
    n, dim = shape[0], math.prod(shape[1:])
    eps_col = _per_sample(eps, n, like).view(n, 1)
    if norm == "linf":
        u = torch.rand((n, dim), **opts)
        return ((2 * u - 1) * eps_col).view(shape)
    # Uniform in a p-ball: direction from the p-generalised Gaussian, radius from U^(1/d).
    if norm == "l2":
        direction = torch.randn((n, dim), **opts)
    else:
        u = torch.rand((n, dim), **opts).clamp_min(torch.finfo(like.dtype).tiny)
        sign = torch.randint(0, 2, (n, dim), device=like.device, generator=generator) * 2 - 1
        direction = -torch.log(u) * sign.to(like.dtype)
    direction = direction / norms(direction, norm).clamp_min(1e-12).view(n, 1)
    radius = torch.rand((n, 1), **opts) ** (1.0 / dim)
    return (direction * radius * eps_col).view(shape)


def _per_sample(eps: float | Tensor, n: int, like: Tensor) -> Tensor:
    if isinstance(eps, Tensor):
        return eps.to(device=like.device, dtype=like.dtype).reshape(-1).expand(n)
    return torch.full((n,), float(eps), device=like.device, dtype=like.dtype)


def project_delta(
    delta: Tensor, x: Tensor, eps: float | Tensor, norm: str, bounds: tuple[float, float],
) -> Tensor:
    """Project a perturbation ``delta`` so that ``x + delta`` is in ball(x, eps) and the box.

    Pure torch, batched; ``eps`` is a float or a per-sample tensor (N,).
    """
    norm = canonical_norm(norm)
    lo_box = bounds[0] - x  # <= 0 since x is inside the box
    hi_box = bounds[1] - x  # >= 0
    n = x.shape[0]
    eps_t = _per_sample(eps, n, x)
    if norm == "linf":
        e = eps_t.view(n, *([1] * (x.dim() - 1)))
        return torch.maximum(torch.minimum(delta, torch.minimum(hi_box, e)),
                             torch.maximum(lo_box, -e))
    flat_shape = (n, -1)
    v, lo, hi = delta.reshape(flat_shape), lo_box.reshape(flat_shape), hi_box.reshape(flat_shape)
    if norm == "l2":
        out = _project_l2_box(v, lo, hi, eps_t)
    else:
        out = _project_l1_box(v, lo, hi, eps_t)
    return out.view_as(delta)


def _project_l2_box(v: Tensor, lo: Tensor, hi: Tensor, eps: Tensor) -> Tensor:
    """Exact projection of each row of ``v`` onto ``{||p||_2 <= eps, lo <= p <= hi}``.

    The KKT conditions give ``p = clip(t * v)`` with ``t = 1 / (1 + mu)`` in (0, 1].
    In ``s = t^2`` the squared norm ``G(s) = sum_i min(s * v_i^2, b_i^2)`` (``b_i``: the
    bound in ``v_i``'s direction) is increasing, concave and piecewise linear, so Newton's
    method on ``G(s) = eps^2`` is exact in finitely many steps: every tangent lies above
    ``G``, so the first step from ``s = 1`` lands at or below the root and the following
    ones climb to it monotonically, each solving ``s * F + C = eps^2`` (``F``: sum of
    ``v_i^2`` over the coordinates still free, ``C``: sum of ``b_i^2`` over those clipped);
    the iteration stops moving exactly when the clipped set stops growing. On PGD's
    iterates (MNIST) that takes 2 or 3 steps; the whole projection then costs about a
    tenth of sorting every row's breakpoints (``benchmarks/overhead.py``).

    Computed in the dtype of ``v`` (float32 images get float32 rounding, the precision of
    the result anyway; float64 is exact to rounding).
    """
    v2 = v * v
    # b = hi where v > 0, lo where v < 0 (either where v = 0: v_i^2 = 0 then, and b_i^2 only
    # counts if b_i = 0). hi - lo reaches past both bounds, so clamping it, signed like v,
    # gives b; on CPU this is several times faster than torch.where.
    b2 = torch.minimum(torch.maximum(torch.copysign(hi - lo, v), lo), hi).square()
    e2 = eps.to(v.dtype).square()
    g = torch.minimum(v2, b2).sum(dim=1)  # G(1) = ||clip(v)||^2
    outside = g > e2
    if not bool(outside.any()):
        return torch.minimum(torch.maximum(v, lo), hi)  # clipping is the projection
    s = torch.ones_like(e2)
    f_prev = None
    buf, buf_clipped = torch.empty_like(v2), torch.empty_like(v2)
    # Newton visits each breakpoint at most once, so the cap never stops an exact run.
    for _ in range(v.shape[1] + 2):
        sv2 = s[:, None] * v2
        # F = sum of v_i^2 where s * v_i^2 < b_i^2 (free). Comparing into a float buffer
        # and multiplying in place avoids casting a boolean mask (several times slower).
        f = torch.lt(sv2, b2, out=buf).mul_(v2).sum(dim=1)
        # The free sets at successive points are nested, so an unchanged F means an
        # unchanged set: the last step solved the right piece of G and s is the root.
        if f_prev is not None and torch.equal(f, f_prev):
            break
        # C summed directly: the Newton step written as s + (eps^2 - G(s)) / F is the same
        # root on paper but cancels catastrophically when the root is tiny (s ~ 1e-14).
        c = torch.ge(sv2, b2, out=buf_clipped).mul_(b2).sum(dim=1)
        # f = 0: every coordinate is clipped and G is flat at G(s) > eps^2 (s = 1 only):
        # restart from s = 0, where every coordinate that can move is free.
        root = torch.where(f > 0, (e2 - c) / torch.where(f > 0, f, 1.0), 0.0)
        s = torch.where(outside, root.clamp(0, 1), s)
        f_prev = f
    solved = torch.minimum(torch.maximum(v * s.sqrt()[:, None], lo), hi)
    # Guard against rounding: never leave the ball.
    scale = (eps.to(v.dtype) / solved.norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
    return solved * scale[:, None]


def _project_l1_box(v: Tensor, lo: Tensor, hi: Tensor, eps: Tensor) -> Tensor:
    clipped = torch.minimum(torch.maximum(v, lo), hi)
    outside = clipped.abs().sum(dim=1) > eps
    if not outside.any():
        return clipped
    rows = outside.nonzero().squeeze(1)
    vr, lor, hir, er = v[rows].double(), lo[rows].double(), hi[rows].double(), eps[rows].double()
    a = vr.abs()
    cap = torch.where(vr > 0, hir, -lor)  # how far the box lets coordinate i move
    er_col = er.unsqueeze(1)

    def mass(lam: Tensor) -> Tensor:
        return torch.minimum((a - lam).clamp_min(0), cap).sum(dim=1, keepdim=True)

    # mass(0) > eps (else not outside) and mass(max|v|) = 0, so the root is bracketed.
    lam_lo = torch.zeros_like(er_col)
    lam_hi = a.amax(dim=1, keepdim=True)
    for _ in range(60):
        mid = (lam_lo + lam_hi) / 2
        too_big = mass(mid) > er_col
        lam_lo = torch.where(too_big, mid, lam_lo)
        lam_hi = torch.where(too_big, lam_hi, mid)
    solved = torch.sign(vr) * torch.minimum((a - lam_hi).clamp_min(0), cap)
    out = clipped.clone()
    out[rows] = solved.to(v.dtype)
    return out
