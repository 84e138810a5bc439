"""JSMA (Papernot et al., 2016): a targeted L0 attack that changes at most gamma of the features."""

from __future__ import annotations

import math

import pytest
import torch
from toys import toy_cnn

from advkit import ThreatModel
from advkit.attacks.jsma import JSMA, _best_pairs

NO_CAP = ThreatModel("l1", math.inf)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (24,), generator=g)
    return x, y, (y + 1 + torch.randint(0, 9, (24,), generator=g)) % 10


def changed_features(result, x):
    return (result.x_adv != x).flatten(1).sum(1)


@pytest.fixture(scope="module")
def mnist_slice(mnist_test):
    x, y = mnist_test
    x, y = x[:50], y[:50]
    return x, y, (y + 1 + torch.arange(50) % 9) % 10  # every other class in turn


@pytest.fixture(scope="module")
def mnist_increase(mnist_model, mnist_slice):
    x, y, t = mnist_slice
    return JSMA(NO_CAP, theta=1.0, gamma=0.1)(mnist_model, x, y, t)


# --- the contract ------------------------------------------------------------------------

def test_success_flags_agree_with_a_fresh_forward_pass(batch):
    model, (x, y, t) = toy_cnn(), batch
    result = JSMA(NO_CAP, gamma=0.3)(model, x, y, t)
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred == t)
    assert result.success.any()


def test_outputs_stay_in_the_box_and_change_at_most_gamma_of_the_features(batch):
    model, (x, y, t) = toy_cnn(), batch
    result = JSMA(NO_CAP, gamma=0.25)(model, x, y, t)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert (changed_features(result, x) <= math.floor(0.25 * 64)).all()
    assert torch.equal(result.extras["l0"], changed_features(result, x))


def test_where_the_target_is_not_reached_x_itself_is_returned(batch):
    model, (x, y, t) = toy_cnn(), batch
    result = JSMA(NO_CAP, gamma=0.05)(model, x, y, t)
    failed = ~result.success
    assert failed.any()
    assert torch.equal(result.x_adv[failed], x[failed])
    assert torch.isinf(result.norms[failed]).all()


def test_same_input_same_result(batch):
    model, (x, y, t) = toy_cnn(), batch
    a = JSMA(NO_CAP, gamma=0.3, seed=1)(model, x, y, t)
    b = JSMA(NO_CAP, gamma=0.3, seed=2)(model, x, y, t)
    assert torch.equal(a.x_adv, b.x_adv)


def test_a_sample_already_at_its_target_is_left_unchanged(batch):
    model, (x, _, _) = toy_cnn(), batch
    with torch.no_grad():
        pred = model(x).argmax(1)
    result = JSMA(NO_CAP)(model, x, (pred + 1) % 10, targets=pred)
    assert result.success.all()
    torch.testing.assert_close(result.x_adv, x)
    assert result.backward_passes == x.shape[0]  # one softmax Jacobian each, then done


def test_a_linf_cap_bounds_every_feature_change(batch):
    model, (x, y, t) = toy_cnn(), batch
    result = JSMA(ThreatModel("linf", 0.5), gamma=0.5)(model, x, y, t)
    assert ((result.x_adv - x).abs() <= 0.5 + 1e-6).all()
    assert result.success.any()


def test_partial_theta_moves_features_in_steps_of_theta(batch):
    model, (x, y, t) = toy_cnn(), batch
    x = (x * 4).round() / 8  # values on a grid of 1/8, inside [0, 0.5]
    result = JSMA(NO_CAP, theta=0.125, gamma=0.3)(model, x, y, t)
    moved = result.x_adv - x
    assert (moved >= 0).all()
    steps = moved / 0.125
    torch.testing.assert_close(steps, steps.round(), atol=1e-5, rtol=0)


# --- the pairwise saliency search --------------------------------------------------------

def _exhaustive(alpha, beta, domain, changed, budget, increase):
    """The paper's map over every pair (p != q), written the slow, obvious way."""
    s = 1.0 if increase else -1.0
    a2 = alpha[:, :, None] + alpha[:, None, :]
    b2 = beta[:, :, None] + beta[:, None, :]
    ok = (s * a2 > 0) & (s * b2 < 0) & domain[:, :, None] & domain[:, None, :]
    ok &= ~torch.eye(alpha.shape[1], dtype=torch.bool)
    new = (~changed).long()[:, :, None] + (~changed).long()[:, None, :]
    ok &= new <= budget[:, None, None]
    return torch.where(ok, -a2 * b2, torch.zeros_like(a2)).flatten(1).amax(1)


@pytest.mark.parametrize("increase", [True, False])
def test_pruned_pair_search_finds_the_exhaustive_optimum(increase):
    g = torch.Generator().manual_seed(3)
    m, d = 40, 120
    alpha, beta = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
    domain = torch.rand(m, d, generator=g) < 0.8
    changed = torch.rand(m, d, generator=g) < 0.2
    budget = torch.randint(0, 4, (m,), generator=g)  # includes the tight budgets 0 and 1
    p, q, none_left = _best_pairs(alpha, beta, domain, changed, budget, increase)
    best = _exhaustive(alpha, beta, domain, changed, budget, increase)
    s = 1.0 if increase else -1.0
    found = -(alpha.gather(1, p[:, None]) + alpha.gather(1, q[:, None])).squeeze(1) * (
        beta.gather(1, p[:, None]) + beta.gather(1, q[:, None])).squeeze(1)
    assert torch.equal(none_left, best == 0)
    ok = ~none_left
    torch.testing.assert_close(found[ok], best[ok])
    assert (p[ok] != q[ok]).all() and domain.gather(1, p[:, None])[ok].all()
    assert (s * (alpha.gather(1, p[:, None]) + alpha.gather(1, q[:, None])))[ok].gt(0).all()


# --- the real model ----------------------------------------------------------------------

def test_reaches_most_targets_on_mnist_within_gamma(mnist_increase, mnist_slice):
    x, _, t = mnist_slice
    result = mnist_increase
    print(f"JSMA theta=+1 gamma=0.1 on 50 MNIST images: {result.success_rate:.0%} reach their "
          f"target, mean L0 {result.extras['l0'][result.success].float().mean():.1f} pixels, "
          f"{result.seconds:.1f} s")
    assert result.success_rate >= 0.9  # 96-100% over the 7 retrainings (conftest)
    assert (changed_features(result, x) <= math.floor(0.1 * 784)).all()
    assert torch.equal(result.predictions[result.success], t[result.success])


def test_the_increase_variant_only_raises_pixels(mnist_increase, mnist_slice):
    x = mnist_slice[0]
    assert (mnist_increase.x_adv >= x).all()
    assert mnist_increase.x_adv.max() <= 1


def test_the_decrease_variant_only_lowers_pixels_and_reaches_targets(mnist_model, mnist_slice):
    x, y, t = (v[:20] for v in mnist_slice)
    result = JSMA(NO_CAP, theta=-1.0, gamma=0.1)(mnist_model, x, y, t)
    print(f"JSMA theta=-1 gamma=0.1 on 20 MNIST images: {result.success_rate:.0%}")
    assert (result.x_adv <= x).all() and result.x_adv.min() >= 0
    assert (changed_features(result, x) <= math.floor(0.1 * 784)).all()
    assert result.success_rate >= 0.4  # 90-100% over the 7 retrainings (conftest)


def test_the_logit_saliency_map_also_reaches_many_targets(mnist_model, mnist_slice):
    x, y, t = (v[:20] for v in mnist_slice)
    result = JSMA(NO_CAP, gamma=0.1, scores="logits")(mnist_model, x, y, t)
    print(f"JSMA-Z (logits) theta=+1 gamma=0.1 on 20 MNIST images: {result.success_rate:.0%}")
    # 65-95% over the 7 retrainings (conftest), a wide spread on 20 images: the bound of 50%
    # it had sat three images below the lowest
    assert result.success_rate >= 0.4
    assert (changed_features(result, x) <= math.floor(0.1 * 784)).all()
    assert result.backward_passes > 0 and result.backward_passes % 2 == 0  # two per Jacobian


# --- bad inputs and configurations -------------------------------------------------------

def test_targets_are_required(batch):
    x, y, _ = batch
    with pytest.raises(ValueError, match="targeted: pass targets="):
        JSMA(NO_CAP)(toy_cnn(), x, y)


def test_bad_configurations_are_refused(batch):
    with pytest.raises(ValueError, match="theta must be"):
        JSMA(NO_CAP, theta=0.0)
    with pytest.raises(ValueError, match="theta must be"):
        JSMA(NO_CAP, theta=2.0)
    with pytest.raises(ValueError, match="gamma must be in"):
        JSMA(NO_CAP, gamma=0.0)
    with pytest.raises(ValueError, match="unknown scores"):
        JSMA(NO_CAP, scores="probits")
    x, y, t = batch
    with pytest.raises(ValueError, match="changes features in pairs"):
        JSMA(NO_CAP, gamma=0.01)(toy_cnn(), x, y, t)  # 0 of 64 features
