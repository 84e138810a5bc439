"""Universal adversarial perturbations (Moosavi-Dezfooli et al., 2017): one v for all images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from advkit._files import atomic_path
from advkit.attacks.base import (
    Attack,
    Oracle,
    Taxonomy,
    check_inputs,
    check_logits,
    eval_mode,
    require_at_least,
)
from advkit.attacks.deepfool import DeepFool
from advkit.models.device import device_of
from advkit.progress import progress_bar
from advkit.threat import ThreatModel

FORMAT = "advkit-perturbation/1"
INNER = ("gradient", "deepfool")


class UniversalPerturbation(Attack):
    """One image-agnostic perturbation ``v`` that changes the model's prediction on most images.

    Moosavi-Dezfooli, Fawzi, Fawzi, Frossard. "Universal adversarial perturbations",
    CVPR 2017. https://arxiv.org/abs/1610.08401

    :meth:`fit` runs the paper's Algorithm 1 on a fitting set: starting from
    ``v = 0``, pass over the images in a random order; for the images whose
    prediction ``k(x + v)`` still equals their clean prediction ``k(x)``, find a
    perturbation ``r`` that moves them towards another class and set
    ``v = P(v + r)``, where ``P`` projects onto the eps-ball of the threat model's
    norm (Linf or L2). Stop when the fooling rate on the fitting set (the fraction
    of images whose prediction differs from the clean one) reaches ``1 - delta``, or
    after ``max_epochs`` passes. Images go ``batch_size`` at a time, all at the same
    ``v``. The inner step ``r``:

    * ``inner="gradient"`` (default): one step of length ``step_size`` along the
      steepest-ascent direction (sign for Linf, normalised for L2) of the summed
      cross-entropy of the batch's still-unfooled images with respect to ``v`` (the
      stochastic-gradient form of the algorithm, Shafahi et al. 2020, "Universal
      Adversarial Training", https://arxiv.org/abs/1812.03705). It needs one
      forward and backward pass per image and epoch.
    * ``inner="deepfool"``: the paper's choice, DeepFool (Moosavi-Dezfooli et al.,
      2016, https://arxiv.org/abs/1511.04599; advkit's :class:`DeepFool`): for each
      still-unfooled image at most ``deepfool_steps`` linearisations towards the
      nearest boundary among the ``candidates`` classes with the highest logits at
      ``clip(x + v)``, with ``overshoot``; the images' ``r`` are added to ``v`` one after
      another, projecting after each (with ``batch_size=1`` this is exactly the
      paper's sequential loop). It costs up to ``deepfool_steps * (candidates - 1)``
      gradient passes per image and epoch, and where the per-image minimal
      perturbations are about as large as eps (MNIST under Linf) each image's ``r``
      overwrites most of ``v``, so the gradient step fools more images for less.

    Calling the attack (the contract, ``attack(model, x, y)``): with ``perturbation``
    given, it is applied to every image; otherwise ``v`` is fitted on ``x`` first
    (note that :func:`advkit.evaluation.run_attack` calls the attack per batch, so
    each batch would get its own ``v``: fit once and pass ``perturbation=`` to apply
    one ``v`` everywhere). ``x_adv = clip(x + v)``; success means misclassified (the
    true label is lost); ``result.extras["perturbation"]`` (N, C, H, W) is ``v`` for
    every image and ``result.extras["fooled"]`` (N,) whether the prediction changed
    (the paper's measure). The attack is untargeted: ``targets=`` is refused.

    Args:
        threat: norm (linf or l2), eps (the paper's L2 budget is 2000 on [0, 255]
            ImageNet images, about 0.04 of the images' mean norm; on MNIST Linf 0.2-0.3
            is typical), bounds.
        delta: stop once the fitting set's fooling rate is at least ``1 - delta``
            (default 0.2, the paper's).
        max_epochs: passes over the fitting set (default 5).
        inner: ``"gradient"`` or ``"deepfool"``, the inner step (see above).
        step_size: length of a gradient inner step in the threat model's norm
            (default ``eps / 10``).
        overshoot: DeepFool's overshoot (default 0.02, the paper's).
        deepfool_steps: DeepFool iterations per image (default 10).
        candidates: classes DeepFool considers, the true one included (default 10).
        batch_size: images that share one inner step (default 32).
        perturbation: a fitted ``v`` (1, C, H, W) to apply instead of fitting.
        seed: seed of the random order of the images (same seed, same ``v``).
    """

    paper = "Moosavi-Dezfooli et al. 2017, Universal adversarial perturbations"
    taxonomy = Taxonomy(specificity="untargeted", frequency="iterative", scope="universal")
    norms = ("linf", "l2")

    def __init__(self, threat: ThreatModel, *, delta: float = 0.2, max_epochs: int = 5,
                 inner: str = "gradient", step_size: float | None = None,
                 overshoot: float = 0.02, deepfool_steps: int = 10, candidates: int = 10,
                 batch_size: int = 32, perturbation: Tensor | None = None,
                 seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        if not 0 <= delta < 1:
            raise ValueError(f"delta must be in [0, 1) (got {delta}): the fit stops at a "
                             "fooling rate of 1 - delta")
        require_at_least(1, max_epochs=max_epochs)
        if inner not in INNER:
            raise ValueError(f"unknown inner step {inner!r}: use one of {', '.join(INNER)}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0 (got {step_size})")
        if overshoot < 0:
            raise ValueError(f"overshoot must be >= 0 (got {overshoot})")
        require_at_least(1, deepfool_steps=deepfool_steps)
        if candidates < 2:
            raise ValueError(f"candidates must be >= 2 (got {candidates})")
        require_at_least(1, batch_size=batch_size)
        if perturbation is not None:
            perturbation = self._check_perturbation(perturbation)
        self.delta = delta
        self.max_epochs = max_epochs
        self.inner = inner
        self.step_size = step_size if step_size is not None else threat.eps / 10
        self.overshoot = overshoot
        self.deepfool_steps = deepfool_steps
        self.candidates = candidates
        self.batch_size = batch_size
        self._perturbation = perturbation

    def config(self) -> dict:
        cfg = super().config()
        cfg["perturbation"] = "given" if self._perturbation is not None else "fitted on x"
        return cfg

    def _check_perturbation(self, v: Tensor) -> Tensor:
        if not isinstance(v, Tensor) or v.dim() != 4 or v.shape[0] != 1:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"perturbation must be a tensor of shape (1, C, H, W) (got {shape})")
        if not torch.isfinite(v).all():
            raise ValueError("perturbation contains NaN or inf values")
        size = self.threat.norms(v).item()
        if size > self.threat.eps * (1 + 1e-5):
            raise ValueError(f"perturbation has {self.threat.norm} norm {size:.4g}, larger than "
                             f"eps={self.threat.eps}; use a threat model with eps >= {size:.4g}")
        return v.detach()

    def _choose_targets(self, clean_logits: Tensor, y: Tensor,
                        targets: Tensor | None) -> Tensor | None:
        if targets is not None:
            raise ValueError("UniversalPerturbation is untargeted (one perturbation for every "
                             "image); call it without targets=")
        return None

    # ------------------------------------------------------------------------ fitting

    def fit(self, model: nn.Module, x: Tensor, y: Tensor, *, progress: bool = True) -> Tensor:
        """Fit ``v`` (1, C, H, W) on images ``x`` (N, C, H, W) and labels ``y`` (N,).

        The labels are checked but the algorithm uses the model's clean predictions,
        as the paper does. Returns ``v`` inside the eps-ball.
        """
        x, y, _ = check_inputs(model, x, y, None, self.threat)
        self.threat.check_eps_for(x)
        counted = Oracle(model, x.shape[0], device=x.device, who=self.name)
        with eval_mode(counted.model):
            clean = torch.cat([counted.logits(x[i:i + 500], rows=_span(i, len(x), x.device))
                               for i in range(0, len(x), 500)])
            check_logits(clean, y, None)
            generator = None
            if self.seed is not None:
                generator = torch.Generator(device=x.device).manual_seed(self.seed)
            return self._fit(counted, x, clean.argmax(1), generator, progress)

    def _fit(self, model: Oracle, x: Tensor, labels: Tensor,
             generator: torch.Generator | None, progress: bool) -> Tensor:
        n = x.shape[0]
        v = torch.zeros_like(x[:1])
        with progress_bar(progress, f"UAP {self.threat.norm} eps={self.threat.eps:g}",
                          self.max_epochs * n) as bar:
            for epoch in range(self.max_epochs):
                order = torch.randperm(n, device=x.device, generator=generator)
                for start in range(0, n, self.batch_size):
                    idx = order[start:start + self.batch_size]
                    if self.inner == "gradient":
                        v = self._gradient_step(model.view(idx), x[idx], v, labels[idx])
                    else:
                        r = self._deepfool(model.view(idx), x[idx], v, labels[idx])
                        for ri in r[r.flatten(1).abs().amax(1) > 0]:
                            v = self._project(v + ri)
                    bar.advance(f"epoch {epoch + 1}", steps=idx.numel())
                fooled = torch.cat([
                    model.labels(self.threat.clip(x[i:i + 500] + v), rows=_span(i, n, x.device))
                    != labels[i:i + 500] for i in range(0, n, 500)])
                rate = fooled.float().mean()
                bar.advance(f"epoch {epoch + 1}: fooling rate {rate.item():.1%}", steps=0)
                if rate >= 1 - self.delta:
                    break
        return v

    def _project(self, v: Tensor) -> Tensor:
        """Projection onto the eps-ball of the threat model's norm (no box: ``v`` is shared)."""
        eps = self.threat.eps
        if self.threat.norm == "linf":
            return v.clamp(-eps, eps)
        return v * (eps / v.norm().clamp_min(1e-12)).clamp(max=1.0)

    def _gradient_step(self, model: Oracle, x: Tensor, v: Tensor, labels: Tensor,
                       ) -> Tensor:
        """``P(v + step_size * direction)``, ascending the unfooled images' cross-entropy."""
        lo, hi = self.threat.bounds
        shifted = x + v
        logits, grad = model.gradient(shifted.clamp(lo, hi),
                                      lambda out: F.cross_entropy(out, labels, reduction="none"))
        # Only the images still unfooled count, and the clip passes no gradient where
        # it is active (the same rule as autograd's clamp).
        unfooled = (logits.argmax(1) == labels).view(-1, *[1] * (x.dim() - 1))
        inside = (shifted >= lo) & (shifted <= hi)
        grad_v = (grad * (unfooled & inside)).sum(0, keepdim=True)
        if self.threat.norm == "linf":
            direction = grad_v.sign()
        else:
            direction = grad_v / grad_v.norm().clamp_min(1e-12)
        return self._project(v + self.step_size * direction)

    def _deepfool(self, model: Oracle, x: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        """Per image, DeepFool's ``r`` towards ``k(clip(x + v + r)) != labels`` (0 where the
        image is already fooled; the last iterate's where ``deepfool_steps`` were not
        enough).

        The attack itself (:class:`~advkit.attacks.DeepFool`, box ``"clip"``), run from
        ``clip(x + v)`` on the ``candidates - 1`` classes other than the label with the
        highest logits there, through this call's oracle (its passes count here).
        """
        point = self.threat.clip(x + v)
        deepfool = DeepFool(ThreatModel(self.threat.norm, float("inf"), self.threat.bounds),
                            steps=self.deepfool_steps, overshoot=self.overshoot,
                            top_k=self.candidates - 1)
        # Its loop, not its __call__: the inner attack works through this call's oracle and
        # on logits it already has, so neither its entry checks nor its passes are repeated.
        # As in the authors' code, an image DeepFool did not finish still adds its last r.
        reached = deepfool._iterate(model, point, labels, model.logits(point), last_iterate=True)
        return reached - point

    # ------------------------------------------------------------------------ contract

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor, generator: torch.Generator | None,
             ) -> tuple[Tensor, dict[str, Tensor]]:
        v = self._perturbation
        if v is None:
            v = self._fit(model, x, clean_logits.argmax(1), generator, progress=False)
        elif v.shape[1:] != x.shape[1:]:
            raise ValueError(f"the perturbation has shape {tuple(v.shape)}, the images "
                             f"{tuple(x.shape)}: they must agree in (C, H, W)")
        v = v.to(device=x.device, dtype=x.dtype)
        x_adv = self.threat.clip(x + v)
        fooled = model.labels(x_adv) != clean_logits.argmax(1)
        return x_adv, {"perturbation": v.expand_as(x), "fooled": fooled}


# ---------------------------------------------------------------------------- helpers


def _span(start: int, n: int, device: torch.device) -> Tensor:
    """The sample indices of the chunk of (at most) 500 images that begins at ``start``."""
    return torch.arange(start, min(start + 500, n), device=device)


def apply_perturbation(x: Tensor, v: Tensor, bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """``clip(x + v)``: the perturbation ``v`` (1, C, H, W) added to every image of ``x``."""
    if v.dim() != 4 or v.shape[0] != 1 or v.shape[1:] != x.shape[1:]:
        raise ValueError(f"the perturbation has shape {tuple(v.shape)}, the images "
                         f"{tuple(x.shape)}: v must be (1, C, H, W) with the images' C, H, W")
    return (x + v.to(device=x.device, dtype=x.dtype)).clamp(*bounds)


def fooling_rate(model: nn.Module, x: Tensor, v: Tensor, *,
                 bounds: tuple[float, float] = (0.0, 1.0), batch_size: int = 500) -> float:
    """Fraction of the images whose predicted class changes when ``v`` is added (and clipped).

    The paper's measure: it compares with the model's own clean predictions, not the
    true labels. Images go to the model's device ``batch_size`` at a time.
    """
    device = device_of(model, default=x.device)
    changed = 0
    with eval_mode(model), torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device)
            clean = model(xb).argmax(1)
            changed += int((model(apply_perturbation(xb, v, bounds)).argmax(1) != clean).sum())
    return changed / x.shape[0]


def save_perturbation(path: str | Path, v: Tensor, metadata: dict[str, Any] | None = None,
                      ) -> Path:
    """Write ``v`` to ``path`` (.safetensors) with JSON ``metadata``, atomically.

    Record what the perturbation is for: eps, norm, fooling rates, the model's
    fingerprint (:func:`advkit.models.fingerprint`), the data it was fitted on.
    """
    path = Path(path)
    meta = {"format": FORMAT, "shape": list(v.shape), **(metadata or {})}
    try:
        header = json.dumps(meta)
    except TypeError as err:
        raise ValueError(f"metadata must be JSON-serialisable ({err})") from err
    with atomic_path(path) as tmp:
        save_file({"perturbation": v.detach().cpu().contiguous()}, str(tmp),
                  metadata={"advkit": header})
    return path


def load_perturbation(path: str | Path) -> tuple[Tensor, dict[str, Any]]:
    """Read a perturbation written by :func:`save_perturbation`: ``(v, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no perturbation file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("advkit")
            keys = list(f.keys())
            v = f.get_tensor("perturbation") if "perturbation" in keys else None
    except Exception as err:  # safetensors raises several types for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    meta = json.loads(raw) if raw is not None else {}
    if v is None or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an advkit perturbation file (expected a tensor "
                         f"'perturbation' and format {FORMAT!r}); write one with "
                         "save_perturbation or `advkit universal fit`")
    return v, meta
