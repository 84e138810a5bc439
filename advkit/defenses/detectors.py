"""Detectors of adversarial inputs: feature squeezing, Mahalanobis and LID.

One contract (:class:`Detector`): ``fit(model, x_clean, y_clean=None, *, fpr=0.05,
x_adv=None)`` learns what the method needs and sets a threshold on held-out clean
images so that a chosen fraction ``fpr`` of clean images is flagged; ``score(x)`` gives
one number per image (higher means more likely adversarial); ``flag(x)`` says which
scores lie above the threshold.

A detector is a reactive defense and every figure for one against a non-adaptive attack
is an upper bound: an attacker who knows the detector optimises evasion and
misclassification together (Carlini & Wagner 2017, "Adversarial examples are not easily
detected"), which is the adaptive attack to evaluate it with.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Self

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.nn import functional as F

from advkit.attacks.base import eval_mode
from advkit.attacks.feature_adversary import resolve_layer
from advkit.defenses.transforms import BitDepth
from advkit.models.device import device_of

__all__ = ["LID", "Detector", "FeatureSqueezing", "Mahalanobis"]

#: A layer: a module name from ``model.named_modules()`` or an index into an nn.Sequential.
Layer = str | int


class Detector(ABC):
    """Base class: subclasses set ``paper`` and implement ``_fit`` and ``_score``.

    Held-out data: a detector that learns something from the clean images keeps back a
    random fraction ``holdout`` of ``x_clean`` (seeded by ``seed``) that it never learns
    from, and sets the threshold on those images alone; a detector with nothing to learn
    (feature squeezing) sets it on all of ``x_clean``. The threshold is the
    ``floor(fpr * n)``-th largest held-out score (n held-out images), so at most
    ``fpr * n`` of them score above it: the held-out false-positive rate is ``fpr``
    within one image (fewer where scores tie). ``held_out_fpr`` records the rate reached.

    Args:
        holdout: fraction of ``x_clean`` kept back for the threshold (default 0.2).
        batch_size: images per model pass when scoring (memory only, not the result).
        seed: seed of the held-out split and of any random choice in fitting.
    """

    paper: str = ""
    #: Whether ``fit`` learns from the clean images (then part of them is kept back).
    learns: bool = True
    #: Whether ``fit`` needs adversarial examples ``x_adv``.
    needs_adversarial: bool = False

    def __init__(self, *, holdout: float = 0.2, batch_size: int = 256, seed: int = 0) -> None:
        if not 0 < holdout < 1:
            raise ValueError(f"holdout must be in (0, 1) (got {holdout})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.holdout = holdout
        self.batch_size = batch_size
        self.seed = seed
        self.model: nn.Module | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.threshold: float | None = None
        self.fpr: float | None = None
        self.held_out_fpr: float | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        state = "unfitted" if self.threshold is None else f"threshold={self.threshold:.4g}"
        return f"{self.name}({state})"

    def fit(self, model: nn.Module, x_clean: Tensor, y_clean: Tensor | None = None, *,
            fpr: float = 0.05, x_adv: Tensor | None = None) -> Self:
        """Fit the detector to ``model`` and set its threshold at false-positive rate ``fpr``.

        Args:
            model: the classifier (images in [0, 1] -> logits) whose inputs are checked.
            x_clean: clean images (N, C, H, W); part is kept back for the threshold.
            y_clean: their labels (N,), where the method uses labels (Mahalanobis); the
                model's own predictions stand in when omitted.
            fpr: the fraction of clean images to flag, in (0, 1) (default 5%).
            x_adv: adversarial images of the same shape, for methods that learn to tell
                them apart (LID needs them; Mahalanobis uses them for its layer ensemble).
        Returns:
            the detector itself, fitted.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (got {type(model).__name__})")
        if isinstance(fpr, bool) or not isinstance(fpr, int | float) or not 0 < fpr < 1:
            raise ValueError(f"fpr must be a false-positive rate in (0, 1), such as 0.05 "
                             f"(got {fpr!r})")
        x_clean = _check_images(x_clean, "x_clean")
        if x_adv is not None:
            x_adv = _check_images(x_adv, "x_adv")
            if x_adv.shape[1:] != x_clean.shape[1:]:
                raise ValueError(f"x_adv has images of shape {tuple(x_adv.shape[1:])} but "
                                 f"x_clean of shape {tuple(x_clean.shape[1:])}; they must match")
        elif self.needs_adversarial:
            raise ValueError(f"{self.name} learns to tell clean from adversarial images: pass "
                             f"x_adv= (adversarial examples, e.g. from PGD) to fit")
        if y_clean is not None:
            if not isinstance(y_clean, Tensor) or y_clean.shape != x_clean.shape[:1]:
                raise ValueError(f"y_clean must be a tensor of {x_clean.shape[0]} labels, one "
                                 f"per image of x_clean (got "
                                 f"{getattr(y_clean, 'shape', type(y_clean).__name__)})")
            if y_clean.is_floating_point() or y_clean.is_complex() or bool((y_clean < 0).any()):
                raise ValueError("y_clean must hold class indices (integers >= 0)")
            y_clean = y_clean.long().cpu()
        n = x_clean.shape[0]
        n_held = max(1, round(self.holdout * n)) if self.learns else n
        if self.learns and n - n_held < 2:
            raise ValueError(f"x_clean has {n} images: too few to keep {self.holdout:.0%} back "
                             f"for the threshold and learn from the rest")
        if fpr * n_held < 1:
            # A rate below one image in n_held is only reachable by flagging nothing.
            raise ValueError(f"fpr={fpr} needs at least {math.ceil(1 / fpr)} held-out clean "
                             f"images to mean anything; {n_held} were kept back from "
                             f"{n}: pass more clean images")
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(n, generator=generator)
        held, rest = order[:n_held], order[n_held:] if self.learns else order
        # A refit starts from scratch, and a fit that fails leaves the detector unfitted
        # rather than half-fitted (score() refuses until a threshold is set).
        self.threshold = self.fpr = self.held_out_fpr = None
        self.model, self.input_shape = model, tuple(x_clean.shape[1:])
        try:
            with eval_mode(model):
                y_rest = y_clean[rest] if y_clean is not None else None
                self._fit(model, x_clean[rest], y_rest, x_adv)
                scores = self._scores(x_clean[held])
        except BaseException:
            self.model = self.input_shape = None
            raise
        # Threshold: the k-th largest held-out score with k = floor(fpr * n); the k scores
        # strictly above it are the false positives.
        k = math.floor(fpr * n_held + 1e-9)
        ranked = scores.sort(descending=True).values
        self.threshold = float(ranked[k])
        self.fpr = float(fpr)
        self.held_out_fpr = float((scores > self.threshold).float().mean())
        return self

    def score(self, x: Tensor) -> Tensor:
        """One score per image of ``x`` (N,), float32 on the CPU; higher = more suspicious."""
        if self.threshold is None:
            raise RuntimeError(f"{self.name} is not fitted: fit the detector first: "
                               "detector.fit(model, x_clean)")
        return self._scores(x)

    def _scores(self, x: Tensor) -> Tensor:
        assert self.model is not None and self.input_shape is not None
        x = _check_images(x, "x")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name} was fitted on images of shape {self.input_shape} "
                             f"but got images of shape {tuple(x.shape[1:])}")
        device = device_of(self.model)
        with eval_mode(self.model), torch.no_grad():
            parts = [self._score(x[i:i + self.batch_size].to(device))
                     for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(parts).detach().float().cpu()

    def attack_score(self, x: Tensor) -> Tensor:
        """The score as an adaptive attack differentiates it: (N,) on ``x``'s device, with
        gradients flowing back to ``x`` (through each non-differentiable step's declared
        approximation, BPDA). Minus :attr:`threshold`, it is the detector's margin: an
        image is flagged where it is positive. The model must be in eval mode."""
        if self.threshold is None:
            raise RuntimeError(f"{self.name} is not fitted: fit the detector first: "
                               "detector.fit(model, x_clean)")
        x = _check_images(x, "x")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name} was fitted on images of shape {self.input_shape} "
                             f"but got images of shape {tuple(x.shape[1:])}")
        with torch.enable_grad():
            return self._score(x).float()

    def flag(self, x: Tensor) -> Tensor:
        """Boolean (N,): which images of ``x`` score above the threshold (detected)."""
        scores = self.score(x)  # refuses an unfitted detector
        assert self.threshold is not None
        return scores > self.threshold

    @abstractmethod
    def _fit(self, model: nn.Module, x: Tensor, y: Tensor | None, x_adv: Tensor | None) -> None:
        """Learn from clean ``x`` (the part not kept back) and, if given, ``x_adv``."""

    @abstractmethod
    def _score(self, x: Tensor) -> Tensor:
        """Scores of one batch (already checked and on the model's device). It must be
        differentiable in ``x`` (no ``torch.no_grad`` inside; a non-differentiable step
        passes gradients through a stated approximation): :meth:`attack_score` is this
        method with gradients, and :meth:`score` calls it without."""


class FeatureSqueezing(Detector):
    """Feature squeezing: adversarial images change prediction when squeezed.

    Xu, Evans, Qi. "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
    Networks", NDSS 2018. https://arxiv.org/abs/1704.01155

    The score is the largest L1 distance between the model's softmax on ``x`` and on a
    squeezed copy of ``x``, over two squeezers: bit-depth reduction to ``bits`` bits per
    pixel and a ``median`` x ``median`` median filter. Nothing is learned, so all of
    ``x_clean`` sets the threshold.

    Args:
        bits: bits per pixel kept by the bit-depth squeezer (the paper's best on MNIST is
            1; 4 is the default here, which keeps greyscale digits readable).
        median: the median filter's window (2 for MNIST in the paper; 0 turns it off).
        **kwargs: ``batch_size``, ``seed`` (see :class:`Detector`).
    """

    paper = "Xu et al. 2018, Feature Squeezing: Detecting Adversarial Examples in DNNs"
    learns = False

    def __init__(self, *, bits: int = 4, median: int = 2, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 7:
            raise ValueError(f"bits must be an integer from 1 to 7 (got {bits!r})")
        if isinstance(median, bool) or not isinstance(median, int) or median < 0:
            raise ValueError(f"median must be a window size >= 1, or 0 for none (got {median!r})")
        self.bits = bits
        self.median = median
        self._bit_depth = BitDepth(bits)

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor | None, x_adv: Tensor | None) -> None:
        pass  # nothing to learn: only the threshold, which fit() sets

    def _score(self, x: Tensor) -> Tensor:
        assert self.model is not None
        p = F.softmax(self.model(x), dim=1)
        # Rounding has no useful gradient: BPDA with the identity (the squeezed image's
        # gradient is passed to x as is). The median filter is differentiable almost
        # everywhere (the gradient goes to the pixel that is the median).
        squeezed = [x + (self._bit_depth(x.detach()) - x).detach()]
        if self.median > 1:
            squeezed.append(_median_filter(x, self.median))
        distances = [(p - F.softmax(self.model(s), dim=1)).abs().sum(dim=1) for s in squeezed]
        return torch.stack(distances).amax(dim=0)


def _median_filter(x: Tensor, size: int) -> Tensor:
    """Median over a ``size`` x ``size`` window at every pixel, keeping the image size.

    For an even window the extra pixel reaches right and down, and of the two middle
    values the upper one is taken (as scipy.ndimage.median_filter does, which the paper's
    code uses). Not :class:`~advkit.defenses.transforms.MedianSmoothing`, which takes odd
    windows only, while the paper's MNIST squeezer is 2 x 2.
    """
    before, after = (size - 1) // 2, size // 2
    padded = F.pad(x, (before, after, before, after), mode="reflect")
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)  # N, C, H, W, size, size
    values = windows.flatten(-2).sort(dim=-1).values
    return values[..., size * size // 2]


class Mahalanobis(Detector):
    """Mahalanobis distance to the closest class in a layer's feature space.

    Lee, Lee, Lee, Shin. "A Simple Unified Framework for Detecting Out-of-Distribution
    Samples and Adversarial Attacks", NeurIPS 2018. https://arxiv.org/abs/1807.03888

    For each layer, class-conditional Gaussians with one shared (tied) covariance are fit
    to the clean features (convolutional feature maps are averaged over space, as in the
    paper); the confidence is ``M(x) = max_c -(f - mu_c)^T S^-1 (f - mu_c)`` and the
    layer's score is ``-M(x)``, the squared distance to the closest class.

    Input pre-processing (the paper's): with ``noise > 0`` each image first takes a
    signed gradient step of size ``noise`` that raises ``M(x)``; clean images gain more
    confidence from it than adversarial ones, which separates the two further.

    Layer ensemble: with several layers and ``x_adv`` given to ``fit``, a logistic
    regression on the per-layer scores of clean against adversarial images weighs the
    layers (the paper fits it on adversarial validation samples); without ``x_adv`` the
    per-layer scores, standardised on the clean images, are averaged.

    Measured on the MNIST test model against PGD (Linf 0.3, 20 steps): the penultimate
    features alone give AUROC 0.63 (PGD drives them deep into another class's cluster),
    the pooled feature maps of the convolutional blocks 0.93-1.0, and the ensemble of
    ``layers=[3, 6, 9]`` 1.0 with or without ``x_adv``: use several layers, as the paper
    does, against strong attacks. Pre-processing did not help there.

    Args:
        layers: the layers whose outputs are the features: module names from
            ``model.named_modules()`` or indices into an nn.Sequential; ``None`` (default)
            takes the penultimate features, the input of the model's last module.
        noise: size of the pre-processing step in pixel units (default 0: off; the paper
            searched 0 to 0.005).
        covariance: ``"ledoit_wolf"`` (default: a shrunk estimate that stays well
            conditioned with few images per feature) or ``"empirical"`` (the paper's).
        **kwargs: ``holdout``, ``batch_size``, ``seed`` (see :class:`Detector`).
    """

    paper = ("Lee et al. 2018, A Simple Unified Framework for Detecting Out-of-Distribution "
             "Samples and Adversarial Attacks")

    def __init__(self, *, layers: Sequence[Layer] | Layer | None = None, noise: float = 0.0,
                 covariance: str = "ledoit_wolf", **kwargs: object) -> None:
        super().__init__(**kwargs)
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0 (got {noise})")
        if covariance not in ("ledoit_wolf", "empirical"):
            raise ValueError(f"covariance must be 'ledoit_wolf' or 'empirical' "
                             f"(got {covariance!r})")
        self.layers = _layer_list(layers)
        self.noise = float(noise)
        self.covariance = covariance
        self._means: list[Tensor] = []
        self._precisions: list[Tensor] = []
        self._ensemble: _LogisticScore | None = None
        self._standardise: tuple[Tensor, Tensor] | None = None

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor | None, x_adv: Tensor | None) -> None:
        device = device_of(model)
        features = _batched_features(model, self.layers, x, self.batch_size, device)
        if y is None:
            y = _batched_predictions(model, x, self.batch_size, device)
        y = y.cpu()
        classes = int(y.max()) + 1
        self._means, self._precisions = [], []
        for f in features:
            means = torch.zeros(classes, f.shape[1], dtype=f.dtype)
            for c in y.unique():
                means[c] = f[y == c].mean(dim=0)
            estimator = LedoitWolf if self.covariance == "ledoit_wolf" else EmpiricalCovariance
            # The tied covariance is the covariance of features around their class's mean.
            fitted = estimator(assume_centered=True).fit((f - means[y]).double().numpy())
            present = torch.zeros(classes, dtype=torch.bool)
            present[y.unique()] = True
            self._means.append(means[present].to(device))
            self._precisions.append(torch.from_numpy(fitted.precision_).float().to(device))
        self._ensemble, self._standardise = None, None
        if len(self.layers) == 1:
            return
        clean = self._layer_scores(x, device)
        if x_adv is not None:
            adversarial = self._layer_scores(x_adv, device)
            inputs = torch.cat([clean, adversarial]).numpy()
            labels = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
            self._ensemble = _LogisticScore.fit(inputs, labels)
        else:
            self._standardise = (clean.mean(dim=0), clean.std(dim=0).clamp_min(1e-12))

    def _layer_scores(self, x: Tensor, device: torch.device) -> Tensor:
        """(N, layers) per-layer scores, on the CPU, computed in batches."""
        with torch.no_grad():
            parts = [self._per_layer(x[i:i + self.batch_size].to(device)).cpu()
                     for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(parts)

    def _distances(self, x: Tensor) -> list[Tensor]:
        """Per layer, (N,) squared Mahalanobis distance of x's features to the closest class."""
        assert self.model is not None
        out = []
        for f, means, precision in zip(_features(self.model, self.layers, x), self._means,
                                       self._precisions, strict=True):
            diff = f[:, None, :] - means[None, :, :]  # N, classes, D
            squared = torch.einsum("ncd,de,nce->nc", diff, precision, diff)
            out.append(squared.amin(dim=1))
        return out

    def _per_layer(self, x: Tensor) -> Tensor:
        if self.noise == 0:
            return torch.stack(self._distances(x), dim=1)
        scores = []
        for i in range(len(self.layers)):
            with torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                distance = self._distances(xg)[i]
                (grad,) = torch.autograd.grad(distance.sum(), xg)
            # A step down the distance is a step up the confidence M(x). The step's sign
            # has no gradient: an adaptive attack differentiates the score at the moved
            # image with the step held fixed.
            moved = (x - self.noise * grad.sign()).clamp(0, 1)
            scores.append(self._distances(moved)[i])
        return torch.stack(scores, dim=1)

    def _score(self, x: Tensor) -> Tensor:
        per_layer = self._per_layer(x)
        if self._ensemble is not None:
            return self._ensemble(per_layer)
        if self._standardise is not None:
            mean, std = (t.to(per_layer.device) for t in self._standardise)
            return ((per_layer - mean) / std).mean(dim=1)
        return per_layer[:, 0]


class LID(Detector):
    """Local intrinsic dimensionality of the model's activations around each image.

    Ma, Li, Wang, Erfani, Wijewickrema, Schoenebeck, Song, Houle, Bailey.
    "Characterizing Adversarial Subspaces Using Local Intrinsic Dimensionality",
    ICLR 2018. https://arxiv.org/abs/1801.02613

    For each layer the LID of an image is estimated from the distances ``r_1 <= ... <=
    r_k`` of its activations to their ``k`` nearest neighbours within a minibatch of clean
    reference activations (maximum likelihood: ``-(1/k sum_i log(r_i / r_k))^-1``);
    adversarial images sit in regions of higher LID. A logistic regression on the
    per-layer LIDs of clean against adversarial images gives the score, so ``fit`` needs
    ``x_adv``.

    Data use: ``references`` minibatches of ``batch`` clean images each are drawn from the
    part of ``x_clean`` not kept back, and each LID is the mean of its estimates against
    them (the same estimator with less variance); the regression learns from the other
    clean images (so none is its own neighbour) and ``x_adv``. ``fit`` therefore needs
    more than ``batch * references`` clean images besides the held-out part.

    Measured on the MNIST test model against PGD (Linf 0.3, 20 steps): AUROC 0.85 with
    the paper's single minibatch of 100, about 0.91 with the defaults (2 x 200); the
    early (convolutional) layers add little there, the deep ones carry the detection.

    Args:
        layers: the layers whose activations are used (module names or nn.Sequential
            indices); ``None`` (default) takes every ReLU's output and the logits.
        k: nearest neighbours per estimate (default 20, the paper's choice for MNIST).
        batch: size of a clean reference minibatch (default 200; the paper's is 100).
        references: reference minibatches averaged over (default 2).
        **kwargs: ``holdout``, ``batch_size``, ``seed`` (see :class:`Detector`).
    """

    paper = ("Ma et al. 2018, Characterizing Adversarial Subspaces Using Local Intrinsic "
             "Dimensionality")
    needs_adversarial = True

    def __init__(self, *, layers: Sequence[Layer] | Layer | None = None, k: int = 20,
                 batch: int = 200, references: int = 2, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1 (got {k!r})")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= k:
            raise ValueError(f"batch must be an integer larger than k={k} (got {batch!r})")
        if isinstance(references, bool) or not isinstance(references, int) or references < 1:
            raise ValueError(f"references must be an integer >= 1 (got {references!r})")
        self.layers = None if layers is None else _layer_list(layers)
        self.k = k
        self.batch = batch
        self.references = references
        self._layers: list[Layer | None] = []
        self._reference: list[Tensor] = []
        self._classifier: _LogisticScore | None = None

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor | None, x_adv: Tensor | None) -> None:
        assert x_adv is not None
        n_ref = self.batch * self.references
        if x.shape[0] < n_ref + 2:
            raise ValueError(f"LID needs more than batch * references = {n_ref} clean images "
                             f"besides the held-out part (got {x.shape[0]} of them); pass "
                             f"more clean images or a smaller batch= / references=")
        self._layers = self.layers if self.layers is not None else [
            name for name, m in model.named_modules() if isinstance(m, nn.ReLU)] + [_LOGITS]
        device = device_of(model)
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(x.shape[0], generator=generator)
        reference, train = x[order[:n_ref]], x[order[n_ref:]]
        self._reference = [f.to(device) for f in _batched_features(
            model, self._layers, reference, self.batch_size, device, pool=False)]
        clean = self._lids(train, device)
        adversarial = self._lids(x_adv, device)
        inputs = torch.cat([clean, adversarial]).double().numpy()
        labels = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
        self._classifier = _LogisticScore.fit(inputs, labels)

    def _lids(self, x: Tensor, device: torch.device) -> Tensor:
        """(N, layers) LID estimates, on the CPU."""
        with torch.no_grad():
            parts = [self._lid_batch(x[i:i + self.batch_size].to(device)).cpu()
                     for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(parts)

    def _lid_batch(self, x: Tensor) -> Tensor:
        assert self.model is not None
        out = []
        for f, ref in zip(_features(self.model, self._layers, x, pool=False), self._reference,
                          strict=True):
            estimates = []
            for minibatch in ref.split(self.batch):
                r = torch.cdist(f, minibatch).topk(self.k, dim=1, largest=False).values
                r = r.clamp_min(1e-12)  # ascending; a duplicate image would give log(0)
                # Maximum-likelihood estimate (Amsaleg et al. 2015), Ma et al.'s eq. 3.
                mean_log = torch.log(r / r[:, -1:]).mean(dim=1)
                estimates.append(-1.0 / mean_log.clamp_max(-1e-12))
            out.append(torch.stack(estimates).mean(dim=0))
        return torch.stack(out, dim=1)

    def _score(self, x: Tensor) -> Tensor:
        assert self._classifier is not None
        return self._classifier(self._lid_batch(x))


class _LogisticScore:
    """A logistic regression on standardised features, fitted by scikit-learn and applied
    in torch, so that an adaptive attack can differentiate the score. It is the
    regression's decision function (log-odds of "adversarial")."""

    def __init__(self, mean: Tensor, scale: Tensor, weight: Tensor, bias: float) -> None:
        self.mean, self.scale, self.weight, self.bias = mean, scale, weight, bias

    @classmethod
    def fit(cls, inputs: np.ndarray, labels: np.ndarray) -> _LogisticScore:
        fitted = make_pipeline(StandardScaler(), LogisticRegression()).fit(inputs, labels)
        scaler, regression = fitted[0], fitted[-1]
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
        return cls(as_tensor(scaler.mean_), as_tensor(scaler.scale_),
                   as_tensor(regression.coef_[0]), float(regression.intercept_[0]))

    def __call__(self, features: Tensor) -> Tensor:
        device = features.device
        z = (features.double() - self.mean.to(device)) / self.scale.to(device)
        return z @ self.weight.to(device) + self.bias


#: Stands for the model's output (the logits) in a list of layers.
_LOGITS = "<logits>"


def _layer_list(layers: Sequence[Layer] | Layer | None) -> list[Layer | None]:
    if layers is None:
        return [None]
    if isinstance(layers, str | int):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, str | int):
            raise TypeError(f"each layer must be a module name (str) or an index into an "
                            f"nn.Sequential (int) (got {type(layer).__name__})")
    return layers


def _features(model: nn.Module, layers: Sequence[Layer | None], x: Tensor, *,
              pool: bool = True) -> list[Tensor]:
    """One forward pass; per layer, the (N, D) features (maps averaged over space if ``pool``).

    ``None`` is the penultimate features (the input of the model's last module) and
    ``_LOGITS`` the model's output. Gradients flow when ``x`` requires them.
    """
    captured: dict[int, Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        if layer is None:
            last = [m for m in model.modules() if not list(m.children())][-1]

            def pre_hook(_: nn.Module, args: tuple, i: int = i) -> None:
                captured[i] = args[0]

            handles.append(last.register_forward_pre_hook(pre_hook))
        elif layer != _LOGITS:
            def hook(_: nn.Module, __: object, output: object, i: int = i) -> None:
                if not isinstance(output, Tensor):
                    raise TypeError(f"layer {layers[i]!r} returns {type(output).__name__}, "
                                    "not a tensor; choose a layer whose output is a tensor")
                captured[i] = output

            handles.append(resolve_layer(model, layer).register_forward_hook(hook))
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for i, layer in enumerate(layers):
        f = logits if layer == _LOGITS else captured[i]
        if pool and f.dim() > 2:
            f = f.flatten(2).mean(dim=2)
        out.append(f.flatten(1))
    return out


def _batched_features(model: nn.Module, layers: Sequence[Layer | None], x: Tensor,
                      batch_size: int, device: torch.device, *,
                      pool: bool = True) -> list[Tensor]:
    """``_features`` over ``x`` in batches, without gradients, on the CPU."""
    parts: list[list[Tensor]] = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            feats = _features(model, layers, x[i:i + batch_size].to(device), pool=pool)
            parts.append([f.cpu() for f in feats])
    return [torch.cat(column) for column in zip(*parts, strict=True)]


def _batched_predictions(model: nn.Module, x: Tensor, batch_size: int,
                         device: torch.device) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size].to(device)).argmax(dim=1).cpu()
                          for i in range(0, x.shape[0], batch_size)])


def _check_images(x: object, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of images (got {type(x).__name__})")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty batch of images (N, C, H, W) "
                         f"(got shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{what} must hold float images in [0, 1] (got {x.dtype})")
    return x


