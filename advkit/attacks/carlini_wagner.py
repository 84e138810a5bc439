"""The Carlini-Wagner minimal-norm attacks (Carlini & Wagner, 2017): L2 and Linf.

Both optimise in "tanh space": the image is ``x' = lo + (hi - lo) * (tanh(w) + 1) / 2``,
so every ``w`` gives an image inside the box and Adam can run without projections.
The attack term is the logit margin ``f(x') = max(Z_y - max_{i != y} Z_i, -kappa)``
(untargeted) or ``max(max_{i != t} Z_i - Z_t, -kappa)`` (targeted): it reaches its
floor ``-kappa`` exactly when the example is adversarial with a margin of at least kappa.
As in the authors' code, the loss uses ``f + kappa >= 0`` (same gradients).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from advkit.attacks._const_search import (
    abort_check,
    check_common,
    check_search,
    check_tolerance,
    hinge,
    is_count,
    search_const,
    start_search,
    within_budget,
)
from advkit.attacks._logits import margin as logit_margin
from advkit.attacks.base import Attack, Oracle, Taxonomy
from advkit.threat import ThreatModel

#: The reference code maps the box into tanh space with this factor so that atanh stays finite.
_TANH_SHRINK = 0.999999
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
#: The authors' Adam learning rates (L2, Linf) at their 1000 steps per run.
_PAPER_L2_LR, _PAPER_LINF_LR, _PAPER_STEPS = 1e-2, 5e-3, 1000


def _to_tanh_space(x: Tensor, bounds: tuple[float, float]) -> Tensor:
    lo, hi = bounds
    return torch.atanh(((x - lo) / (hi - lo) * 2 - 1) * _TANH_SHRINK)


def _from_tanh_space(w: Tensor, bounds: tuple[float, float]) -> Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * (torch.tanh(w) + 1) / 2


def _tanh_jacobian(w: Tensor, bounds: tuple[float, float]) -> Tensor:
    """d x' / d w, elementwise."""
    return (1 - torch.tanh(w) ** 2) * (bounds[1] - bounds[0]) / 2


def _adam(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, t: Tensor | int,
          lr: float) -> Tensor:
    """One Adam step (Kingma & Ba) in place on ``m`` and ``v``; returns the new ``param``.

    ``t`` is the 1-based step count, an int or a per-sample tensor (N,).
    """
    b1, b2 = _ADAM_BETAS
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    if isinstance(t, Tensor):
        t = t.to(param.dtype).view(-1, *([1] * (param.dim() - 1)))
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return param - lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)


def _scaled_lr(paper_lr: float, steps: int) -> float:
    """The paper's learning rate at its 1000 steps, scaled by ``1000 / steps`` for fewer."""
    if not is_count(steps):
        return paper_lr  # the step count is refused by the checks
    return paper_lr * max(1.0, _PAPER_STEPS / steps)


class CarliniWagnerL2(Attack):
    """The smallest L2 perturbation found by penalised optimisation in tanh space.

    Carlini, Wagner. "Towards Evaluating the Robustness of Neural Networks",
    IEEE S&P 2017. https://arxiv.org/abs/1608.04644

    For each sample it minimises ``||x' - x||_2^2 + c * f(x')`` over ``w``, with
    ``x' = (tanh(w) + 1) / 2`` scaled to the bounds and ``f`` the logit margin clipped
    at ``-confidence`` (see the module docstring), by Adam from ``x' = x``. A binary
    search over ``c`` runs per sample as in the authors' code: c grows tenfold until a
    run succeeds, then bisects between the largest failing and the smallest
    succeeding c. Every step of every run is a candidate: the result is, per sample,
    the adversarial iterate with the smallest L2 norm (margin above ``confidence``),
    or ``x`` where there was none.

    Where the search starts and when it stops decide the cost. The paper starts every
    sample at c = 1e-3 and runs all 9 search steps; on MNIST the smallest successful c
    is about 0.05 to 1, so the first runs fail for nothing, and the last bisections
    move the norm by well under 1%. By default (``initial_const=None``) each sample
    starts instead at twice the c at which the model linearised at ``x`` would put the
    minimiser exactly on the boundary, ``4 (m + kappa) / ||grad m||^2`` with ``m`` the
    margin (one gradient pass; see :func:`estimate_const`), and stops searching at
    its first success (``search_tolerance=1``). On the test MNIST CNN (first 200 test
    images, all broken either way) this default costs 101 gradient passes per image (the
    estimate's included) and finds a median L2 of 1.59 (mean 1.63), against 715 passes
    for a median of 1.55 (mean 1.58) with the paper's search (``initial_const=1e-3,
    search_tolerance=0``, 9 search steps, at 100 steps each). A sample whose first run
    fails still gets larger values of c, up to ``search_steps`` runs, so a poor estimate
    costs time, not success; but where gradients are masked (a distilled model) the
    estimate can be far too large, which gives larger perturbations: there the paper's
    search is the safer choice.

    Work saved without changing the method: samples the model already gets wrong (by
    more than ``confidence``) are returned as they are (norm 0) and cost no gradient;
    the paper's early abort (loss not below 0.9999 of its value ``steps // 10`` steps
    earlier) is applied per sample, which is what the authors' code does for a batch
    of one image, so a result does not depend on the other images in the batch, and
    samples leave the working batch as soon as their run or their search is over.
    One change to that rule: a run that has already found an adversarial example stops
    only after three such stalled checks in a row (each against the lowest loss at an
    earlier check). Near the boundary the loss jumps up whenever an iterate falls back
    across it, so one stalled check there often ends a run that is still shrinking its
    example; the authors' batch-wide abort hides this
    because the other images' losses still fall. Measured on the first 200 MNIST test
    images with the paper's search: 6% more gradient passes (715 vs 674 per image), mean
    L2 1.5843 instead of 1.5903, the same as with no early abort at all (1.5843 at 900
    passes; two checks in a row: 710 passes, 1.5846; on 1,000 images three checks cost
    0.8% more passes than two and lower the mean from 1.5441 to 1.5438).

    With a finite eps in the threat model (a cap), samples whose smallest example is
    larger than eps are returned unchanged (``success`` False, as the contract says).

    Args:
        threat: norm ``"l2"``; eps is a cap (``float("inf")`` for none); bounds.
        steps: Adam steps per value of c. The paper uses 1000 (its code allows up to
            10000 with early abort); the default 100, with the learning rate scaled to
            0.1, costs a tenth and on the test MNIST CNN (first 20 test images, all
            broken by both, the paper's search) gives a mean L2 2.6% above the
            1000-step one (1.51 vs 1.48).
        search_steps: the most values of c tried per sample (binary search steps;
            paper: 9, the default).
        initial_const: the first c: a number for every sample (paper: 1e-3), or None
            (default) for the per-sample estimate described above.
        search_tolerance: a sample stops searching once a run has succeeded and the
            bracket ``[lower, upper]`` on c has ``upper - lower <= search_tolerance *
            upper``. 1 (default) stops at the first success; 0 runs all
            ``search_steps`` as the paper does; 0.05 skips the bisections that refine
            c by less than 5%.
        confidence: kappa, the logit margin an example must exceed (paper: 0);
            larger values give larger, more confidently misclassified examples.
        learning_rate: Adam's step size in tanh space. Default: the paper's 0.01 at its
            1000 steps, scaled by ``1000 / steps`` for fewer steps (0.1 at the default
            100). Fewer steps need larger ones: pixels at 0 or 1 sit at ``|w| = 7.25``
            and Adam moves ``w`` by about the learning rate per step, so at 100 steps
            of 0.01 they cannot move at all (the attack then breaks only 11 of the
            first 20 MNIST test images). On models whose inputs are not saturated, a
            smaller rate than the default can give smaller norms.
        abort_early: stop a sample's run when its loss has stopped decreasing (see
            above; False runs every step of every run).
        seed: unused (the attack is deterministic); kept for the common signature.
    """

    paper = "Carlini & Wagner 2017, Towards Evaluating the Robustness of Neural Networks"
    taxonomy = Taxonomy(frequency="iterative", perturbation="optimized")
    norms = ("l2",)
    kind = "minimal"

    def __init__(
        self, threat: ThreatModel, *, steps: int = 100, search_steps: int = 9,
        initial_const: float | None = None, search_tolerance: float = 1.0,
        confidence: float = 0.0, learning_rate: float | None = None, abort_early: bool = True,
        seed: int | None = 0,
    ) -> None:
        super().__init__(threat, seed=seed)
        if learning_rate is None:
            learning_rate = _scaled_lr(_PAPER_L2_LR, steps)
        check_common(steps, learning_rate, confidence)
        check_search(search_steps, initial_const, allow_estimate=True)
        check_tolerance(search_tolerance)
        self.steps = steps
        self.search_steps = search_steps
        self.initial_const = None if initial_const is None else float(initial_const)
        self.search_tolerance = float(search_tolerance)
        self.confidence = float(confidence)
        self.learning_rate = float(learning_rate)
        self.abort_early = abort_early

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor, generator: torch.Generator | None) -> Tensor:
        best, best_norm, todo = start_search(x, clean_logits, y, targets, self.confidence)
        w0 = _to_tanh_space(x, self.threat.bounds)
        search_const(
            model, x, y, targets, todo,
            lambda const, todo: self._descend(model, x, w0, y, targets, const, todo, best,
                                              best_norm),
            initial_const=self.initial_const, search_steps=self.search_steps,
            search_tolerance=self.search_tolerance, confidence=self.confidence)
        return within_budget(best, x, self.threat)

    def _descend(self, model: Oracle, x: Tensor, w0: Tensor, y: Tensor,
                 targets: Tensor | None, const: Tensor, todo: Tensor, best: Tensor,
                 best_norm: Tensor) -> Tensor:
        """One run of Adam at fixed c on the samples ``todo``; updates ``best`` in place.

        Returns, per sample of ``todo``, whether any iterate of this run was adversarial.
        """
        bounds, kappa = self.threat.bounds, self.confidence
        success = torch.zeros(todo.numel(), dtype=torch.bool, device=x.device)
        local = torch.arange(todo.numel(), device=x.device)   # position in todo
        idx = todo                                              # position in the batch
        xa, wa, ya, ca = x[idx], w0[idx], y[idx], const[idx]
        ta = targets[idx] if targets is not None else None
        modifier = torch.zeros_like(xa)
        m, v = torch.zeros_like(xa), torch.zeros_like(xa)
        prev = torch.full_like(ca, math.inf)
        stalls = torch.zeros_like(ca, dtype=torch.long)
        check_every = max(1, self.steps // 10)
        lo, hi = bounds
        for step in range(self.steps):
            # tanh(w) once per step: the image and the Jacobian d x' / d w both need it.
            tanh_w = torch.tanh(wa + modifier)
            x_adv = lo + (hi - lo) * (tanh_w + 1) / 2
            jac = (1 - tanh_w * tanh_w) * (hi - lo) / 2
            logits, grad_f = model.gradient(
                x_adv, lambda z, c=ca, yy=ya, tt=ta: c * hinge(z, yy, tt, kappa), rows=idx)
            delta = x_adv - xa
            dist2 = (delta * delta).flatten(1).sum(1)
            margin = logit_margin(logits, ya, ta)
            adversarial = margin < -kappa
            dist = dist2.sqrt()
            better = adversarial & (dist < best_norm[idx])
            best[idx[better]] = x_adv[better]
            best_norm[idx[better]] = dist[better]
            success[local[adversarial]] = True
            if self.abort_early and step % check_every == 0:
                loss = dist2 + ca * (margin + kappa).clamp_min(0)
                keep, prev, stalls = abort_check(loss, prev, stalls, success[local])
                if not keep.all():
                    local, idx, xa, wa, ya, ca, jac, delta, grad_f, modifier, m, v, prev, stalls = (
                        t[keep] for t in (local, idx, xa, wa, ya, ca, jac, delta, grad_f,
                                          modifier, m, v, prev, stalls))
                    ta = ta[keep] if ta is not None else None
                    if idx.numel() == 0:
                        break
            grad_w = (2 * delta + grad_f) * jac
            modifier = _adam(modifier, grad_w, m, v, step + 1, self.learning_rate)
        return success


class CarliniWagnerLinf(Attack):
    """The smallest Linf perturbation found by C&W's shrinking-tau penalty iteration.

    Carlini, Wagner. "Towards Evaluating the Robustness of Neural Networks",
    IEEE S&P 2017, Section VI-C. https://arxiv.org/abs/1608.04644

    The Linf norm is hard to descend (its gradient moves one coordinate), so the
    paper minimises ``c * f(x') + sum_i max(|x'_i - x_i| - tau, 0)`` instead, in the
    same tanh space as the L2 attack, with Adam. Starting from ``tau = hi - lo``:

    1. run Adam (at most ``steps`` steps) until an iterate is adversarial and its
       loss is below ``1e-4 * c`` (every ``|delta_i|`` is within tau);
    2. on success, set ``tau = 0.9 * min(tau, max_i |delta_i|)``, keep the iterate
       and start again from it (warm start, fresh Adam state); stop once tau is
       below ``(hi - lo) / 256``;
    3. on failure, double c (keeping the iterate and Adam's state) and go back to 1;
       stop once c reaches ``largest_const``.

    The result is the last success, i.e. the smallest Linf example found, or ``x``
    where none was found. This follows the authors' code (learning rate 5e-3 at 1000
    steps, c from 1e-5 to 20, factor 2, decrease 0.9), batched: each sample runs its
    own state machine (own tau, c, warm start and Adam step count) and leaves the
    batch when done, so its result does not depend on the other images in the batch.
    Two additions, both documented below: ``abort_early`` ends an attempt whose loss
    has stalled (the final, failing tau otherwise costs ``steps`` passes for every
    doubling of c up to ``largest_const``, most of the work), and ``confidence``
    (kappa) for symmetry with the L2 attack (the paper's Linf attack has none; 0
    reproduces it). Samples already adversarial by more than ``confidence`` are
    returned as they are (norm 0). Cost per image: at most ``steps`` gradient passes
    per success (tau shrinks) and per failure (c doubles); on MNIST with the defaults
    about 950.

    With a finite eps in the threat model (a cap), samples whose smallest example
    is larger than eps are returned unchanged (``success`` False).

    Args:
        threat: norm ``"linf"``; eps is a cap (``float("inf")`` for none); bounds.
        steps: Adam steps per (tau, c) attempt (paper: 1000; default 100).
        initial_const: the first c (paper: 1e-5).
        largest_const: give up on a tau once c reaches this (paper: 20).
        const_factor: the factor c grows by after a failed attempt (paper: 2).
        decrease_factor: the factor tau shrinks by after a success (paper: 0.9).
        confidence: kappa, the logit margin an example must exceed (default 0).
        learning_rate: Adam's step size in tanh space. Default: the paper's 5e-3 at its
            1000 steps, scaled by ``1000 / steps`` for fewer (see :class:`CarliniWagnerL2`).
        abort_early: also end an attempt as failed (doubling c, keeping the iterate)
            when its loss has not dropped below 0.9999 of its value ``steps // 10``
            steps earlier, the L2 attack's abort rule. False runs every attempt for
            ``steps`` steps as the authors' code does; it costs about 2.7 times as
            many passes on MNIST for a median Linf 2% smaller.
        seed: unused (the attack is deterministic); kept for the common signature.
    """

    paper = "Carlini & Wagner 2017, Towards Evaluating the Robustness of Neural Networks"
    taxonomy = Taxonomy(frequency="iterative", perturbation="optimized")
    norms = ("linf",)
    kind = "minimal"

    def __init__(
        self, threat: ThreatModel, *, steps: int = 100, initial_const: float = 1e-5,
        largest_const: float = 20.0, const_factor: float = 2.0, decrease_factor: float = 0.9,
        confidence: float = 0.0, learning_rate: float | None = None, abort_early: bool = True,
        seed: int | None = 0,
    ) -> None:
        super().__init__(threat, seed=seed)
        if learning_rate is None:
            learning_rate = _scaled_lr(_PAPER_LINF_LR, steps)
        check_common(steps, learning_rate, confidence)
        if not (isinstance(initial_const, (int, float)) and 0 < initial_const < largest_const):
            raise ValueError(f"initial_const must be > 0 and below largest_const={largest_const} "
                             f"(got {initial_const!r})")
        if not (isinstance(largest_const, (int, float)) and math.isfinite(largest_const)):
            raise ValueError(f"largest_const must be a finite number (got {largest_const!r})")
        if not const_factor > 1:
            raise ValueError(f"const_factor must be > 1 (got {const_factor!r})")
        if not 0 < decrease_factor < 1:
            raise ValueError(f"decrease_factor must be in (0, 1) (got {decrease_factor!r})")
        self.steps = steps
        self.initial_const = float(initial_const)
        self.largest_const = float(largest_const)
        self.const_factor = float(const_factor)
        self.decrease_factor = float(decrease_factor)
        self.confidence = float(confidence)
        self.learning_rate = float(learning_rate)
        self.abort_early = abort_early

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor, generator: torch.Generator | None) -> Tensor:
        bounds, kappa = self.threat.bounds, self.confidence
        width = bounds[1] - bounds[0]
        best, best_norm, idx = start_search(x, clean_logits, y, targets, kappa)
        xa, ya = x[idx], y[idx]
        ta = targets[idx] if targets is not None else None
        start = _to_tanh_space(xa, bounds)          # warm start of the current tau
        modifier = torch.zeros_like(xa)
        m, v = torch.zeros_like(xa), torch.zeros_like(xa)
        adam_t = torch.zeros_like(idx)               # Adam steps since the last reset
        attempt = torch.zeros_like(idx)              # steps spent at the current (tau, c)
        tau = torch.full(idx.shape, width, device=x.device, dtype=x.dtype)
        const = torch.full_like(tau, self.initial_const)
        prev = torch.full_like(tau, math.inf)         # loss at the last abort check
        check_every = max(1, self.steps // 10)
        while idx.numel():
            w = start + modifier
            x_adv = _from_tanh_space(w, bounds)
            logits, grad_f = model.gradient(
                x_adv, lambda z, c=const, yy=ya, tt=ta: c * hinge(z, yy, tt, kappa), rows=idx)
            delta = x_adv - xa
            t = tau.view(-1, *([1] * (x.dim() - 1)))
            excess = (delta.abs() - t).clamp_min(0)
            margin = logit_margin(logits, ya, ta)
            loss = const * (margin + kappa).clamp_min(0) + excess.flatten(1).sum(1)
            worked = (margin < -kappa) & (loss < 1e-4 * const)
            # Success: record, shrink tau, warm-start from here with a fresh Adam.
            size = delta.flatten(1).abs().amax(1)
            better = worked & (size < best_norm[idx])
            best[idx[better]] = x_adv[better]
            best_norm[idx[better]] = size[better]
            tau = torch.where(worked, torch.minimum(tau, size) * self.decrease_factor, tau)
            grad_w = (torch.sign(delta) * (excess > 0) + grad_f) * _tanh_jacobian(w, bounds)
            adam_t = adam_t + 1
            moved = _adam(modifier, grad_w, m, v, adam_t, self.learning_rate)
            wk = worked.view_as(t)
            start = torch.where(wk, w, start)
            modifier = torch.where(wk, torch.zeros_like(moved), moved)
            m.masked_fill_(wk.expand_as(m), 0.0)
            v.masked_fill_(wk.expand_as(v), 0.0)
            adam_t = torch.where(worked, torch.zeros_like(adam_t), adam_t)
            # Failure: `steps` steps at this (tau, c), or (abort_early) a stalled loss.
            at_check = attempt % check_every == 0
            stalled = at_check & (loss > prev * 0.9999) & self.abort_early
            prev = torch.where(at_check, loss, prev)
            attempt = torch.where(worked, torch.zeros_like(attempt), attempt + 1)
            failed = ~worked & ((attempt >= self.steps) | stalled)
            const = torch.where(failed, const * self.const_factor, const)
            attempt = torch.where(failed, torch.zeros_like(attempt), attempt)
            prev = torch.where(worked | failed, torch.full_like(prev, math.inf), prev)
            done = (tau <= width / 256) | (const >= self.largest_const)
            if done.any():
                keep = ~done
                idx, xa, ya, start, modifier, m, v = (
                    z[keep] for z in (idx, xa, ya, start, modifier, m, v))
                adam_t, attempt, tau, const, prev = (
                    z[keep] for z in (adam_t, attempt, tau, const, prev))
                ta = ta[keep] if ta is not None else None
        return within_budget(best, x, self.threat)
