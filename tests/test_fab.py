"""FAB: the box-constrained projection, closed forms on affine classifiers, the contract,
and the real MNIST model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from torch import nn
from toys import distance_to_boundary, random_batch, toy_cnn

from advkit import ThreatModel
from advkit.attacks._linearise import project_onto_hyperplane
from advkit.attacks.deepfool import DeepFool
from advkit.attacks.fab import FAB

NO_CAP = math.inf
#: eta -> 1: the first projection of an affine model lands just past its boundary.
EXACT_ETA = 1 + 1e-5


def affine_model(d: int = 16, classes: int = 2, seed: int = 0) -> nn.Module:
    """f(x) = W x + b with its boundaries passing near the centre of the box."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).eval()
    with torch.no_grad():
        w = torch.randn(classes, d, generator=g)
        model[1].weight.copy_(w)
        model[1].bias.copy_(-0.5 * w.sum(dim=1) + torch.randn(classes, generator=g))
    return model


def central_batch(n: int = 32) -> torch.Tensor:
    """Images in [0.45, 0.55]: far enough from the box that it does not bind."""
    g = torch.Generator().manual_seed(1)
    return 0.5 + 0.1 * (torch.rand(n, 1, 4, 4, generator=g) - 0.5)


def box_constrained_minimum(p: np.ndarray, w: np.ndarray, c: float, norm: str) -> float | None:
    """min ||delta|| s.t. w.delta = c, 0 <= p + delta <= 1 (SciPy); None if infeasible."""
    d = len(p)
    bounds = [(-p[i], 1 - p[i]) for i in range(d)]
    if norm == "l2":
        if abs(c) > np.where(w * np.sign(c) > 0, 1 - p, p) @ np.abs(w) + 1e-12:
            return None
        res = minimize(lambda v: v @ v, np.zeros(d), jac=lambda v: 2 * v, method="SLSQP",
                       bounds=bounds, constraints=[{"type": "eq", "fun": lambda v: w @ v - c}],
                       options={"ftol": 1e-15, "maxiter": 1000})
        return float(np.sqrt(res.fun))
    if norm == "l1":  # delta = u - v with u, v >= 0
        res = linprog(np.ones(2 * d), A_eq=np.concatenate([w, -w])[None], b_eq=[c],
                      bounds=[(0, 1 - p[i]) for i in range(d)] + [(0, p[i]) for i in range(d)])
    else:  # variables (delta, t): minimise t with |delta_i| <= t
        a_ub = np.zeros((2 * d, d + 1))
        for i in range(d):
            a_ub[2 * i, [i, d]] = [1, -1]
            a_ub[2 * i + 1, [i, d]] = [-1, -1]
        res = linprog(np.eye(d + 1)[d], A_ub=a_ub, b_ub=np.zeros(2 * d),
                      A_eq=np.append(w, 0)[None], b_eq=[c], bounds=bounds + [(0, None)])
    return float(res.fun) if res.status == 0 else None


@pytest.fixture
def batch():
    return random_batch(32)


# --- the projection onto a hyperplane inside the box ------------------------------------------

@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_projection_is_the_box_constrained_minimum_of_a_generic_solver(norm):
    g = torch.Generator().manual_seed(0)
    d = 8
    for _ in range(25):
        p = torch.rand(1, d, generator=g, dtype=torch.float64)
        p[0, :3] = torch.tensor([0.0, 1.0, 0.0])  # some coordinates sit on the box
        w = torch.randn(1, d, generator=g, dtype=torch.float64)
        w[0, 5] = 0.0
        c = torch.randn(1, generator=g, dtype=torch.float64)
        delta, feasible = project_onto_hyperplane(p, w, c, (0.0, 1.0), norm)
        expected = box_constrained_minimum(p[0].numpy(), w[0].numpy(), c.item(), norm)
        assert ((p + delta) >= 0).all() and ((p + delta) <= 1).all()
        assert bool(feasible) == (expected is not None)
        if expected is not None:
            assert (w * delta).sum().item() == pytest.approx(c.item(), abs=1e-9)
            size = ThreatModel(norm, NO_CAP).norms(delta).item()
            assert size == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_projection_where_the_box_cannot_reach_moves_everything_towards_the_hyperplane():
    p = torch.full((1, 4), 0.5, dtype=torch.float64)
    w = torch.tensor([[1.0, -2.0, 0.0, 3.0]], dtype=torch.float64)
    delta, feasible = project_onto_hyperplane(p, w, torch.tensor([100.0]).double(), (0.0, 1.0),
                                               "l2")
    assert not feasible.item()
    torch.testing.assert_close(delta, torch.tensor([[0.5, -0.5, 0.0, 0.5]], dtype=torch.float64))


# --- closed forms ------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [2, 10])
@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_fab_finds_the_exact_distance_to_an_affine_boundary(norm, classes):
    model, x = affine_model(classes=classes, seed=0 if classes == 2 else 1), central_batch()
    y = model(x).argmax(1)
    exact = distance_to_boundary(model, x, y, norm)
    assert exact.max() < 0.4 and exact.min() > 1e-3  # the box does not bind
    result = FAB(ThreatModel(norm, NO_CAP), eta=EXACT_ETA, steps=10)(model, x, y)
    assert result.success.all()
    torch.testing.assert_close(result.norms, exact, rtol=1e-3, atol=0)
    assert (result.norms >= exact * (1 - 1e-5)).all()  # nothing beats the exact minimum


def test_fab_finds_the_box_constrained_minimum_near_the_edges_of_the_box():
    """Binary affine model, inputs on or near the box: the minimum is a constrained problem."""
    model = affine_model(d=8, seed=0)
    g = torch.Generator().manual_seed(3)
    x = ((torch.rand(16, 1, 2, 4, generator=g) < 0.5).float() * 0.9 + 0.05)
    x[:, 0, 0, :2] = torch.tensor([0.0, 1.0])
    y = model(x).argmax(1)
    weight, bias = model[1].weight.detach().double(), model[1].bias.detach().double()
    expected = []
    for xi, yi in zip(x.flatten(1).double(), y, strict=True):
        w = weight[1 - yi] - weight[yi]
        f = w @ xi + bias[1 - yi] - bias[yi]
        expected.append(box_constrained_minimum(xi.numpy(), w.numpy(), -f.item(), "l2"))
    reachable = torch.tensor([e is not None for e in expected])
    assert reachable.sum() >= 8
    result = FAB(ThreatModel("l2", NO_CAP), eta=EXACT_ETA, steps=10)(model, x, y)
    assert torch.equal(result.success, reachable)
    exact = torch.tensor([e for e in expected if e is not None], dtype=torch.float32)
    torch.testing.assert_close(result.norms[reachable], exact, rtol=1e-3, atol=1e-6)


def test_the_default_extrapolation_stays_within_five_percent_of_the_minimum():
    model, x = affine_model(), central_batch()
    y = model(x).argmax(1)
    exact = distance_to_boundary(model, x, y, "l2")
    result = FAB(ThreatModel("l2", NO_CAP), steps=20)(model, x, y)
    assert (result.norms >= exact * (1 - 1e-5)).all()
    assert (result.norms <= exact * 1.05 * (1 + 1e-5)).all()


def test_targeted_fab_reaches_the_target_of_an_affine_model():
    model, x = affine_model(classes=10, seed=1), central_batch()
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    targets = logits.argsort(dim=1)[:, 5]  # a middling class, not the nearest
    result = FAB(ThreatModel("l2", NO_CAP), steps=30)(model, x, y, targets)
    assert result.success.all()
    assert torch.equal(result.predictions, targets)
    # Reaching a chosen class costs at least crossing its own boundary with y.
    weight = model[1].weight.detach()
    w = weight[targets] - weight[y]
    gap = (logits.gather(1, y[:, None]) - logits.gather(1, targets[:, None])).squeeze(1)
    assert (result.norms >= gap / w.norm(dim=1) * (1 - 1e-5)).all()


# --- the contract ------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_success_flags_agree_with_a_fresh_forward_pass(norm, batch):
    model, (x, y) = toy_cnn(), batch
    result = FAB(ThreatModel(norm, NO_CAP), steps=5)(model, x, y)
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred != y)
    assert torch.equal(result.predictions, pred)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    torch.testing.assert_close(result.norms[result.success],
                               ThreatModel(norm, NO_CAP).norms(result.x_adv - x)[result.success])


def test_targeted_success_means_the_target_class(batch):
    model, (x, y) = toy_cnn(), batch
    targets = (y + 3) % 10
    result = FAB(ThreatModel("l2", NO_CAP), steps=20)(model, x, y, targets)
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred == targets)
    assert torch.equal(result.targets, targets)


def test_same_seed_same_result_and_other_seeds_other_random_starts(batch):
    model, (x, _) = toy_cnn(), batch
    y = model(x).argmax(1)
    make = lambda seed: FAB(ThreatModel("l2", NO_CAP), steps=8, restarts=2, seed=seed)  # noqa: E731
    a, b, c = make(7)(model, x, y), make(7)(model, x, y), make(8)(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.norms, b.norms)
    assert not torch.equal(a.x_adv, c.x_adv)


def test_restarts_only_ever_shrink_the_perturbations(batch):
    model, (x, _) = toy_cnn(), batch
    y = model(x).argmax(1)
    one = FAB(ThreatModel("l2", NO_CAP), steps=8, restarts=1)(model, x, y)
    two = FAB(ThreatModel("l2", NO_CAP), steps=8, restarts=2)(model, x, y)
    assert (two.success | ~one.success).all()
    assert (two.norms <= one.norms).all() and (two.norms < one.norms).any()


def test_target_classes_runs_fab_t_with_an_untargeted_goal(batch):
    model, (x, y) = toy_cnn(), batch
    fab_t = FAB(ThreatModel("l2", NO_CAP), steps=10, target_classes=3)(model, x, y)
    assert fab_t.targets is None
    with torch.no_grad():
        assert torch.equal(fab_t.success, model(fab_t.x_adv).argmax(1) != y)
    one = FAB(ThreatModel("l2", NO_CAP), steps=10, target_classes=1)(model, x, y)
    assert (fab_t.norms <= one.norms).all()  # more target classes, never worse


def test_each_step_costs_a_jacobian_and_a_check():
    model, x = affine_model(classes=10, seed=1), central_batch()
    y = model(x).argmax(1)
    n, steps = x.shape[0], 4
    untargeted = FAB(ThreatModel("l2", NO_CAP), steps=steps)(model, x, y)
    assert untargeted.backward_passes == steps * 9 * n
    assert untargeted.forward_passes == (2 * steps + 2) * n
    targeted = FAB(ThreatModel("l2", NO_CAP), steps=steps)(model, x, y, (y + 1) % 10)
    assert targeted.backward_passes == steps * n


def test_samples_already_at_their_goal_cost_no_gradient(batch):
    model, (x, _) = toy_cnn(), batch
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 10
    result = FAB(ThreatModel("l2", NO_CAP), steps=10)(model, x, wrong)
    assert result.success.all() and result.backward_passes == 0
    assert torch.equal(result.x_adv, x) and (result.norms == 0).all()


def test_an_eps_cap_only_decides_success(batch):
    model, (x, y) = toy_cnn(), batch
    free = FAB(ThreatModel("l2", NO_CAP), steps=10)(model, x, y)
    cap = free.norms[free.success].median().item()
    capped = FAB(ThreatModel("l2", cap), steps=10, start_radius=1.0)(model, x, y)
    assert torch.equal(capped.x_adv, free.x_adv)
    assert torch.equal(capped.success, free.success & (free.norms <= cap))


# --- bad inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": 0}, r"steps must be >= 1 \(got 0\)"),
    ({"restarts": 0}, r"restarts must be >= 1 \(got 0\)"),
    ({"alpha_max": 1.5}, r"alpha_max must be in \[0, 1\] \(got 1.5\)"),
    ({"eta": 0.9}, r"eta must be >= 1 \(got 0.9\)"),
    ({"beta": 0.0}, r"beta must be in \(0, 1\] \(got 0.0\)"),
    ({"start_radius": -1.0}, r"start_radius must be > 0 \(got -1.0\)"),
    ({"target_classes": 0}, r"target_classes must be >= 1 \(got 0\)"),
])
def test_bad_configurations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FAB(ThreatModel("l2", NO_CAP), **kwargs)


def test_targets_and_target_classes_together_are_refused(batch):
    x, y = batch
    with pytest.raises(ValueError, match="not both"):
        FAB(ThreatModel("l2", NO_CAP), target_classes=3)(toy_cnn(), x, y, (y + 1) % 10)


# --- the real MNIST model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_slice(mnist_test):
    x, y = mnist_test
    return x[:100], y[:100]


def test_fab_finds_smaller_l2_perturbations_than_deepfool_on_mnist(mnist_model, mnist_slice):
    x, y = mnist_slice
    threat = ThreatModel("l2", NO_CAP)
    fab = FAB(threat, steps=10)(mnist_model, x, y)
    deepfool = DeepFool(threat)(mnist_model, x, y)
    assert fab.success_rate >= 0.99 and deepfool.success_rate >= 0.99  # 100% (7 retrainings)
    fab_median = fab.norms[fab.success].median().item()
    deepfool_median = deepfool.norms[deepfool.success].median().item()
    # FAB's median was 0.89-0.92 of DeepFool's over the 7 retrainings (conftest)
    assert fab_median <= deepfool_median
    accuracies = [acc for _, acc in fab.curve([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])]
    assert accuracies == sorted(accuracies, reverse=True)


def test_fab_t_reaches_its_targets_on_mnist(mnist_model, mnist_slice):
    x, y = mnist_slice
    targets = (y + 1) % 10
    result = FAB(ThreatModel("l2", NO_CAP), steps=50)(mnist_model, x, y, targets)
    # 96-100% over the 7 retrainings (conftest): 96% sat one image above the 0.95 bound
    # this test had
    assert result.success_rate >= 0.9
    assert torch.equal(result.predictions[result.success], targets[result.success])


def test_an_iterate_exactly_on_a_tie_is_pushed_across():
    """A 2-class affine model whose two logits tie exactly at the image (argmax gives the
    tie to class 0, the label). Aimed exactly at the boundary, the step from a point on it
    is zero and FAB would stay there for good (seen on MNIST image 189 in batches of 8+);
    each step aims a hair past it, so the image is broken at a tiny norm."""
    d = 16
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros(d), torch.full((d,), 1 / d)]))
        model[1].bias.copy_(torch.tensor([0.0, -0.5]))
    x = torch.full((3, 1, 4, 4), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(logits[:, 0], logits[:, 1]) and (logits.argmax(1) == y).all()
    for norm in ("linf", "l2"):
        result = FAB(ThreatModel(norm, NO_CAP), steps=5)(model, x, y)
        assert result.success.all(), norm
        assert (result.norms < 1e-3).all(), norm
