"""DeepFool: closed forms on affine classifiers, the contract, and the real MNIST model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from toys import distance_to_boundary, random_batch, toy_cnn

from advkit import ThreatModel
from advkit.attacks.deepfool import DeepFool

NO_CAP = math.inf
#: DeepFool's steps end this far past the linearised boundary (the authors' code).
NUDGE = 1e-4


def affine_model(d: int = 16, classes: int = 2, seed: int = 0) -> nn.Module:
    """f(x) = W x + b with its boundaries passing near the centre of the box."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).eval()
    with torch.no_grad():
        w = torch.randn(classes, d, generator=g)
        model[1].weight.copy_(w)
        model[1].bias.copy_(-0.5 * w.sum(dim=1) + torch.randn(classes, generator=g))
    return model


def central_batch(n: int = 32, d: int = 16) -> torch.Tensor:
    """Images in [0.45, 0.55]: far enough from the box that it does not bind."""
    g = torch.Generator().manual_seed(1)
    return 0.5 + 0.1 * (torch.rand(n, 1, 4, d // 4, generator=g) - 0.5)


@pytest.fixture
def batch():
    return random_batch(32)


# --- closed forms ------------------------------------------------------------------------

@pytest.mark.parametrize("box", ["clip", "project"])
@pytest.mark.parametrize("classes", [2, 10])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_without_overshoot_deepfool_finds_the_exact_distance_to_an_affine_boundary(
        norm, classes, box):
    """One step reaches the nearest hyperplane exactly (plus the documented 1e-4 nudge)."""
    model, x = affine_model(classes=classes, seed=0 if classes == 2 else 1), central_batch()
    y = model(x).argmax(1)
    exact = distance_to_boundary(model, x, y, norm)
    assert exact.max() < 0.4 and exact.min() > 1e-3  # the box does not bind
    result = DeepFool(ThreatModel(norm, NO_CAP), overshoot=0.0, box=box)(model, x, y)
    assert result.success.all()
    torch.testing.assert_close(result.norms, exact + NUDGE, rtol=1e-3, atol=0)
    assert result.backward_passes == x.shape[0] * (classes - 1)  # a single step each


def test_the_overshoot_lengthens_the_step_by_its_factor():
    model, x = affine_model(), central_batch()
    y = model(x).argmax(1)
    exact = distance_to_boundary(model, x, y, "l2")
    result = DeepFool(ThreatModel("l2", NO_CAP), overshoot=0.02)(model, x, y)
    torch.testing.assert_close(result.norms, 1.02 * (exact + NUDGE), rtol=1e-4, atol=0)


def test_the_step_is_perpendicular_to_the_boundary_in_l2_and_a_signed_corner_in_linf():
    model, x = affine_model(), central_batch()
    y = model(x).argmax(1)
    w = model[1].weight.detach()
    towards = torch.stack([w[1 - int(c)] - w[int(c)] for c in y])  # grad of f_other - f_y
    l2 = DeepFool(ThreatModel("l2", NO_CAP), overshoot=0.0)(model, x, y)
    step = (l2.x_adv - x).flatten(1)
    cosine = (step * towards).sum(1) / (step.norm(dim=1) * towards.norm(dim=1))
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    linf = DeepFool(ThreatModel("linf", NO_CAP), overshoot=0.0)(model, x, y)
    step = (linf.x_adv - x).flatten(1)
    torch.testing.assert_close(step, linf.norms[:, None] * towards.sign())


def test_projected_steps_account_for_the_box_and_need_a_single_step():
    """Near the box edge clipping shortens the paper's step; the projected step does not."""
    model = affine_model(seed=0)
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(16, 1, 4, 4, generator=g) < 0.5).float() * 0.98 + 0.01  # near 0 or 1
    y = model(x).argmax(1)
    projected = DeepFool(ThreatModel("l2", NO_CAP), overshoot=0.0, box="project")(model, x, y)
    clipped = DeepFool(ThreatModel("l2", NO_CAP), overshoot=0.0, box="clip")(model, x, y)
    assert projected.success.all() and clipped.success.all()
    assert projected.backward_passes == x.shape[0]
    assert clipped.backward_passes > x.shape[0]


# --- the contract ------------------------------------------------------------------------

@pytest.mark.parametrize("box", ["clip", "project"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_success_flags_agree_with_a_fresh_forward_pass(norm, box, batch):
    model, (x, y) = toy_cnn(), batch
    result = DeepFool(ThreatModel(norm, NO_CAP), box=box)(model, x, y)
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred != y)
    assert torch.equal(result.predictions, pred)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_outputs_stay_in_the_box_and_norms_are_measured_on_them(norm, batch):
    model, (x, y) = toy_cnn(), batch
    result = DeepFool(ThreatModel(norm, NO_CAP))(model, x, y)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    broken = result.success
    torch.testing.assert_close(result.norms[broken],
                               ThreatModel(norm, NO_CAP).norms(result.x_adv - x)[broken])


def test_samples_it_cannot_break_come_back_unchanged_with_infinite_norm(batch):
    model, (x, y) = toy_cnn(), batch
    y = model(x).argmax(1)
    result = DeepFool(ThreatModel("l2", NO_CAP), steps=1, overshoot=0.0)(model, x, y)
    failed = ~result.success
    assert failed.any()
    assert torch.equal(result.x_adv[failed], x[failed])
    assert torch.isinf(result.norms[failed]).all()


def test_an_eps_cap_only_decides_success(batch):
    model, (x, y) = toy_cnn(), batch
    free = DeepFool(ThreatModel("l2", NO_CAP))(model, x, y)
    cap = free.norms[free.success].median().item()
    capped = DeepFool(ThreatModel("l2", cap))(model, x, y)
    assert torch.equal(capped.x_adv, free.x_adv)
    assert torch.equal(capped.success, free.success & (free.norms <= cap))


def test_same_seed_same_result(batch):
    model, (x, y) = toy_cnn(), batch
    a = DeepFool(ThreatModel("l2", NO_CAP), seed=7)(model, x, y)
    b = DeepFool(ThreatModel("l2", NO_CAP), seed=7)(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)


def test_each_step_costs_top_k_backward_passes_and_two_forward_passes():
    model, x = affine_model(classes=10, seed=1), central_batch()
    y = model(x).argmax(1)
    n = x.shape[0]
    result = DeepFool(ThreatModel("l2", NO_CAP), top_k=3)(model, x, y)
    assert result.success.all()  # one step breaks every sample of an affine model
    assert result.backward_passes == 3 * n
    assert result.forward_passes == 4 * n  # entry check, Jacobian, new point, success pass


def test_candidates_are_the_top_k_clean_logits():
    """With top_k=1 only the runner-up class is considered, so it is the one reached."""
    model, x = affine_model(classes=10, seed=1), central_batch()
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    runner_up = logits.topk(2, dim=1).indices[:, 1]
    result = DeepFool(ThreatModel("l2", NO_CAP), top_k=1)(model, x, y)
    assert torch.equal(result.predictions[result.success], runner_up[result.success])
    assert result.success.float().mean() > 0.9


def test_misclassified_samples_cost_no_gradient(batch):
    model, (x, _) = toy_cnn(), batch
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 10
    result = DeepFool(ThreatModel("l2", NO_CAP))(model, x, wrong)
    assert result.success.all() and result.backward_passes == 0
    assert torch.equal(result.x_adv, x) and (result.norms == 0).all()


# --- bad inputs ----------------------------------------------------------------------------

def test_targets_are_refused(batch):
    x, y = batch
    with pytest.raises(ValueError, match="DeepFool is untargeted"):
        DeepFool(ThreatModel("l2", NO_CAP))(toy_cnn(), x, y, targets=(y + 1) % 10)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"overshoot": -0.1}, r"overshoot must be >= 0 \(got -0.1\)"),
    ({"steps": 0}, r"steps must be >= 1 \(got 0\)"),
    ({"top_k": 0}, r"top_k must be >= 1 \(got 0\)"),
    ({"box": "wrap"}, "unknown box handling 'wrap'"),
])
def test_bad_configurations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepFool(ThreatModel("l2", NO_CAP), **kwargs)


def test_l1_is_refused():
    with pytest.raises(ValueError, match="supports norms l2, linf"):
        DeepFool(ThreatModel("l1", NO_CAP))


# --- the real MNIST model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_slice(mnist_test):
    x, y = mnist_test
    return x[:200], y[:200]


@pytest.fixture(scope="module")
def deepfool_l2(mnist_model, mnist_slice):
    x, y = mnist_slice
    return DeepFool(ThreatModel("l2", NO_CAP))(mnist_model, x, y)


def test_deepfool_l2_breaks_at_least_99_percent_of_mnist(deepfool_l2, mnist_model, mnist_slice):
    x, y = mnist_slice
    assert deepfool_l2.success_rate >= 0.99  # 100% on each of the 7 retrainings (conftest)
    with torch.no_grad():
        assert torch.equal(mnist_model(deepfool_l2.x_adv).argmax(1) != y, deepfool_l2.success)
    # Minimal-norm perturbations on MNIST are a few pixels' worth, not noise over the image.
    median = deepfool_l2.norms[deepfool_l2.success].median().item()
    assert 0.5 < median < 3.0  # 1.63-1.77 over the 7 retrainings


def test_deepfool_linf_breaks_at_least_99_percent_of_mnist(mnist_model, mnist_slice):
    x, y = mnist_slice
    result = DeepFool(ThreatModel("linf", NO_CAP))(mnist_model, x[:100], y[:100])
    assert result.success_rate >= 0.99  # 100% on each of the 7 retrainings (conftest)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1


def test_the_robust_accuracy_curve_falls_from_clean_accuracy_to_zero(deepfool_l2, mnist_model,
                                                                     mnist_slice):
    x, y = mnist_slice
    with torch.no_grad():
        clean = (mnist_model(x).argmax(1) == y).float().mean().item()
    eps = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 10.0]
    accuracies = [acc for _, acc in deepfool_l2.curve(eps)]
    assert accuracies[0] == pytest.approx(clean)
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[-1] <= 0.01  # 0% at L2 10 on each of the 7 retrainings (conftest)
