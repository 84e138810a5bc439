"""Randomised smoothing (Cohen et al. 2019): closed forms on linear models, the
Clopper-Pearson bound, abstention, reproducibility, entry checks, a real MNIST model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, binomtest, norm
from torch import nn
from toys import affine, toy_cnn

from advkit.threat import ThreatModel
from advkit.verify import (
    ABSTAIN,
    SmoothedClassifier,
    certified_accuracy,
    certify_smoothing,
    clopper_pearson_lower,
    max_radius,
)


def binary_linear(seed: int = 0) -> tuple[nn.Module, torch.Tensor, float]:
    """A two-class affine classifier on 1x8x8 inputs with its decision direction
    ``w = w_1 - w_0`` and offset ``b = b_1 - b_0`` (class 1 iff ``w.x + b > 0``)."""
    model = affine(classes=2, seed=seed)
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    return model, weight[1] - weight[0], float(bias[1] - bias[0])


def at_distances(w: torch.Tensor, b: float, distances: list[float], seed: int = 0
                 ) -> torch.Tensor:
    """Images in [0, 1] at signed L2 distance ``distances`` from the hyperplane
    ``w.x + b = 0`` (positive: class 1): mid-grey noise moved along w."""
    g = torch.Generator().manual_seed(seed)
    base = 0.3 + 0.4 * torch.rand(len(distances), 64, generator=g)
    unit = w / w.norm()
    now = (base @ w + b) / w.norm()
    x = base + (torch.tensor(distances) - now)[:, None] * unit
    assert x.min() >= 0 and x.max() <= 1, "pick distances that keep the images in the box"
    return x.view(-1, 1, 8, 8)


# --- closed form on a linear model ----------------------------------------------------


def test_votes_of_a_linear_model_follow_the_gaussian_closed_form():
    # For f(x) = [w.x + b > 0], P(f(x + e) = class of x) = Phi(|w.x + b| / (sigma ||w||)).
    model, w, b = binary_linear()
    sigma, n, distances = 0.25, 20_000, [0.05, 0.1, 0.2, -0.15]
    x = at_distances(w, b, distances)
    result = SmoothedClassifier(model, sigma).certify(x, n=n, batch_size=5000)
    p_exact = torch.tensor([norm.cdf(abs(d) / sigma) for d in distances], dtype=torch.float64)
    p_hat = result.counts.double() / n
    # 5 binomial standard deviations: a seeded draw, far inside the tail
    assert ((p_hat - p_exact).abs() <= 5 * (p_exact * (1 - p_exact) / n).sqrt()).all()
    assert result.predictions.tolist() == [1, 1, 1, 0]


def test_certified_radius_is_sigma_times_inverse_phi_of_the_lower_bound():
    model, w, b = binary_linear()
    sigma, n, alpha = 0.5, 5000, 0.01
    x = at_distances(w, b, [0.1, 0.3, 0.6, -0.4])
    result = SmoothedClassifier(model, sigma).certify(x, n=n, alpha=alpha)
    p_lower = clopper_pearson_lower(result.counts, n, alpha)
    assert torch.allclose(result.p_lower, torch.from_numpy(p_lower))
    assert torch.allclose(result.radius, sigma * torch.from_numpy(norm.ppf(p_lower)))


def test_certified_radius_is_sound_and_converges_to_the_distance_to_the_boundary():
    # The smoothed version of a linear classifier is the classifier itself, with exact
    # certified radius sigma * Phi^-1(pA) = |w.x + b| / ||w||: the distance to the boundary.
    model, w, b = binary_linear()
    sigma, distances = 0.25, [0.1, 0.2, 0.4, -0.3]
    x = at_distances(w, b, distances)
    smoothed = SmoothedClassifier(model, sigma)
    true = torch.tensor(distances, dtype=torch.float64).abs()
    gaps = []
    for n in (1_000, 10_000, 100_000):
        radius = smoothed.certify(x, n=n, batch_size=10_000).radius
        assert (radius <= true).all(), f"unsound at n={n}: {radius} > {true}"
        gaps.append((true - radius).max().item())
    # Clopper-Pearson slack shrinks like 1/sqrt(n): at n=100,000 and alpha=0.001 the
    # bound sits about 3.1 standard errors (< 0.005 in pA) below pA, i.e. < 0.01 in radius.
    assert gaps[2] < 0.01
    assert gaps[2] < gaps[1] < gaps[0]


def test_radii_exceed_the_true_distance_no_more_often_than_theory_allows():
    # A radius is unsound when the Clopper-Pearson bound overshoots pA: for the linear model
    # that has an exact probability per image, at most alpha. Over many images at a loose
    # alpha and a small n, the share of unsound radii must not exceed its expectation
    # (plus 3 standard errors), and that expectation must not exceed alpha.
    model, w, b = binary_linear()
    sigma, n, alpha = 0.25, 100, 0.2
    g = torch.Generator().manual_seed(5)
    distances = (0.05 + 0.3 * torch.rand(300, generator=g)).double()
    result = SmoothedClassifier(model, sigma).certify(
        at_distances(w, b, distances.tolist(), seed=5), n0=20, n=n, alpha=alpha, seed=11)
    unsound = (result.radius > distances).double().mean().item()
    k = np.arange(n + 1)
    bound = clopper_pearson_lower(k, n, alpha)
    p_a = norm.cdf(distances.numpy() / sigma)
    expected = np.mean([binom.pmf(k[bound > p], n, p).sum() for p in p_a])
    assert expected <= alpha
    assert unsound <= expected + 3 * math.sqrt(expected * (1 - expected) / len(distances))


def test_all_votes_for_one_class_give_the_largest_radius_n_allows():
    model, w, b = binary_linear()
    x = at_distances(w, b, [0.45])  # 9 sigma from the boundary: every vote agrees
    result = SmoothedClassifier(model, 0.05).certify(x, n=1000, alpha=0.001)
    assert result.counts.item() == 1000
    assert result.radius.item() == pytest.approx(max_radius(0.05, 1000, 0.001))
    assert result.radius.item() < 0.45  # the cap, not the true radius, is what n buys


# --- abstention --------------------------------------------------------------------------


def test_predict_abstains_on_the_decision_boundary():
    model, w, b = binary_linear()
    x = at_distances(w, b, [0.0] * 20, seed=1)  # pA = 1/2 exactly
    predictions = SmoothedClassifier(model, 0.25).predict(x, n=2000, alpha=0.001)
    # a false decision has probability <= alpha = 0.001 per image
    assert (predictions == ABSTAIN).all()


def test_certify_abstains_on_the_decision_boundary_with_radius_zero():
    model, w, b = binary_linear()
    x = at_distances(w, b, [0.0] * 10, seed=2)
    result = SmoothedClassifier(model, 0.25).certify(x, n=2000)
    assert result.abstained.all()
    assert (result.radius == 0).all() and (result.p_lower <= 0.5).all()


def test_predict_returns_the_class_away_from_the_boundary():
    model, w, b = binary_linear()
    x = at_distances(w, b, [0.3, -0.3, 0.5])
    predictions = SmoothedClassifier(model, 0.25).predict(x, n=500)
    assert predictions.tolist() == [1, 0, 1]


def test_abstentions_are_never_correct():
    model, w, b = binary_linear()
    x = at_distances(w, b, [0.0] * 4, seed=3)
    result = SmoothedClassifier(model, 0.25).certify(x, torch.ones(4, dtype=torch.long), n=500)
    assert result.abstained.all() and not result.correct.any()


# --- Clopper-Pearson -----------------------------------------------------------------------


@pytest.mark.parametrize("k, n, alpha", [(0, 10, 0.05), (5, 10, 0.05), (10, 10, 0.001),
                                         (990, 1000, 0.001), (99_990, 100_000, 0.001),
                                         (1, 7, 0.3)])
def test_clopper_pearson_lower_bound_matches_scipys_exact_interval(k, n, alpha):
    # the one-sided 1 - alpha bound is the lower end of the two-sided 1 - 2 alpha interval
    exact = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    if k:  # and it is the p at which k or more successes have probability alpha
        assert binom.sf(k - 1, n, float(clopper_pearson_lower(k, n, alpha))) == \
            pytest.approx(alpha, rel=1e-6)


def test_clopper_pearson_refuses_counts_outside_zero_to_n():
    with pytest.raises(ValueError, match=r"k must be in \[0, n=10\]"):
        clopper_pearson_lower(11, 10, 0.01)


def test_max_radius_follows_alpha_to_the_one_over_n():
    assert max_radius(1.0, 100_000, 0.001) == pytest.approx(norm.ppf(0.001 ** 1e-5))
    assert max_radius(0.25, 100_000) == pytest.approx(0.953, abs=5e-4)  # Cohen et al.'s cap
    assert max_radius(1.0, 1000) < max_radius(1.0, 10_000) < max_radius(1.0, 100_000)


# --- certified accuracy --------------------------------------------------------------------


def test_certified_accuracy_counts_an_image_at_every_radius_up_to_its_own():
    radius = torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=torch.float64)
    correct = torch.tensor([True, True, False, False])  # an abstention, a certified mistake
    curve = certified_accuracy(radius, correct, [0.0, 0.5, 0.75, 1.0, 1.5])
    assert curve.tolist() == [0.5, 0.5, 0.25, 0.25, 0.0]


def test_result_certified_accuracy_is_the_same_curve():
    model, w, b = binary_linear()
    x = at_distances(w, b, [0.1, 0.3, -0.2, 0.0])
    result = SmoothedClassifier(model, 0.25).certify(x, torch.tensor([1, 1, 1, 0]), n=2000)
    radii = [0.0, 0.1, 0.2, 0.5]
    assert torch.equal(result.certified_accuracy(radii),
                       certified_accuracy(result.radius, result.correct, radii))
    assert result.verified_at(0.05).tolist() == [True, True, False, False]


def test_certified_accuracy_needs_labels():
    model, w, b = binary_linear()
    result = SmoothedClassifier(model, 0.25).certify(at_distances(w, b, [0.1]), n=100)
    with pytest.raises(ValueError, match="pass y to certify"):
        result.certified_accuracy([0.0])


def test_certify_smoothing_verifies_within_the_threat_models_eps():
    model, w, b = binary_linear()
    x, y = at_distances(w, b, [0.1, 0.3, -0.2, 0.0]), torch.tensor([1, 1, 1, 0])
    cert = certify_smoothing(model, x, y, ThreatModel("l2", 0.05), sigma=0.25, n=2000)
    direct = SmoothedClassifier(model, 0.25).certify(x, y, n=2000)
    assert torch.equal(cert.radius, direct.radius)  # same seed, same draws
    assert cert.verified.tolist() == direct.verified_at(0.05).tolist() == \
        [True, True, False, False]
    assert cert.verified_accuracy == 0.5 and cert.method == "smoothing"


def test_certify_smoothing_refuses_a_norm_other_than_l2():
    model, w, b = binary_linear()
    with pytest.raises(ValueError, match="certifies L2 balls"):
        certify_smoothing(model, at_distances(w, b, [0.1]), torch.tensor([1]),
                          ThreatModel("linf", 0.1), sigma=0.25, n=10)


def test_verified_without_a_threat_model_names_the_fix():
    model, w, b = binary_linear()
    result = SmoothedClassifier(model, 0.25).certify(at_distances(w, b, [0.1]),
                                                     torch.tensor([1]), n=10)
    with pytest.raises(ValueError, match=r"verified_at\(eps\)"):
        _ = result.verified


# --- sampling: seeds, batches, noise, cost ---------------------------------------------------


def test_a_seeded_run_is_reproducible_and_another_seed_draws_other_noise():
    model = toy_cnn()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    smoothed = SmoothedClassifier(model, 0.5)
    first, again = (smoothed.certify(x, n=300, seed=7) for _ in range(2))
    other = smoothed.certify(x, n=300, seed=8)
    assert torch.equal(first.counts, again.counts) and torch.equal(first.radius, again.radius)
    assert not torch.equal(first.counts, other.counts)


@pytest.mark.parametrize("make", [toy_cnn, lambda: affine(classes=10)], ids=["cnn", "affine"])
def test_batch_size_does_not_change_a_seeded_result(make):
    model = make()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    smoothed = SmoothedClassifier(model, 0.5)
    # 1 and 7 cut inside the noise blocks and across images; 10,000 holds several images
    runs = [smoothed.certify(x, n0=30, n=1500, batch_size=bs, seed=3) for bs in (1, 7, 10_000)]
    for run in runs[1:]:
        assert torch.equal(run.counts, runs[0].counts)
        assert torch.equal(run.predictions, runs[0].predictions)
    predictions = [smoothed.predict(x, n=700, batch_size=bs, seed=3) for bs in (13, 4096)]
    assert torch.equal(*predictions)


class _Recorder(nn.Module):
    """Passes inputs to a model and records the images it saw and their range."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.images, self.low, self.high = model, 0, math.inf, -math.inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        self.low, self.high = min(self.low, x.min().item()), max(self.high, x.max().item())
        return self.model(x)


def test_noise_is_not_clipped_to_the_box():
    # the certificate is for the classifier of exactly x + N(0, sigma^2 I)
    recorder = _Recorder(toy_cnn()).eval()
    x = torch.cat([torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)])
    SmoothedClassifier(recorder, 0.25).certify(x, n=200)
    assert recorder.low < -0.5 and recorder.high > 1.5


def test_forward_passes_are_counted():
    recorder = _Recorder(toy_cnn()).eval()
    x = torch.rand(3, 1, 8, 8)
    result = SmoothedClassifier(recorder, 0.25).certify(x, n0=20, n=150, batch_size=64)
    assert result.forward_passes == recorder.images == 3 * (1 + 20 + 150)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0, -0.25, math.nan, math.inf])
def test_sigma_must_be_positive_and_finite(sigma):
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        SmoothedClassifier(toy_cnn(), sigma)


@pytest.mark.parametrize("alpha", [0, 1, 1.5, -0.1])
def test_alpha_must_be_inside_zero_one(alpha):
    smoothed = SmoothedClassifier(toy_cnn(), 0.25)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        smoothed.certify(torch.rand(1, 1, 8, 8), n=10, alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        smoothed.predict(torch.rand(1, 1, 8, 8), n=10, alpha=alpha)


@pytest.mark.parametrize("name, value", [("n0", 0), ("n", 0), ("n", -5), ("n", 2.5),
                                         ("batch_size", 0)])
def test_sample_counts_must_be_positive_integers(name, value):
    smoothed = SmoothedClassifier(toy_cnn(), 0.25)
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
        smoothed.certify(torch.rand(1, 1, 8, 8), **{"n0": 10, "n": 10, name: value})


def test_a_train_mode_model_is_refused():
    model = toy_cnn().train()
    with pytest.raises(ValueError, match=r"train mode: call model.eval\(\)"):
        SmoothedClassifier(model, 0.25).certify(torch.rand(2, 1, 8, 8), n=10)


def test_a_single_image_without_batch_dimension_is_refused():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*unsqueeze\(0\)"):
        SmoothedClassifier(toy_cnn(), 0.25).predict(torch.rand(1, 8, 8), n=10)


def test_images_outside_the_box_are_refused():
    with pytest.raises(ValueError, match="outside the bounds"):
        SmoothedClassifier(toy_cnn(), 0.25).certify(torch.rand(2, 1, 8, 8) * 255, n=10)


@pytest.mark.parametrize("y", [torch.tensor([0, 10]), torch.tensor([-1, 0])])
def test_labels_outside_the_models_classes_are_refused(y):
    with pytest.raises(ValueError, match=r"y must be in \[0, 9\]"):
        SmoothedClassifier(toy_cnn(), 0.25).certify(torch.rand(2, 1, 8, 8), y, n=10)


def test_labels_must_match_the_images():
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        SmoothedClassifier(toy_cnn(), 0.25).certify(torch.rand(2, 1, 8, 8),
                                                    torch.tensor([1, 2, 3]), n=10)


def test_the_model_must_be_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        SmoothedClassifier(lambda x: x, 0.25)


# --- a real model ----------------------------------------------------------------------------


def test_mnist_cnn_keeps_its_clean_predictions_under_smoothing(mnist_model, mnist_test):
    # The test CNN is trained on clean digits (no noise augmentation); at sigma 0.25 its
    # smoothed predictions should still mostly agree with its clean ones.
    x, y = mnist_test[0][:8], mnist_test[1][:8]
    with torch.no_grad():
        clean = mnist_model(x).argmax(1)
    result = SmoothedClassifier(mnist_model, 0.25).certify(x, y, n0=32, n=256, batch_size=512)
    assert (result.radius >= 0).all()
    assert (result.radius[result.abstained] == 0).all()
    assert (result.radius <= max_radius(0.25, 256) + 1e-12).all()
    decided = ~result.abstained
    assert decided.sum() >= 6
    assert (result.predictions[decided] == clean[decided]).float().mean() >= 0.8


def test_certify_dispatches_smoothing_and_refuses_its_options_elsewhere():
    """certify(method="smoothing") is certify_smoothing with the same seed; sigma is
    required there and refused with the bound methods."""
    from advkit.threat import ThreatModel
    from advkit.verify import certify, certify_smoothing

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    threat = ThreatModel("l2", 0.1)
    via = certify(model, x, y, threat, "smoothing", sigma=0.25, n0=50, n=500, seed=3)
    direct = certify_smoothing(model, x, y, threat, sigma=0.25, n0=50, n=500, seed=3)
    assert torch.equal(via.radius, direct.radius) and torch.equal(via.verified, direct.verified)
    with pytest.raises(ValueError, match="needs sigma"):
        certify(model, x, y, threat, "smoothing")
    with pytest.raises(ValueError, match="go with method='smoothing'"):
        certify(model, x, y, threat, "crown", sigma=0.25)
