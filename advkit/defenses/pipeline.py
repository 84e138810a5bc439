"""Protected pipelines: reconstruct the input, classify it, reject what a detector flags.

What a user deploys is the whole pipeline, so it is what must be measured: a
:class:`Protected` is an ``nn.Module`` (its forward gives the logits of the classifier on
the reconstructed input, so attacks and the evaluation engine take it as any model), and
:func:`protection_metrics` defines once how a pipeline with a reject option is scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from advkit.models.access import REJECT

__all__ = ["REJECT", "Detector", "Protected", "ProtectionMetrics", "protection_metrics"]


class Detector(Protocol):
    """What a pipeline needs of a detector (``advkit.defenses.detectors`` has the real ones)."""

    def fit(self, model: nn.Module, x_clean: Tensor, y_clean: Tensor | None = None, *,
            fpr: float = 0.05, **options: object) -> object: ...

    def flag(self, x: Tensor) -> Tensor: ...


class Protected(nn.Module):
    """``model`` behind input transforms and detectors: reconstruct, classify, reject.

    ``forward(x)`` returns ``model(t_k(...t_1(x)))``: the logits attacks and the evaluation
    engine see. Detectors look at the raw input ``x`` with the base model (as feature
    squeezing, LID, Mahalanobis and MagNet's detector do); :meth:`rejected` is True where
    any of them flags. :meth:`predict` gives the label, or :data:`REJECT`.

    Args:
        model: the classifier (logits, images in [0, 1]).
        transforms: input reconstructions, applied in order; each maps [0, 1] images to
            [0, 1] images (checked on every call).
        detectors: objects with ``fit(model, x_clean, ...)`` and ``flag(x)``.
    """

    def __init__(self, model: nn.Module, transforms: Sequence[nn.Module] = (),
                 detectors: Sequence[Detector] = ()) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (got {type(model).__name__})")
        for t in transforms:
            if not isinstance(t, nn.Module):
                raise TypeError(f"a transform must be an nn.Module from [0,1] images to [0,1] "
                                f"images (got {type(t).__name__})")
        for d in detectors:
            if not (callable(getattr(d, "fit", None)) and callable(getattr(d, "flag", None))):
                raise TypeError(f"a detector needs fit() and flag() (got {type(d).__name__})")
        self.model = model
        self.transforms = nn.ModuleList(transforms)
        self.detectors = list(detectors)
        self.train(model.training)  # the pipeline is in the mode of the model it protects

    @property
    def rejects_inputs(self) -> bool:
        """True where there is a detector: attacks and the evaluation engine then read
        :meth:`rejected` (a rejected adversarial example is a defended one)."""
        return bool(self.detectors)

    def reconstruct(self, x: Tensor) -> Tensor:
        for t in self.transforms:
            x = t(x)
            lo, hi = (v.item() for v in torch.aminmax(x.detach()))
            if lo < 0 or hi > 1:
                raise ValueError(f"{type(t).__name__} returned values outside [0, 1] (min "
                                 f"{lo:.4g}, max {hi:.4g}); a transform maps images to images")
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.reconstruct(x))

    def for_attack(self) -> Protected:
        """The pipeline as an adaptive attack must differentiate it: every transform replaced
        by the module its ``adaptive`` declaration names (BPDA's backward pass through the
        approximation; see :func:`advkit.defenses.bpda`). The forward pass is unchanged."""
        return Protected(self.model, [t.for_attack() if hasattr(t, "for_attack") else t
                                      for t in self.transforms], self.detectors)

    def without_detectors(self) -> Protected:
        """The reconstruct-and-classify path alone (same modules, no detectors): what the
        gradient-masking checks probe, since they judge a classifier's gradients."""
        return Protected(self.model, list(self.transforms))

    def fit(self, x_clean: Tensor, y_clean: Tensor | None = None, *, fpr: float = 0.05,
            **options: object) -> Protected:
        """Fit every detector on clean data, each with its threshold at ``fpr`` false
        positives on held-out clean data. Returns the pipeline."""
        for d in self.detectors:
            d.fit(self.model, x_clean, y_clean, fpr=fpr, **options)
        return self

    @torch.no_grad()
    def rejected(self, x: Tensor) -> Tensor:
        """Per sample: does any detector flag it?"""
        flags = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for d in self.detectors:
            flags |= d.flag(x).to(device=x.device, dtype=torch.bool)
        return flags

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Per sample: the predicted label, or :data:`REJECT` where a detector flags it."""
        labels = self(x).argmax(dim=1)
        return torch.where(self.rejected(x), torch.full_like(labels, REJECT), labels)


@dataclass(frozen=True)
class ProtectionMetrics:
    """How a pipeline with a reject option fares; every figure is a share of all samples.

    A sample is defended when the pipeline gets its clean image right (accepted and
    classified correctly) and its adversarial image is rejected or still classified
    correctly; so robust accuracy never exceeds clean accuracy, as without a detector.
    The evaluation engine (:func:`advkit.evaluate`) counts the same way.

    Attributes:
        clean_accuracy: clean inputs accepted and classified correctly (a rejected clean
            input counts as a loss).
        false_rejection: clean inputs rejected.
        robust_accuracy: defended samples: ``detected + correct_accepted``.
        detected: samples right when clean whose adversarial input is rejected.
        correct_accepted: samples right when clean whose adversarial input is accepted
            and still classified correctly.
        n: the number of samples.
    """

    clean_accuracy: float
    false_rejection: float
    robust_accuracy: float
    detected: float
    correct_accepted: float
    n: int


def protection_metrics(pipeline: Protected, x: Tensor, y: Tensor, x_adv: Tensor,
                       ) -> ProtectionMetrics:
    """Score ``pipeline`` on clean ``x`` (labels ``y``) and their adversarial ``x_adv``."""
    if x.shape != x_adv.shape or y.shape != (x.shape[0],):
        raise ValueError(f"x and x_adv must have the same shape and y one label per image "
                         f"(got {tuple(x.shape)}, {tuple(x_adv.shape)}, {tuple(y.shape)})")
    n = x.shape[0]
    if n == 0:
        raise ValueError("no samples to score")
    clean, adv = pipeline.predict(x), pipeline.predict(x_adv)
    y = y.to(clean.device)
    right = clean == y
    detected = (right & (adv == REJECT)).float().mean().item()
    correct_accepted = (right & (adv == y)).float().mean().item()
    return ProtectionMetrics(
        clean_accuracy=right.float().mean().item(),
        false_rejection=(clean == REJECT).float().mean().item(),
        robust_accuracy=detected + correct_accepted, detected=detected,
        correct_accepted=correct_accepted, n=n)
