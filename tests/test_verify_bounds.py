"""Bound propagation (IBP, CROWN, alpha-CROWN) and ``advkit.verify.certify``: soundness on
random networks, the orderings theory guarantees, closed forms, a real model, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advkit.attacks import PGD
from advkit.models.normalize import Normalize
from advkit.threat import ThreatModel
from advkit.verify import certify
from advkit.verify.bounds import (
    InputSet,
    backward_lower,
    ibp_lower,
    interval_bounds,
    layer_bounds,
    network,
)
from advkit.verify.certify import _spec

TOL = 1e-5
EPS = {"linf": (0.01, 0.3), "l2": (0.05, 2.0), "l1": (0.1, 6.0)}


def random_net(seed: int, conv: bool, pool: str, batchnorm: bool, classes: int = 3
               ) -> nn.Module:
    """A small float64 network of the supported layers, weights drawn from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [Normalize([0.4], [0.3])]
    if conv:
        layers += [nn.Conv2d(1, 3, 3, stride=1 + seed % 2, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(3))
        layers.append(nn.ReLU())
        layers += {"avg": [nn.AvgPool2d(2)], "max": [nn.MaxPool2d(2)], "none": []}[pool]
        layers += [nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Flatten()]
    else:
        layers += [nn.Flatten(), nn.Linear(64, 12)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(12))
        layers += [nn.ReLU(), nn.Linear(12, 8), nn.ReLU()]
    model = nn.Sequential(*layers)
    width = model.eval()(torch.zeros(1, 1, 8, 8)).shape[1]
    model.append(nn.Linear(width, classes))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.double().eval()


nets = st.builds(random_net, seed=st.integers(0, 10_000), conv=st.booleans(),
                 pool=st.sampled_from(["avg", "max", "none"]), batchnorm=st.booleans())


@st.composite
def problems(draw, norms=("linf", "l2", "l1")):
    model = draw(nets)
    norm = draw(st.sampled_from(norms))
    lo, hi = EPS[norm]
    eps = draw(st.floats(lo, hi))
    seed = draw(st.integers(0, 10_000))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed),
                   dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, ThreatModel(norm=norm, eps=eps)


def points_in_set(x: torch.Tensor, threat: ThreatModel, k: int = 64) -> torch.Tensor:
    """(k, N, ...) points of ball ∩ box: the centre, uniform samples, and the boundary
    (Linf corners, points on the L2/L1 sphere), each projected onto the set."""
    gen = torch.Generator().manual_seed(0)
    rep = x.repeat(k, *([1] * (x.dim() - 1)))
    if threat.norm == "linf":
        signs = torch.randint(0, 2, rep.shape, generator=gen).to(x.dtype) * 2 - 1
        edge = rep + threat.eps * signs
    else:
        direction = torch.randn(rep.shape, generator=gen, dtype=x.dtype)
        if threat.norm == "l1":  # sparse directions reach the L1 sphere's vertices
            direction = direction * (torch.rand(rep.shape, generator=gen, dtype=x.dtype) < 0.1)
        norms = threat.norms(direction).clamp_min(1e-12)
        edge = rep + threat.eps * direction / norms.view(-1, *([1] * (x.dim() - 1)))
    inside = threat.random_start(rep, gen)
    points = torch.cat([x, threat.project(edge, rep), inside])
    return points.view(-1, *x.shape)


def margins(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return z.gather(-1, y.expand(*z.shape[:-1]).unsqueeze(-1)) - z


# --------------------------------------------------------------------------------------
# Soundness
# --------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_logits_and_margins_at_points_of_the_set_lie_inside_every_methods_bounds(problem):
    model, x, y, threat = problem
    points = points_in_set(x, threat)
    with torch.no_grad():
        z = model(points.flatten(0, 1)).view(len(points), *y.shape, -1)
    for method in ("ibp", "crown", "alpha-crown"):
        cert = certify(model, x, y, threat, method, steps=3)
        assert (z >= cert.logit_lower - TOL).all(), method
        assert (z <= cert.logit_upper + TOL).all(), method
        finite = torch.isfinite(cert.lower_bounds)
        assert (margins(z, y)[:, finite] >= cert.lower_bounds[finite] - TOL).all(), method
        assert torch.isinf(cert.lower_bounds.gather(1, y[:, None])).all()
        assert torch.equal(cert.verified, (cert.lower_bounds > 0).all(dim=1))


@settings(max_examples=25, deadline=None)
@given(problem=problems())
def test_intermediate_bounds_contain_every_layers_values_at_points_of_the_set(problem):
    """What MILP's big-M constants rest on: layer_bounds holds each position's values."""
    model, x, y, threat = problem
    net = network(model, x)
    points = points_in_set(x, threat).flatten(0, 1)
    with torch.no_grad():
        for method in ("ibp", "crown"):
            bounds = layer_bounds(net, InputSet.from_threat(x, threat), method)
            h = points
            for i, op in enumerate(net.ops):
                lower, upper = (b.repeat(len(points) // len(x), *([1] * (b.dim() - 1)))
                                for b in bounds[i])
                assert (h >= lower - TOL).all() and (h <= upper + TOL).all(), (method, i)
                h = op.forward(h)


# --------------------------------------------------------------------------------------
# Orderings guaranteed by theory
# --------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_crown_with_ibp_intermediate_bounds_and_zero_lower_slopes_is_never_looser_than_ibp(
        problem):
    """Theorem: with the same (IBP) intermediate bounds, lower slope 0 on unstable ReLUs and
    the chord above, CROWN's bound on any linear function of the logits is >= IBP's.

    Proof sketch: walking backwards, concretise the current linear bound over the interval
    of the current position. Through an affine map this can only rise (a minimum of a sum
    is at least the sum of the minima, which is what interval arithmetic takes); through a
    ReLU it is unchanged (slope 0 concretises to relu(l) = 0 and the chord to relu(u),
    IBP's own interval); at the input it is the box IBP started from, or better (CROWN
    also tries the ball). The statement is about the same intermediate bounds, so both
    sides use plain interval arithmetic from the box here (``layer_bounds(..., "ibp")``
    also bounds a first Linear or Conv2d layer exactly over an L2/L1 ball, per neuron,
    which the chain's first step does not compare with).
    """
    model, x, y, threat = problem
    net = network(model, x)
    region = InputSet.from_threat(x, threat)
    spec = _spec(y, net.num_classes, x.dtype)
    with torch.no_grad():
        bounds = [(region.lower, region.upper)]
        for op in net.ops:
            bounds.append(op.interval(*bounds[-1]))
        ibp = ibp_lower(net, region, bounds, spec)
        crown = backward_lower(net, region, bounds, spec, lower_slope="zero")
    assert (crown >= ibp - TOL * (1 + ibp.abs())).all()


@settings(max_examples=30, deadline=None)
@given(problem=problems())
def test_alpha_crown_is_never_looser_than_crown(problem):
    model, x, y, threat = problem
    crown = certify(model, x, y, threat, "crown")
    alpha = certify(model, x, y, threat, "alpha-crown", steps=5)
    assert (alpha.lower_bounds >= crown.lower_bounds).all()
    assert (alpha.logit_lower >= crown.logit_lower).all()
    assert (alpha.logit_upper <= crown.logit_upper).all()
    assert (alpha.verified >= crown.verified).all()


@settings(max_examples=30, deadline=None)
@given(problem=problems())
def test_certify_crown_is_never_looser_than_ibp(problem):
    # The final bound keeps the better of CROWN's and the interval bound (neither
    # dominates: on certifiably trained models IBP's is often tighter).
    model, x, y, threat = problem
    ibp = certify(model, x, y, threat, "ibp")
    crown = certify(model, x, y, threat, "crown")
    finite = torch.isfinite(ibp.lower_bounds)  # the label's own column is inf in both
    low, high = ibp.lower_bounds[finite], crown.lower_bounds[finite]
    assert (high >= low - TOL * (1 + low.abs())).all()  # rounding: the same bound twice


def test_certify_crown_keeps_the_interval_bound_where_it_is_tighter():
    # margin = relu(h) with h = 3x - 1 over x in [0, 1]: h in [-1, 2], so the ReLU is
    # unstable with u > -l and CROWN's adaptive lower slope is 1: relu(h) >= h >= -1. The
    # interval bound is relu's own, 0, which is also the true minimum.
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)).double().eval()
    with torch.no_grad():
        model[0].weight.fill_(3.0), model[0].bias.fill_(-1.0)
        model[2].weight.copy_(torch.tensor([[1.0], [0.0]])), model[2].bias.zero_()
    x, y = torch.full((1, 1), 0.5, dtype=torch.float64), torch.tensor([0])
    threat = ThreatModel("linf", 0.5)
    net, region = network(model, x), InputSet.from_threat(x, threat)
    spec = _spec(y, 2, x.dtype)
    with torch.no_grad():
        bounds = layer_bounds(net, region, "crown")
        plain = backward_lower(net, region, bounds, spec)
    assert plain[0, 0].item() == pytest.approx(-1.0)  # CROWN alone: the slope-1 relaxation
    crown = certify(model, x, y, threat, "crown")  # lower_bounds[:, y] is inf: no margin
    assert crown.lower_bounds[0, 1].item() == pytest.approx(0.0)
    assert crown.lower_bounds[0, 1].item() == certify(model, x, y, threat, "ibp"
                                                      ).lower_bounds[0, 1].item()


def test_alpha_crown_tightens_some_bound_crown_leaves_loose():
    model = random_net(seed=3, conv=False, pool="none", batchnorm=False)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = model(x).argmax(1).detach()
    threat = ThreatModel("linf", 0.1)
    crown = certify(model, x, y, threat, "crown")
    alpha = certify(model, x, y, threat, "alpha-crown", steps=20)
    gain = alpha.lower_bounds - crown.lower_bounds
    assert gain[torch.isfinite(gain)].max() > 1e-3


# --------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------

def affine_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(),
                         nn.Linear(16, 4)).double().eval()


def composed_weights(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine model as ``W x + b`` on [0, 1] inputs (Normalize folded in)."""
    lin = model[2]
    weight = lin.weight / 0.25
    return weight, lin.bias - (lin.weight * 0.5 / 0.25).sum(dim=1)


@pytest.mark.parametrize(("norm", "dual"), [("linf", 1), ("l2", 2), ("l1", math.inf)])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_of_an_affine_model_are_the_exact_minimum_when_the_box_does_not_bind(
        norm, dual, method):
    model = affine_model()
    weight, bias = composed_weights(model)
    x = torch.full((2, 1, 4, 4), 0.5, dtype=torch.float64)
    x[1] += torch.linspace(-0.05, 0.05, 16, dtype=torch.float64).view(1, 4, 4)
    y = torch.tensor([0, 2])
    eps = 0.1 if norm != "l1" else 0.3  # the ball stays inside [0, 1]^16 for every norm
    cert = certify(model, x, y, ThreatModel(norm, eps), method)
    z = x.flatten(1) @ weight.T + bias
    radius = eps * weight.norm(p=dual, dim=1)
    torch.testing.assert_close(cert.logit_lower, z - radius, rtol=0, atol=1e-9)
    torch.testing.assert_close(cert.logit_upper, z + radius, rtol=0, atol=1e-9)
    # The margin z_y - z_j is one linear function: its exact minimum, not l_y - u_j.
    for i, label in enumerate(y.tolist()):
        w = weight[label] - weight
        exact = (z[i, label] - z[i]) - eps * w.norm(p=dual, dim=1)
        others = torch.arange(4) != label
        torch.testing.assert_close(cert.lower_bounds[i, others], exact[others], rtol=0,
                                   atol=1e-9)


def test_linf_bounds_of_an_affine_model_are_exact_where_the_box_binds():
    """Linf ball ∩ box is a box: the minimum of w · x over it is attained at a corner."""
    model = affine_model(1)
    weight, bias = composed_weights(model)
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0, 0, 0] = 0.0
    threat = ThreatModel("linf", 0.2)
    cert = certify(model, x, torch.zeros(3, dtype=torch.long), threat, "crown")
    lo, hi = (x - 0.2).clamp(0, 1).flatten(1), (x + 0.2).clamp(0, 1).flatten(1)
    corner = torch.where(weight[None] > 0, lo[:, None], hi[:, None])
    exact = (corner * weight[None]).sum(-1) + bias
    torch.testing.assert_close(cert.logit_lower, exact, rtol=0, atol=1e-9)


def test_eps_zero_bounds_equal_the_logits():
    model = random_net(seed=7, conv=True, pool="max", batchnorm=True)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        z = model(x)
    for method in ("ibp", "crown", "alpha-crown"):
        cert = certify(model, x, z.argmax(1), ThreatModel("linf", 0.0), method)
        torch.testing.assert_close(cert.logit_lower, z, rtol=0, atol=1e-9)
        torch.testing.assert_close(cert.logit_upper, z, rtol=0, atol=1e-9)
        assert cert.verified.all()


# --------------------------------------------------------------------------------------
# A real model: the cached MNIST test CNN (small_cnn, MaxPool2d)
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_slice(mnist_model, mnist_test):
    x, y = mnist_test[0][:16], mnist_test[1][:16]
    with torch.no_grad():
        correct = mnist_model(x).argmax(1) == y
    return x, y, correct


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_every_correctly_classified_mnist_image_is_verified_at_a_tiny_eps(
        mnist_model, mnist_slice, method):
    x, y, correct = mnist_slice
    cert = certify(mnist_model, x, y, ThreatModel("linf", 1e-4), method)
    assert correct.sum() >= 14  # the test CNN is ~99% accurate
    assert torch.equal(cert.verified, correct)


def test_no_mnist_image_is_verified_at_a_huge_eps_by_ibp(mnist_model, mnist_slice):
    x, y, _ = mnist_slice
    assert not certify(mnist_model, x, y, ThreatModel("linf", 0.9), "ibp").verified.any()


@pytest.mark.slow
def test_no_mnist_image_is_verified_at_a_huge_eps_by_crown(mnist_model, mnist_slice):
    """Every neuron is unstable at 0.9: CROWN's intermediate bounds cost ~6 s an image."""
    x, y, _ = mnist_slice
    assert not certify(mnist_model, x[:2], y[:2], ThreatModel("linf", 0.9), "crown").verified.any()


def test_mnist_bounds_contain_the_logits_at_pgd_points(mnist_model, mnist_slice):
    x, y, _ = mnist_slice
    x, y = x[:4], y[:4]
    threat = ThreatModel("linf", 0.005)
    cert = certify(mnist_model, x, y, threat, "crown")
    assert cert.verified.sum() >= 3  # certified robust at 0.005 on most images
    result = PGD(threat, steps=20, step_size=0.003, random_start=True)(mnist_model, x, y)
    with torch.no_grad():
        z = mnist_model(result.x_adv)
    tol = 1e-4 * (1 + z.abs())  # float32
    assert (z >= cert.logit_lower - tol).all() and (z <= cert.logit_upper + tol).all()
    finite = torch.isfinite(cert.lower_bounds)
    assert (margins(z, y)[finite] >= cert.lower_bounds[finite] - 1e-4).all()
    assert not result.success[cert.verified].any()


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------

def small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = random_net(seed=0, conv=False, pool="none", batchnorm=False)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    return model, x, torch.tensor([0, 1])


def test_an_unsupported_layer_is_named_with_its_position():
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"layer 2 \(Tanh, position 2\) is not supported"):
        certify(model.eval(), torch.rand(1, 1, 6, 6, dtype=torch.float64), torch.tensor([0]),
                ThreatModel("linf", 0.1))


def test_a_model_in_train_mode_is_refused():
    model, x, y = small()
    with pytest.raises(ValueError, match="train mode.*model.eval"):
        certify(model.train(), x, y, ThreatModel("linf", 0.1))


def test_a_model_that_is_not_a_chain_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(36, 3)

        def forward(self, x):
            return self.fc(x.flatten(1))

    with pytest.raises(ValueError, match="Net has its own forward.*nn.Sequential"):
        certify(Net().double().eval(), torch.rand(1, 1, 6, 6, dtype=torch.float64),
                torch.tensor([0]), ThreatModel("linf", 0.1))


def test_negative_or_infinite_eps_is_refused():
    model, x, y = small()
    with pytest.raises(ValueError, match="eps must be >= 0"):
        certify(model, x, y, ThreatModel("linf", -0.1))
    with pytest.raises(ValueError, match="finite eps"):
        certify(model, x, y, ThreatModel("l2", math.inf))


def test_images_outside_the_box_are_refused():
    model, x, y = small()
    with pytest.raises(ValueError, match="outside threat.bounds"):
        certify(model, x + 1.5, y, ThreatModel("linf", 0.1))


def test_x_and_y_of_different_lengths_are_refused():
    model, x, y = small()
    with pytest.raises(ValueError, match="same N"):
        certify(model, x, y[:1], ThreatModel("linf", 0.1))


def test_labels_out_of_range_are_refused():
    model, x, _ = small()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        certify(model, x, torch.tensor([0, 3]), ThreatModel("linf", 0.1))


def test_an_unknown_method_is_refused():
    model, x, y = small()
    with pytest.raises(ValueError, match="unknown method 'lp'.*ibp, crown, alpha-crown, milp"):
        certify(model, x, y, ThreatModel("linf", 0.1), "lp")


def test_max_pool_with_ceil_mode_is_refused_with_the_fix():
    model = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(9, 2))
    with pytest.raises(ValueError, match="MaxPool2d with ceil_mode=True.*use the defaults"):
        certify(model.double().eval(), torch.rand(1, 1, 5, 5, dtype=torch.float64),
                torch.tensor([0]), ThreatModel("linf", 0.1))


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_a_first_linear_layer_after_normalize_flatten_and_batchnorm_is_bounded_soundly(norm):
    """IBP bounds a first Linear layer exactly over an L2/L1 ball, through the per-channel
    and per-feature scalings before it."""
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.4], [0.3]), nn.Flatten(), nn.BatchNorm1d(64),
                          nn.Linear(64, 5), nn.ReLU(), nn.Linear(5, 3))
    model[2].running_var.uniform_(0.2, 3.0)
    model[2].running_mean.uniform_(-1, 1)
    model = model.double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    threat = ThreatModel(norm, 0.5)
    net = network(model, x)
    with torch.no_grad():
        lower, upper = interval_bounds(net, InputSet.from_threat(x, threat))[4]
        h = model[:4](points_in_set(x, threat).flatten(0, 1)).view(-1, 2, 5)
    assert (h >= lower - TOL).all() and (h <= upper + TOL).all()


def test_interval_bounds_are_sound_without_certify():
    """The lower-level API: interval_bounds on a float32 model, no certify wrapper."""
    model = random_net(seed=1, conv=True, pool="avg", batchnorm=True).float()
    x = torch.rand(2, 1, 8, 8)
    threat = ThreatModel("l2", 0.5)
    net = network(model, x)
    with torch.no_grad():
        lower, upper = interval_bounds(net, InputSet.from_threat(x, threat))[-1]
        z = model(points_in_set(x, threat).flatten(0, 1)).view(-1, 2, 3)
    assert (z >= lower - 1e-4).all() and (z <= upper + 1e-4).all()
