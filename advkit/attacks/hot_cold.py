"""The hot/cold attack (Rozsa, Rudd & Boult, 2016): several diverse adversarials per image."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from advkit.attacks._logits import top_other_classes
from advkit.attacks.base import Attack, Oracle, Taxonomy
from advkit.threat import ThreatModel

COLD = ("true", "all")
#: The line search starts no lower than s_max / 2**_MAX_DOUBLINGS.
_MAX_DOUBLINGS = 20


class HotCold(Attack):
    """One adversarial example per "hot" target class, each along its own hot/cold direction.

    Rozsa, Rudd, Boult. "Adversarial Diversity and Hard Positive Generation", CVPR
    workshops 2016. https://arxiv.org/abs/1605.01775

    For every hot class ``h`` (by default every class but the true one) the direction
    is the input gradient of ``z_h - z_cold``: the hot logit raised, the cold one
    (the true class, or with ``cold="all"`` the mean of all non-hot logits)
    suppressed. It is normalised to unit length in the threat model's norm and
    followed by a line search for the smallest scale ``s`` at which
    ``clip(x + s * d)`` is classified as ``h``: it starts at the first-order estimate
    of the scale where ``z_h - z_cold`` turns positive, doubles it (up to ``s_max``,
    eps or the box's diameter) until ``h`` is reached, then bisects the last bracket
    (its upper end is always a point that reached ``h``).

    Every candidate is returned: ``result.extras["candidates"]`` (N, K, C, H, W),
    ``"candidate_targets"`` (N, K), ``"candidate_success"`` (N, K, from a fresh,
    counted forward pass of all candidates) and ``"candidate_norms"`` (N, K, in the
    threat model's norm, inf where the candidate failed; a failed candidate is
    ``x`` itself). ``x_adv`` is the successful candidate of smallest norm per sample,
    or ``x`` where none succeeded (a minimal-perturbation attack: ``kind="minimal"``).

    The paper ranks candidates by its perceptual similarity score PASS (SSIM after
    an ECC alignment of the two images); PASS is not implemented here, candidates
    are measured and ranked by the threat model's norm (L2 by default).

    Without ``targets`` the result is untargeted (success = misclassified). With
    ``targets`` (N,) each sample has the single hot class ``targets[i]`` (K = 1) and
    success means reaching it.

    Args:
        threat: norm (``l2`` or ``linf``) and a cap eps on the scale (``float("inf")``:
            up to the box's diameter), bounds.
        hot: ``"all"`` (every class but the true one, K = classes - 1) or an int k:
            the k classes with the highest clean logits other than the true one. The
            attack holds N * K images at once, so on models with many classes
            (ImageNet's 1000) use a k.
        cold: ``"true"`` (the paper's: suppress the true class) or ``"all"``.
        bisection_steps: halvings of the bracket once a success is found (default 8:
            the scale is found to within 2**-8 of the bracket).
        seed: unused (the attack is deterministic); kept for the contract.
    """

    paper = "Rozsa et al. 2016, Adversarial Diversity and Hard Positive Generation"
    taxonomy = Taxonomy(frequency="one-time", perturbation="optimized")
    norms = ("l2", "linf")
    kind = "minimal"

    def __init__(self, threat: ThreatModel, *, hot: str | int = "all", cold: str = "true",
                 bisection_steps: int = 8, seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        if not (hot == "all" or (isinstance(hot, int) and not isinstance(hot, bool) and hot >= 1)):
            raise ValueError(f"hot must be 'all' or a number of classes >= 1 (got {hot!r})")
        if cold not in COLD:
            raise ValueError(f"unknown cold {cold!r}: use one of {', '.join(COLD)}")
        if bisection_steps < 0:
            raise ValueError(f"bisection_steps must be >= 0 (got {bisection_steps})")
        self.hot = hot
        self.cold = cold
        self.bisection_steps = bisection_steps

    def _hot_classes(self, clean_logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
        """(N, K) hot classes: the given targets, or the top (or all) non-true classes."""
        if targets is not None:
            return targets[:, None]
        classes = clean_logits.shape[1]
        k = classes - 1 if self.hot == "all" else self.hot
        if k > classes - 1:
            raise ValueError(f"hot={k} asks for more classes than the model's {classes - 1} "
                             "non-true classes; use hot='all'")
        return top_other_classes(clean_logits, y, k)

    def _direction(self, model: Oracle, xs: Tensor, hot: Tensor, cold: Tensor,
                   owner: Tensor) -> tuple[Tensor, Tensor]:
        """Unit-norm (threat norm) input gradients of the hot logit minus the cold term,
        and the first-order estimate of the scale at which that difference turns positive.
        """
        all_cold = self.cold == "all"

        def objective(logits: Tensor) -> Tensor:
            z_hot = logits.gather(1, hot[:, None]).squeeze(1)
            if all_cold:
                z_cold = (logits.sum(1) - z_hot) / (logits.shape[1] - 1)
            else:
                z_cold = logits.gather(1, cold[:, None]).squeeze(1)
            return z_hot - z_cold

        logits, grad = model.gradient(xs, objective, rows=owner)
        size = self.threat.norms(grad).clamp_min(1e-12)
        direction = grad / size.view(-1, *([1] * (grad.dim() - 1)))
        # Moving s along the unit direction raises the objective by s * <grad, direction>.
        slope = (grad * direction).flatten(1).sum(1).clamp_min(1e-12)
        return direction, (-objective(logits)).clamp_min(0) / slope

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor, generator: torch.Generator | None,
             ) -> tuple[Tensor, dict[str, Tensor]]:
        n, shape = x.shape[0], x.shape[1:]
        hot = self._hot_classes(clean_logits, y, targets)              # (N, K)
        k = hot.shape[1]
        xs = x.repeat_interleave(k, dim=0)                             # (N*K, C, H, W)
        hs, ys = hot.reshape(-1), y.repeat_interleave(k)
        owner = torch.arange(n, device=x.device).repeat_interleave(k)  # the sample of each row
        direction, start = self._direction(model, xs, hs, ys, owner)
        s_max = (self.threat.eps if self.threat.bounded
                 else self.threat.max_eps(x[0].numel()))
        scale = self._line_search(model, xs, direction, hs, start, s_max, owner)  # inf: none
        found = torch.isfinite(scale)
        step = torch.where(found, scale, torch.zeros_like(scale))
        cands = self.threat.clip(xs + step.view(-1, *[1] * len(shape)) * direction)
        verified = model.labels(cands, rows=owner) == hs
        cands = torch.where(verified.view(-1, *[1] * len(shape)), cands, xs)
        norms = self.threat.norms(cands - xs)
        norms = torch.where(verified, norms, torch.full_like(norms, math.inf)).view(n, k)
        best = norms.argmin(1)
        cands = cands.view(n, k, *shape)
        x_adv = cands[torch.arange(n, device=x.device), best]
        any_ok = torch.isfinite(norms).any(1)
        x_adv = torch.where(any_ok.view(n, *[1] * len(shape)), x_adv, x)
        return x_adv, {"candidates": cands, "candidate_targets": hot,
                       "candidate_success": verified.view(n, k), "candidate_norms": norms}

    def _line_search(self, model: Oracle, xs: Tensor, direction: Tensor, hot: Tensor,
                     start: Tensor, s_max: float, owner: Tensor) -> Tensor:
        """Per row, the smallest scale found that reaches ``hot`` (inf where none does)."""
        m = xs.shape[0]
        expand = (-1, *[1] * (xs.dim() - 1))

        def reaches(rows: Tensor, s: Tensor) -> Tensor:
            point = self.threat.clip(xs[rows] + s.view(expand) * direction[rows])
            return model.labels(point, rows=owner[rows]) == hot[rows]

        floor = s_max * 2.0 ** -_MAX_DOUBLINGS
        s = start.clamp(floor, s_max)
        lo = torch.zeros_like(s)
        hi = torch.full_like(s, math.inf)
        todo = torch.arange(m, device=xs.device)
        while todo.numel():
            ok = reaches(todo, s[todo])
            hi[todo[ok]] = s[todo[ok]]
            failed = todo[~ok]
            lo[failed] = s[failed]
            todo = failed[s[failed] < s_max]  # double the rest, up to s_max
            s[todo] = (2 * s[todo]).clamp_max(s_max)
        bracketed = torch.isfinite(hi).nonzero().squeeze(1)
        for _ in range(self.bisection_steps):
            if bracketed.numel() == 0:
                break
            mid = (lo[bracketed] + hi[bracketed]) / 2
            ok = reaches(bracketed, mid)
            hi[bracketed[ok]] = mid[ok]
            lo[bracketed[~ok]] = mid[~ok]
        return hi
