"""Randomised smoothing: a probabilistic certificate of L2 robustness for any classifier.

Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing",
ICML 2019, arXiv 1902.02918 (Algorithms PREDICT and CERTIFY, Theorem 1).

The smoothed classifier ``g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I)`` of a base
classifier ``f`` is constant on the L2 ball of radius ``sigma * Phi^-1(pA)`` around ``x``
whenever the top class has probability ``pA > 1/2`` (Theorem 1, with ``pB = 1 - pA``).
``pA`` is estimated by Monte Carlo: :meth:`SmoothedClassifier.certify` picks the class from
``n0`` noisy samples, then bounds its probability from below with ``n`` fresh samples (a
one-sided Clopper-Pearson bound at level ``1 - alpha``), so the radius it reports holds
with probability at least ``1 - alpha`` over the sampling.

The noise is *not* clipped to the [0, 1] box: the certificate is about the classifier of
exactly these noisy inputs, and the base model should be trained on them
(:class:`advkit.training.noise.GaussianAugmentation`, ``advkit train --defense noise``).

Cost: ``n0 + n`` forward passes per image. The paper's ``n = 100,000`` takes tens of
seconds per MNIST image on a laptop CPU; a smaller ``n`` is much faster but lowers every
radius, because the Clopper-Pearson bound is looser: even an image whose ``n`` samples all
vote for its class gets at most :func:`max_radius` ``= sigma * Phi^-1(alpha^(1/n))``
(``3.81 sigma`` at ``n = 100,000``, ``3.19 sigma`` at 10,000, ``2.46 sigma`` at 1,000, for
``alpha = 0.001``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor, nn

from advkit.attacks.base import check_inputs, check_label_range
from advkit.models.device import device_of
from advkit.progress import progress_bar
from advkit.threat import ThreatModel

__all__ = ["ABSTAIN", "SmoothedClassifier", "SmoothingResult", "certified_accuracy",
           "certify_smoothing", "clopper_pearson_lower", "max_radius"]

#: The label :meth:`SmoothedClassifier.predict` and :meth:`~SmoothedClassifier.certify`
#: give where the smoothed classifier abstains (no class is significantly on top).
ABSTAIN = -1

#: Noise is drawn per image in blocks of at most this many samples, from a generator of
#: that image's own: sample j of image i is the same whatever the batch size, so a seeded
#: run gives the same counts with any ``batch_size``.
_BLOCK = 1000

#: Streams of independent noise within one call (the paper draws the selection samples
#: and the estimation samples independently: reusing them would bias pA upwards).
_SELECT, _ESTIMATE, _PREDICT = 0, 1, 2

#: The entry checks are the attacks' (images in the [0, 1] box, finite, NCHW).
_BOX = ThreatModel("l2", 0.0)


def clopper_pearson_lower(k: int | np.ndarray | Tensor, n: int, alpha: float) -> np.ndarray:
    """The one-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion.

    With ``k`` successes in ``n`` trials, the bound ``p`` solves ``P(Binom(n, p) >= k) =
    alpha``, i.e. ``p = Beta(alpha; k, n - k + 1)`` quantile (0 for ``k = 0``). It is the
    lower end of the two-sided exact interval at confidence ``1 - 2 alpha`` (Cohen et al.'s
    ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``).

    Returns:
        float64 array of the shape of ``k``.
    """
    _check_alpha(alpha)
    k = np.asarray(k.cpu() if isinstance(k, Tensor) else k, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError(f"k must be in [0, n={n}] (got min {k.min()}, max {k.max()})")
    # beta.ppf needs a > 0: with no success at all the bound is 0.
    return np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)


def max_radius(sigma: float, n: int, alpha: float = 0.001) -> float:
    """The largest radius :meth:`SmoothedClassifier.certify` can give with ``n`` samples:
    every sample votes for the class, so ``pA_lower = alpha^(1/n)`` and the radius is
    ``sigma * Phi^-1(alpha^(1/n))``. A certified-accuracy curve is 0 beyond it."""
    _check_sigma(sigma)
    _check_alpha(alpha)
    _check_count("n", n)
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def certified_accuracy(radius: Tensor, correct: Tensor, radii: Sequence[float] | Tensor) -> Tensor:
    """Certified accuracy at each of ``radii``: the fraction of images that are classified
    correctly *and* certified at a radius ``>= r``. An image certified at ``R`` counts at
    every ``r <= R``, so the curve never rises; an abstention is never correct.

    Args:
        radius: (N,) certified L2 radii (0 where abstained).
        correct: (N,) bool, the smoothed prediction equals the label.
        radii: the radii (pixel units of the [0, 1] scale) to read the curve at.

    Returns:
        float64 tensor of ``len(radii)`` fractions.
    """
    if radius.shape != correct.shape or radius.dim() != 1:
        raise ValueError(f"radius and correct must both have shape (N,) (got "
                         f"{tuple(radius.shape)} and {tuple(correct.shape)})")
    r = torch.as_tensor(radii, dtype=torch.float64).reshape(-1).cpu()
    certified = correct.cpu().bool()[:, None] & (radius.cpu().double()[:, None] >= r[None])
    return certified.double().mean(0) if len(radius) else torch.zeros_like(r)


@dataclass
class SmoothingResult:
    """What :meth:`SmoothedClassifier.certify` returns; every tensor is per image (N,).

    Attributes:
        predictions: the smoothed classifier's class, :data:`ABSTAIN` (-1) where it
            abstains (``p_lower <= 1/2``).
        radius: the certified L2 radius ``sigma * Phi^-1(p_lower)`` (pixel units of the
            [0, 1] scale); 0 where abstained. With probability ``>= 1 - alpha`` over the
            sampling, ``g`` predicts ``predictions`` everywhere within ``radius``.
        p_lower: the Clopper-Pearson lower bound on the top class's probability.
        counts: how many of the ``n`` estimation samples voted for the selected class.
        labels: the true labels given to ``certify``, else None.
        correct: ``predictions == labels`` (never where abstained), else None.
        forward_passes: images sent through the base model (``N * (1 + n0 + n)``: one
            clean pass for the entry checks).
        threat: the L2 threat model :func:`certify_smoothing` certified against (None from
            :meth:`SmoothedClassifier.certify`); :attr:`verified` reads its eps.
    """

    predictions: Tensor
    radius: Tensor
    p_lower: Tensor
    counts: Tensor
    labels: Tensor | None
    correct: Tensor | None
    sigma: float
    n0: int
    n: int
    alpha: float
    seed: int
    forward_passes: int
    seconds: float
    config: dict = field(default_factory=dict)
    threat: ThreatModel | None = None
    method: str = "smoothing"

    def __len__(self) -> int:
        return self.predictions.shape[0]

    @property
    def abstained(self) -> Tensor:
        """Per image: the smoothed classifier abstained."""
        return self.predictions == ABSTAIN

    def certified_accuracy(self, radii: Sequence[float] | Tensor) -> Tensor:
        """Certified accuracy at each of ``radii`` (see :func:`certified_accuracy`)."""
        if self.correct is None:
            raise ValueError("certified accuracy needs the true labels: pass y to certify()")
        return certified_accuracy(self.radius, self.correct, radii)

    def verified_at(self, eps: float) -> Tensor:
        """Per image: certified correct on the whole L2 ball of radius ``eps``."""
        if self.correct is None:
            raise ValueError("verified needs the true labels: pass y to certify()")
        return self.correct & (self.radius >= eps)

    @property
    def verified(self) -> Tensor:
        """Per image: certified correct within the threat model's eps (as
        :class:`advkit.verify.certify`'s certificates say it), from :func:`certify_smoothing`."""
        if self.threat is None:
            raise ValueError("no threat model was given: use verified_at(eps), or "
                             "certify_smoothing(model, x, y, threat, sigma=...)")
        return self.verified_at(self.threat.eps)

    @property
    def verified_accuracy(self) -> float:
        """The share of images certified correct within the threat model's eps."""
        return float(self.verified.float().mean()) if len(self) else 0.0


class SmoothedClassifier:
    """The Gaussian-smoothed version ``g`` of a base classifier (Cohen et al. 2019).

    Args:
        model: the base classifier (``nn.Module``, images in [0, 1] -> logits), in eval
            mode. Ideally trained on ``x + N(0, sigma^2 I)``
            (:class:`advkit.training.noise.GaussianAugmentation` with the same sigma).
        sigma: the noise standard deviation, in pixel units of the [0, 1] scale; larger
            sigma allows larger radii but lowers clean accuracy.

    Runs on the model's device; the noise is drawn there with seeded generators (one
    stream per image and purpose), so a seeded call is reproducible on one device and
    independent of ``batch_size``.
    """

    def __init__(self, model: nn.Module, sigma: float) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module (got {type(model).__name__})")
        self.model = model
        self.sigma = _check_sigma(sigma)

    def predict(self, x: Tensor, n: int = 100_000, alpha: float = 0.001,
                batch_size: int = 1000, *, seed: int = 0, progress: bool = False) -> Tensor:
        """Algorithm PREDICT: the smoothed class of each image, or :data:`ABSTAIN`.

        Counts the base model's votes on ``n`` noisy copies of each image and returns the
        top class if a two-sided binomial test of the top two counts ``nA`` against ``nA +
        nB`` trials at 1/2 rejects at level ``alpha``; else abstains. The probability of
        returning a class other than ``g(x)`` is at most ``alpha``.

        Args:
            x: (N, C, H, W) images in [0, 1].
            n: noisy samples per image (the paper: 100,000; see the module note on cost).
            alpha: the test's level, in (0, 1).
            batch_size: noisy images per forward pass (memory, not the result).
            seed: the noise seed; the same seed gives the same answer on one device.
            progress: show a progress bar over images.

        Returns:
            (N,) int64 classes on x's device, :data:`ABSTAIN` where abstained.
        """
        _check_count("n", n)
        _check_alpha(alpha)
        _check_count("batch_size", batch_size)
        x, _, x_device = self._enter(x, None, batch_size)
        counts = self._counts(x, n, _PREDICT, batch_size, seed, progress, "smoothing predict")
        top2 = counts.topk(2, dim=1)
        predictions = torch.full((len(x),), ABSTAIN, dtype=torch.long)
        for i, ((n_a, n_b), (c_a, _)) in enumerate(zip(top2.values.tolist(),
                                                       top2.indices.tolist(), strict=True)):
            # ties (n_a == n_b) give p = 1: the smoothed class is not decided, abstain
            if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
                predictions[i] = c_a
        return predictions.to(x_device)

    def certify(self, x: Tensor, y: Tensor | None = None, n0: int = 100, n: int = 100_000,
                alpha: float = 0.001, batch_size: int = 1000, *, seed: int = 0,
                progress: bool = False) -> SmoothingResult:
        """Algorithm CERTIFY: the smoothed class and a certified L2 radius per image.

        ``n0`` noisy samples select the class ``cA`` (their top vote); ``n`` independent
        samples count its votes ``nA``; ``p_lower`` is the one-sided ``1 - alpha``
        Clopper-Pearson lower bound of ``nA / n``. If ``p_lower > 1/2`` the radius is
        ``sigma * Phi^-1(p_lower)``, else the classifier abstains (radius 0). With
        probability ``>= 1 - alpha`` a returned class is ``g(x)`` and ``g`` is constant
        within the radius.

        Args:
            x: (N, C, H, W) images in [0, 1].
            y: (N,) true labels (optional): fills ``correct`` for certified accuracy.
            n0: selection samples per image (the paper: 100).
            n: estimation samples per image (the paper: 100,000; fewer lower every radius,
                see :func:`max_radius`).
            alpha: 1 - confidence of the certificate, in (0, 1) (the paper: 0.001).
            batch_size: noisy images per forward pass (memory, not the result).
            seed: the noise seed; the same seed gives the same result on one device.
            progress: show a progress bar over images.
        """
        _check_count("n0", n0)
        _check_count("n", n)
        _check_alpha(alpha)
        _check_count("batch_size", batch_size)
        start = time.perf_counter()
        x, y, x_device = self._enter(x, y, batch_size)
        select = self._counts(x, n0, _SELECT, batch_size, seed, progress,
                              "smoothing certify: select")
        c_a = select.argmax(1)
        estimate = self._counts(x, n, _ESTIMATE, batch_size, seed, progress,
                                "smoothing certify: estimate")
        n_a = estimate.gather(1, c_a[:, None])[:, 0]
        p_lower = torch.from_numpy(clopper_pearson_lower(n_a.numpy(), n, alpha))
        certified = p_lower > 0.5
        radius = torch.where(certified,
                             self.sigma * torch.from_numpy(norm.ppf(p_lower.numpy())),
                             torch.zeros_like(p_lower))
        predictions = torch.where(certified, c_a, torch.full_like(c_a, ABSTAIN))
        correct = None if y is None else (predictions == y.cpu()).to(x_device)
        return SmoothingResult(
            predictions=predictions.to(x_device), radius=radius.to(x_device),
            p_lower=p_lower.to(x_device), counts=n_a.to(x_device),
            labels=None if y is None else y.to(x_device), correct=correct, sigma=self.sigma,
            n0=n0, n=n, alpha=alpha, seed=seed, forward_passes=len(x) * (1 + n0 + n),
            seconds=time.perf_counter() - start,
            config={"sigma": self.sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed,
                    "batch_size": batch_size})

    def _enter(self, x: Tensor, y: Tensor | None, batch_size: int
               ) -> tuple[Tensor, Tensor | None, torch.device]:
        """The entry checks; returns x and y on the model's device and x's own device."""
        if any(m.training for m in self.model.modules()):
            raise ValueError(
                "the model is in train mode: call model.eval() first (dropout and batch-norm "
                "batch statistics would make the base classifier depend on the batch, and "
                "the certificate is for one fixed classifier)")
        x_device = x.device if isinstance(x, Tensor) else torch.device("cpu")
        labels = y if y is not None else torch.zeros(
            x.shape[0] if isinstance(x, Tensor) and x.dim() else 0, dtype=torch.long)
        x, labels, _ = check_inputs(self.model, x, labels, None, _BOX)
        device = device_of(self.model, x.device)
        x = x.to(device)
        classes = None
        with torch.inference_mode():
            for chunk in x.split(batch_size):
                logits = self.model(chunk)
                if logits.dim() != 2 or logits.shape[0] != len(chunk):
                    raise ValueError(f"the model must return logits of shape (N, classes) "
                                     f"(got {tuple(logits.shape)} for N={len(chunk)})")
                classes = logits.shape[1]
        if classes < 2:
            raise ValueError(f"the model must return logits for at least 2 classes (got "
                             f"{classes})")
        if y is not None:
            check_label_range(classes, labels)
        return x, (labels.cpu() if y is not None else None), x_device

    def _counts(self, x: Tensor, num: int, stream: int, batch_size: int, seed: int,
                progress: bool, description: str) -> Tensor:
        """Per image, the base model's votes on ``num`` noisy copies: (N, classes) int64
        on the CPU. Batches mix images; each image's noise comes from its own stream."""
        counts: Tensor | None = None
        with torch.inference_mode(), progress_bar(progress, description, len(x)) as bar:
            for index, noise, finished in _batches(x, num, stream, batch_size, seed,
                                                   self.sigma):
                logits = self.model(x[index] + noise)
                if not torch.isfinite(logits).all():
                    raise ValueError("the model returned NaN or inf logits on noisy inputs")
                if counts is None:
                    counts = torch.zeros(len(x) * logits.shape[1], dtype=torch.long,
                                         device=x.device)
                classes = logits.shape[1]
                counts.index_add_(0, index * classes + logits.argmax(1),
                                  torch.ones_like(index))
                bar.advance(steps=finished)
        assert counts is not None  # num >= 1 and N >= 1: at least one batch ran
        return counts.view(len(x), -1).cpu()


def certify_smoothing(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                      sigma: float, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                      batch_size: int = 1000, seed: int = 0,
                      progress: bool = False) -> SmoothingResult:
    """Certify the smoothed version of ``model`` on ``threat``'s L2 ball: the
    ``advkit.verify.certify(..., method="smoothing")`` form of
    :meth:`SmoothedClassifier.certify` (same arguments; ``verified`` reads ``threat.eps``).

    The certificate is about the *smoothed* classifier ``g``, not ``model`` itself: an
    attack on the base model may break an image certified here without contradicting it
    (compare it with attacks on ``g``, e.g. EOT over the same noise).

    Raises:
        ValueError: a threat model other than L2 (Gaussian smoothing certifies L2 balls),
            and every error of :meth:`SmoothedClassifier.certify`.
    """
    if not isinstance(threat, ThreatModel) or threat.norm != "l2":
        raise ValueError(f"randomised smoothing with Gaussian noise certifies L2 balls: use "
                         f"ThreatModel('l2', eps) (got {threat!r})")
    result = SmoothedClassifier(model, sigma).certify(
        x, y, n0=n0, n=n, alpha=alpha, batch_size=batch_size, seed=seed, progress=progress)
    result.threat = threat
    return result


def _batches(x: Tensor, num: int, stream: int, batch_size: int, seed: int, sigma: float
             ) -> Iterator[tuple[Tensor, Tensor, int]]:
    """Batches of ``(image index, noise, images finished)``: ``num`` noise samples per
    image, image after image, cut into batches of ``batch_size`` (the last may be
    smaller); ``images finished`` counts the images whose last sample is in the batch."""
    device, shape = x.device, x.shape[1:]
    block = min(num, _BLOCK)
    indices: list[Tensor] = []
    pieces: list[Tensor] = []
    filled = finished = 0
    for i in range(len(x)):
        generator = torch.Generator(device=device).manual_seed(_stream_seed(seed, i, stream))
        drawn = 0
        while drawn < num:
            # always a full block from the stream, then the part needed: the stream's
            # values never depend on where a batch ends
            noise = sigma * torch.randn((block, *shape), generator=generator, device=device,
                                        dtype=x.dtype)[:num - drawn]
            drawn += len(noise)
            while len(noise):
                take = min(batch_size - filled, len(noise))
                pieces.append(noise[:take])
                indices.append(torch.full((take,), i, dtype=torch.long, device=device))
                noise, filled = noise[take:], filled + take
                if drawn == num and not len(noise):
                    finished += 1
                if filled == batch_size:
                    yield torch.cat(indices), torch.cat(pieces), finished
                    indices, pieces, filled, finished = [], [], 0, 0
    if filled:
        yield torch.cat(indices), torch.cat(pieces), finished


def _stream_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for image ``index``'s noise ``stream``, decorrelated from the others
    by numpy's SeedSequence hashing (seed, seed + 1, ... would give related streams)."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & (2**63 - 1)


def _check_sigma(sigma: float) -> float:
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0 (got {sigma!r}); it is the noise "
                         "standard deviation in [0, 1] pixel units, e.g. 0.25")
    return float(sigma)


def _check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) (got {alpha!r}); the paper uses 0.001, "
                         "a 99.9% confidence")
    return float(alpha)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
    return int(value)
