"""The threat model: projections, norms, random starts, and its argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from advkit import ThreatModel
from advkit.threat import norms, project_delta, random_in_ball

NORM_NAMES = ("linf", "l2", "l1")
TOL = 1e-5


def _case(seed: int, n: int, d: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 1, d, generator=g, dtype=torch.float64)
    # Push some coordinates onto the bounds: the box constraint must then bind.
    x = torch.where(torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.2, x.round(), x)
    v = torch.randn(n, 1, 1, d, generator=g, dtype=torch.float64) * scale
    return x, v


cases = st.tuples(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 40),
                  st.floats(0.01, 5.0), st.floats(0.0, 3.0), st.sampled_from(NORM_NAMES))


@settings(max_examples=150, deadline=None)
@given(cases)
def test_projection_lands_in_ball_and_box(case):
    seed, n, d, scale, eps, norm = case
    x, v = _case(seed, n, d, scale)
    delta = project_delta(v, x, eps, norm, (0.0, 1.0))
    assert (norms(delta, norm) <= eps * (1 + TOL) + 1e-9).all()
    assert ((x + delta) >= -1e-12).all() and ((x + delta) <= 1 + 1e-12).all()


@settings(max_examples=150, deadline=None)
@given(cases)
def test_projection_is_idempotent(case):
    seed, n, d, scale, eps, norm = case
    x, v = _case(seed, n, d, scale)
    once = project_delta(v, x, eps, norm, (0.0, 1.0))
    twice = project_delta(once, x, eps, norm, (0.0, 1.0))
    torch.testing.assert_close(twice, once, atol=1e-7, rtol=0)


@settings(max_examples=100, deadline=None)
@given(cases)
def test_projection_is_the_nearest_feasible_point(case):
    """Projection onto a convex set C: <v - p, z - p> <= 0 for every z in C."""
    seed, n, d, scale, eps, norm = case
    x, v = _case(seed, n, d, scale)
    p = project_delta(v, x, eps, norm, (0.0, 1.0))
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(10):
        z = project_delta(torch.randn(v.shape, generator=g, dtype=v.dtype) * scale, x, eps,
                          norm, (0.0, 1.0))
        inner = ((v - p) * (z - p)).flatten(1).sum(1)
        slack = 1e-6 * (1 + (v - p).flatten(1).norm(dim=1) * (z - p).flatten(1).norm(dim=1))
        assert (inner <= slack).all(), inner.max()


def test_l2_projection_differs_from_scale_then_clip():
    """Scaling into the ball then clipping is not the projection; ours must do better."""
    x = torch.tensor([[[[0.95, 0.5]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0, 1.0]]]], dtype=torch.float64)
    eps = 0.5
    p = project_delta(v, x, eps, "l2", (0.0, 1.0))
    naive = torch.minimum((v / v.norm() * eps), 1 - x)
    assert (v - p).norm() < (v - naive).norm() - 1e-3
    assert p.norm() == pytest.approx(eps)


def _sorted_breakpoints_l2_box(v, lo, hi, eps):
    """Reference: the earlier sort-based exact L2 ball-and-box projection (float64 rows).

    The norm of clip(t * v) is piecewise quadratic in t with breakpoints c_i = b_i / v_i;
    sorting them finds the segment holding the root and solves it there.
    """
    clipped = torch.minimum(torch.maximum(v, lo), hi)
    out = clipped.clone()
    for i in range(v.shape[0]):
        if clipped[i].norm() <= eps[i]:
            continue
        vr, bound = v[i], torch.where(v[i] > 0, hi[i], lo[i])
        c = torch.where(vr == 0, torch.full_like(vr, math.inf),
                        bound / torch.where(vr == 0, torch.ones_like(vr), vr)).clamp_min(0)
        c_sorted, order = c.sort()
        v2, b2 = vr[order] ** 2, bound[order] ** 2
        clipped_sum = torch.cumsum(b2, 0) - b2
        free_sum = v2.flip(0).cumsum(0).flip(0)
        g = torch.where(torch.isinf(c_sorted), 0, c_sorted) ** 2 * free_sum + clipped_sum
        k = int(((g <= eps[i] ** 2) & torch.isfinite(c_sorted)).sum().clamp_max(len(vr) - 1))
        t = torch.sqrt((eps[i] ** 2 - clipped_sum[k]).clamp_min(0) / free_sum[k]).clamp(max=1)
        out[i] = torch.minimum(torch.maximum(vr * t, lo[i]), hi[i])
    return out


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 8), st.sampled_from([1, 3, 40, 784]),
       st.floats(0.01, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 0.9))
# A tiny root (s ~ 1e-14): the Newton step once lost three digits to cancellation there.
@example(0, 5, 1, 0.5, 1.7513682966044297e-07, 0.75)
def test_l2_projection_matches_the_sort_based_solution(seed, n, d, scale, eps_frac, at_box):
    """Same answer as sorting the breakpoints, also with many coordinates on the box."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 1, d, generator=g, dtype=torch.float64)
    x = torch.where(torch.rand(x.shape, generator=g, dtype=torch.float64) < at_box, x.round(), x)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64) * scale
    # eps up to the norm of the clipped point, so that both regimes (inside, solve) occur.
    clipped_norm = norms(torch.minimum(torch.maximum(v, -x), 1 - x), "l2")
    eps = clipped_norm * eps_frac * 1.2
    p = project_delta(v, x, eps, "l2", (0.0, 1.0))
    ref = _sorted_breakpoints_l2_box(v.flatten(1), -x.flatten(1), (1 - x).flatten(1), eps)
    torch.testing.assert_close(p.flatten(1), ref, atol=1e-10, rtol=0)


def test_l2_projection_in_float32_matches_float64():
    """MNIST-sized float32 batches: float32 rounding only, inside the box and the ball."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28, generator=g)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.6, x.round(), x)
    v = torch.randn(x.shape, generator=g) * 0.1
    p32 = project_delta(v, x, 1.5, "l2", (0.0, 1.0))
    p64 = project_delta(v.double(), x.double(), 1.5, "l2", (0.0, 1.0))
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), p64, atol=1e-6, rtol=0)
    assert (norms(p32, "l2") <= 1.5 * (1 + 1e-6)).all()  # float32 norms round by an ulp
    assert ((x + p32) >= 0).all() and ((x + p32) <= 1).all()


@settings(max_examples=100, deadline=None)
@given(cases)
def test_threat_model_project_equals_the_perturbation_projection(case):
    """ThreatModel.project (a Linf fast path) is x + project_delta, for every norm."""
    seed, n, d, scale, eps, norm = case
    x, v = _case(seed, n, d, scale)
    eps = min(eps, 1.0) if norm == "linf" else eps
    expected = x + project_delta(v, x, eps, norm, (0.0, 1.0))
    torch.testing.assert_close(ThreatModel(norm, eps).project(x + v, x), expected,
                               atol=1e-12, rtol=0)


def test_feasible_points_are_left_alone():
    x = torch.full((2, 1, 2, 2), 0.5)
    v = torch.full((2, 1, 2, 2), 0.01)
    for norm in NORM_NAMES:
        torch.testing.assert_close(ThreatModel(norm, 0.3).project(x + v, x), x + v)


def test_per_sample_eps():
    x = torch.full((2, 1, 1, 4), 0.5)
    delta = project_delta(torch.ones_like(x), x, torch.tensor([0.1, 0.3]), "linf", (0.0, 1.0))
    assert norms(delta, "linf").tolist() == pytest.approx([0.1, 0.3])


@pytest.mark.parametrize("norm", NORM_NAMES)
def test_norms_match_torch(norm):
    delta = torch.randn(5, 3, 4, 4)
    ord_ = {"linf": math.inf, "l2": 2, "l1": 1}[norm]
    expected = torch.linalg.vector_norm(delta.flatten(1), ord=ord_, dim=1)
    torch.testing.assert_close(norms(delta, norm), expected)


@pytest.mark.parametrize("norm", NORM_NAMES)
def test_random_start_is_inside_ball_and_box(norm):
    threat = ThreatModel(norm, {"linf": 0.3, "l2": 2.0, "l1": 10.0}[norm])
    x = torch.rand(64, 1, 28, 28)
    start = threat.random_start(x, torch.Generator().manual_seed(0))
    assert (threat.norms(start - x) <= threat.eps * (1 + 1e-5)).all()
    assert start.min() >= 0 and start.max() <= 1


@pytest.mark.parametrize("norm", ("l2", "l1"))
def test_random_in_ball_fills_the_ball(norm):
    """Uniform in a d-ball: the radius r/eps is distributed as U^(1/d), so its mean is d/(d+1)."""
    d = 8
    samples = random_in_ball(torch.Size((20000, d)), 1.0, norm, torch.zeros(1),
                             torch.Generator().manual_seed(0))
    radius = norms(samples, norm)
    assert radius.max() <= 1 + 1e-6
    assert radius.mean().item() == pytest.approx(d / (d + 1), abs=0.01)


def test_same_generator_seed_same_start():
    threat = ThreatModel("l2", 1.0)
    x = torch.rand(4, 1, 5, 5)
    a = threat.random_start(x, torch.Generator().manual_seed(3))
    b = threat.random_start(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("eps", [-0.1, float("nan")])
def test_bad_eps_is_refused(eps):
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ThreatModel("linf", eps)


def test_linf_eps_beyond_the_box_is_refused():
    with pytest.raises(ValueError, match="larger than the box allows"):
        ThreatModel("linf", 1.5)


def test_l2_eps_beyond_the_box_is_refused_for_the_image_size():
    threat = ThreatModel("l2", 100.0)
    with pytest.raises(ValueError, match="larger than the box allows"):
        threat.check_eps_for(torch.zeros(1, 1, 28, 28))  # diameter sqrt(784) = 28


def test_unknown_norm_and_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="unknown norm"):
        ThreatModel("l3", 0.1)
    with pytest.raises(ValueError, match="bounds"):
        ThreatModel("linf", 0.1, bounds=(1.0, 0.0))


def test_norm_aliases():
    assert ThreatModel("Linf", 0.1).norm == "linf"
    assert ThreatModel("L2", 0.1).norm == "l2"
    assert not ThreatModel("l2", float("inf")).bounded
