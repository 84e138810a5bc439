"""Adaptive attacks on detectors: the detector-aware PGD's directions, its cost, and what it
does to each detector on the MNIST test model (Bryniarski et al. 2022; C&W 2017)."""

from __future__ import annotations

import pytest
import torch
from detection import one_thread
from torch import Tensor
from toys import random_batch, toy_cnn

from advkit import ThreatModel
from advkit.attacks import PGD, OrthogonalPGD
from advkit.attacks.orthogonal_pgd import find_detectors
from advkit.defenses import (
    LID,
    BinaryDetector,
    FeatureSqueezing,
    MagNetDetector,
    Mahalanobis,
    Protected,
    measure,
    protection_metrics,
)

LINF = ThreatModel("linf", 0.3)


def flat_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(1)


def test_orthogonal_steps_do_not_move_the_other_objective_to_first_order():
    torch.manual_seed(0)
    grad_c, grad_d = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    fooled = torch.tensor([True, False] * 3)
    attack = OrthogonalPGD(LINF, mode="orthogonal")
    direction = attack._direction(grad_c, grad_d, fooled)
    # Not yet fooled: ascend c orthogonally to grad d; fooled: descend d orthogonally to c.
    assert flat_dot(direction[~fooled], grad_d[~fooled]).abs().max() < 1e-5
    assert flat_dot(direction[fooled], grad_c[fooled]).abs().max() < 1e-5
    assert (flat_dot(direction[~fooled], grad_c[~fooled]) > 0).all()
    assert (flat_dot(direction[fooled], grad_d[fooled]) < 0).all()
    selective = OrthogonalPGD(LINF, mode="selective")._direction(grad_c, grad_d, fooled)
    assert torch.equal(selective[~fooled], grad_c[~fooled])
    assert torch.equal(selective[fooled], -grad_d[fooled])
    combined = OrthogonalPGD(LINF, mode="combined", weight=2.0)._direction(grad_c, grad_d,
                                                                          fooled)
    assert torch.allclose(combined, grad_c - 2 * grad_d)


class MeanAbove:
    """A toy detector: the score is the image mean (differentiable), flagged above 0.4."""

    threshold = 0.4

    def fit(self, *args, **kwargs):
        return self

    def attack_score(self, x: Tensor) -> Tensor:
        return x.flatten(1).mean(1)

    def flag(self, x: Tensor) -> Tensor:
        return self.attack_score(x) > self.threshold


def test_cost_is_one_forward_and_two_backward_passes_per_step_and_image():
    model = toy_cnn()
    x, y = random_batch(6)
    x = x * 0.6  # means about 0.3: accepted unless the attack brightens them
    pipe = Protected(model, detectors=[MeanAbove()])
    assert len(find_detectors(pipe.for_attack())) == 1
    result = OrthogonalPGD(ThreatModel("linf", 0.05), steps=4, seed=0)(pipe, x, y)
    assert int(result.queries.sum()) == result.forward_passes + result.backward_passes
    # Each step a gradient pass costs 1 forward + 2 backward; early exits only lower it.
    assert result.backward_passes == 2 * (result.forward_passes - 6)  # minus the final pass
    assert result.backward_passes <= 2 * 4 * 6


def test_without_detectors_it_is_margin_pgd_and_reaches_its_success():
    model = toy_cnn()
    x, y = random_batch(8)
    ours = OrthogonalPGD(ThreatModel("linf", 0.1), steps=20, seed=0)(model, x, y)
    pgd = PGD(ThreatModel("linf", 0.1), steps=20, loss="margin", seed=0)(model, x, y)
    assert ours.success.float().mean() >= pgd.success.float().mean() - 0.125


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown mode"):
        OrthogonalPGD(LINF, mode="sideways")
    with pytest.raises(ValueError, match="weight"):
        OrthogonalPGD(LINF, weight=0)
    with pytest.raises(ValueError, match="supports norms"):
        OrthogonalPGD(ThreatModel("l1", 5.0))


# --- on the MNIST test model ---------------------------------------------------------------

N_FIT, N_ADV_FIT, N_TEST = 1000, 300, 200


@pytest.fixture(scope="module")
def split(mnist_model, mnist_test):
    """The slice of the MNIST test set the detector tests use: fit images first, then
    images attacked for fitting, then the images attacked here."""
    x, y = mnist_test
    x, y = x[:N_FIT + N_ADV_FIT + N_TEST], y[:N_FIT + N_ADV_FIT + N_TEST]
    adv_fit = PGD(LINF, steps=20, seed=0)(mnist_model, x[N_FIT:N_FIT + N_ADV_FIT],
                                          y[N_FIT:N_FIT + N_ADV_FIT]).x_adv
    return x[:N_FIT], y[:N_FIT], adv_fit, x[-N_TEST:], y[-N_TEST:]


def adaptive_examples(pipe: Protected, x: Tensor, y: Tensor) -> Tensor:
    """The adaptive suite's detector-aware stages in turn (advkit.defenses.measure)."""
    return measure.adaptive_examples(pipe, x, y, LINF, detector_aware_only=True)


# The specification: at the same eps, the adaptive attack brings each detector's
# true-positive rate at 5% false positives below 20%. Measured on these 200 images with
# one OrthogonalPGD run each (100 steps, seed 0): of the adversarial examples that fool the
# classifier, feature squeezing flags 1.5-4%, Mahalanobis 0-26%, LID 0.5-5% depending on
# the variant (orthogonal / selective / combined, logit margin 0 or 5); the suite's worst
# case per image is what is asserted. A non-adaptive PGD-40 is flagged at 98.5%, 100% and
# 52%. On the last 1500 test images (where the detectors' thresholds are tighter: LID
# flags 26% of the last 200 clean images against 5% held out) single runs reach FS 1%,
# Mahalanobis 0%, LID 17-71%: LID is the detector whose bound is thin.
DETECTORS = {
    "feature_squeezing": lambda ae: FeatureSqueezing(),
    "mahalanobis": lambda ae: Mahalanobis(layers=[3, 6, 9]),
    "lid": lambda ae: LID(),
    "magnet": lambda ae: MagNetDetector(ae),
    "binary": lambda ae: BinaryDetector(),
}
NO_ADVERSARIAL = {"feature_squeezing", "magnet"}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_the_adaptive_attack_evades_each_detector(name, mnist_model, mnist_autoencoder, split):
    x_fit, y_fit, adv_fit, x, y = split
    with one_thread():
        detector = DETECTORS[name](mnist_autoencoder).fit(
            mnist_model, x_fit, y_fit, fpr=0.05,
            x_adv=None if name in NO_ADVERSARIAL else adv_fit)
    pipe = Protected(mnist_model, detectors=[detector])
    x_adv = adaptive_examples(pipe, x, y)
    with torch.no_grad():
        fooled = mnist_model(x_adv).argmax(1) != y
    assert fooled.float().mean() >= 0.9
    tpr = detector.flag(x_adv[fooled]).float().mean().item()
    assert tpr < 0.2, f"{name} still flags {tpr:.1%} of the adaptive adversarial examples"
    naive = PGD(LINF, steps=40, seed=0)(mnist_model, x, y).x_adv
    naive_tpr = detector.flag(naive).float().mean().item()
    assert naive_tpr > tpr + 0.3  # the same detector against the non-adaptive attack
    metrics = protection_metrics(pipe, x, y, x_adv)
    # The binary detector leaves the most standing: 16.5% of the 200 images (measured).
    assert metrics.robust_accuracy < 0.25
