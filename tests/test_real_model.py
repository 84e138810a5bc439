"""A real model on real data: the small MNIST CNN (trained once, cached) against the attacks."""

from __future__ import annotations

import pytest
import torch

from advkit import ThreatModel
from advkit.attacks import FGSM, PGD
from advkit.evaluation import accuracy, run_attack


def test_clean_accuracy_is_at_least_98_percent(mnist_model, mnist_test):
    x, y = mnist_test
    assert accuracy(mnist_model, x, y) >= 0.98  # 98.84-99.04% over the 7 retrainings (conftest)


def test_pgd_linf_03_takes_robust_accuracy_to_at_most_2_percent(mnist_model, mnist_test):
    x, y = mnist_test
    result = run_attack(PGD(ThreatModel("linf", 0.3), steps=40), mnist_model, x, y,
                        batch_size=1000, progress=False)
    assert result.robust_accuracy <= 0.02  # 0.00% on each of the 7 retrainings (conftest)
    assert (result.norms <= 0.3 + 1e-6).all()


def test_fgsm_linf_03_takes_robust_accuracy_to_at_most_40_percent(mnist_model, mnist_test):
    x, y = mnist_test
    result = run_attack(FGSM(ThreatModel("linf", 0.3)), mnist_model, x, y, batch_size=2000,
                        progress=False)
    assert result.robust_accuracy <= 0.40  # 1.5-2.5% over the 7 retrainings (conftest)


def test_pgd_is_at_least_as_strong_as_fgsm_at_every_eps(mnist_model, mnist_test):
    x, y = mnist_test[0][:500], mnist_test[1][:500]
    for eps in (0.05, 0.1, 0.2):
        threat = ThreatModel("linf", eps)
        fgsm = FGSM(threat)(mnist_model, x, y)
        pgd = PGD(threat, steps=20)(mnist_model, x, y)
        # FGSM minus PGD over the 7 retrainings (conftest): 1.2-3.4 points at 0.05 (6 images
        # or more), 12-20 at 0.1, 17-28 at 0.2
        assert pgd.robust_accuracy <= fgsm.robust_accuracy


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.3), ("l2", 4.0)])
def test_targeted_pgd_reaches_the_targets_on_mnist(mnist_model, mnist_test, norm, eps):
    x, y = mnist_test[0][:200], mnist_test[1][:200]
    targets = (y + 1) % 10
    result = PGD(ThreatModel(norm, eps), steps=100, step_size=eps / 20)(mnist_model, x, y, targets)
    # Linf 0.3: 99-100%, L2 4.0: 98-98.5% over the 7 retrainings (conftest)
    assert result.success.float().mean() >= 0.95
    with torch.no_grad():
        assert torch.equal(mnist_model(result.x_adv).argmax(1)[result.success],
                           targets[result.success])


def test_robust_accuracy_falls_as_eps_grows(mnist_model, mnist_test):
    x, y = mnist_test[0][:300], mnist_test[1][:300]
    accs = [PGD(ThreatModel("linf", e), steps=20)(mnist_model, x, y).robust_accuracy
            for e in (0.05, 0.1, 0.15, 0.2)]
    # 93-95%, 57-70%, 9-19%, 0-1.3% over the 7 retrainings (conftest): 9 points apart or more
    assert accs == sorted(accs, reverse=True)
    assert accs[0] > accs[-1]
