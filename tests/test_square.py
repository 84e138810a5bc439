"""Square Attack (Andriushchenko et al., 2020): a score-based black box with exact query counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import toy_cnn

from advkit import ThreatModel
from advkit.attacks import PGD
from advkit.attacks.square import Square, p_schedule

EPS = {"linf": 0.1, "l2": 1.0}


class Counting(nn.Module):
    """Counts every image the wrapped model is asked about."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.images = net, 0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.net(x)


class _NoGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a black box has no gradient")


class BlackBox(nn.Module):
    """Answers forward passes; any backward pass through it raises."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_NoGradient.apply(x))


@pytest.fixture
def batch():
    """Random images labelled as toy_cnn() classifies them, so every one needs attacking."""
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return x, toy_cnn()(x).argmax(1)


def make(norm, **kw):
    kw.setdefault("n_queries", 100)
    return Square(ThreatModel(norm, EPS[norm]), **kw)


# --- the paper's rules -------------------------------------------------------------------

def test_p_halves_at_the_papers_iterations_rescaled_to_the_budget():
    assert p_schedule(0.8, 10, 10000) == 0.8 and p_schedule(0.8, 11, 10000) == 0.4
    assert p_schedule(0.8, 51, 10000) == 0.2
    assert p_schedule(0.8, 9999, 10000) == 0.8 / 512
    assert p_schedule(0.8, 6, 5000) == 0.4   # iteration 6 of 5000 is 12 of 10000
    assert p_schedule(0.8, 5, 5000) == 0.8


def test_linf_perturbations_are_vertices_of_the_box(batch):
    """Every pixel moves by exactly +-eps unless the box stopped it."""
    model, (x, y) = toy_cnn(), batch
    result = make("linf", n_queries=50)(model, x, y)
    delta = (result.x_adv - x)[result.queries > 2]
    x_adv = result.x_adv[result.queries > 2]
    at_eps = (delta.abs() - 0.1).abs() < 1e-6
    at_box = (x_adv == 0) | (x_adv == 1)
    assert (at_eps | at_box).all()


@pytest.mark.parametrize("p", [0.8, 0.1, 0.01])
def test_a_linf_proposal_moves_one_square_window_per_image_to_a_new_vertex(p):
    """Some s x s window (s from the schedule) holds every change; inside it each channel
    sits at clip(x + eps) or clip(x - eps) throughout (one sign per channel); and the
    proposal differs from the current point (an equal one would waste a query)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 12, 12, generator=gen)
    attack = Square(ThreatModel("linf", 0.1))
    x_best = attack._init(x, gen)
    x_new = attack._propose(x, x_best, p, gen)
    side = min(max(round((p * 144) ** 0.5), 1), 11)
    up, down = (x + 0.1).clamp(0, 1), (x - 0.1).clamp(0, 1)

    def is_window(i: int, r: int, c: int) -> bool:
        box = (slice(r, r + side), slice(c, c + side))
        for ch in range(3):
            win = x_new[i, ch][box]
            if not (torch.equal(win, up[i, ch][box]) or torch.equal(win, down[i, ch][box])):
                return False
        return True

    for i in range(x.shape[0]):
        changed = (x_new[i] != x_best[i]).any(0).nonzero()
        assert changed.numel() > 0
        low, high = changed.min(0).values.tolist(), changed.max(0).values.tolist()
        assert high[0] - low[0] < side and high[1] - low[1] < side
        corners = [(r, c) for r in range(max(high[0] - side + 1, 0), min(low[0], 12 - side) + 1)
                   for c in range(max(high[1] - side + 1, 0), min(low[1], 12 - side) + 1)]
        assert any(is_window(i, r, c) for r, c in corners), f"image {i}"


def test_l2_perturbations_use_the_whole_budget_away_from_the_box():
    model = toy_cnn()
    x = torch.full((16, 1, 8, 8), 0.5)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    result = Square(ThreatModel("l2", 0.5), n_queries=50)(model, x, y)
    queried = result.queries > 2
    torch.testing.assert_close(result.norms[queried], torch.full_like(result.norms[queried], 0.5))


# --- queries -----------------------------------------------------------------------------

@pytest.mark.parametrize("n_queries", [100, 300])
def test_query_counts_are_exact_and_within_the_budget(n_queries, batch):
    model, (x, y) = Counting(toy_cnn()), batch
    result = Square(ThreatModel("linf", 0.05), n_queries=n_queries)(model, x, y)
    queries = result.queries
    assert queries.dtype == torch.int64 and queries.shape == (x.shape[0],)
    # The search's queries, plus the clean pass and the success pass of the base class.
    assert (queries <= n_queries + 2).all()
    assert model.images == int(queries.sum()) == result.forward_passes
    # Unbroken samples spend the whole budget; broken ones stop at the query that broke them.
    assert (queries[~result.success] == n_queries + 2).all()
    assert 0 < result.success.sum() < x.shape[0]


def test_samples_misclassified_from_the_start_get_no_query(batch):
    model, (x, _) = toy_cnn(), batch
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 10
    result = make("linf")(model, x, wrong)
    assert (result.queries == 2).all() and result.success.all()
    torch.testing.assert_close(result.x_adv, x)


def test_square_needs_no_gradient(batch):
    model, (x, y) = BlackBox(toy_cnn()), batch
    with pytest.raises(RuntimeError, match="no gradient"):
        PGD(ThreatModel("linf", 0.1), steps=1)(model, x, y)  # the black box does refuse
    result = make("linf")(model, x, y)
    assert result.backward_passes == 0 and result.success.any()
    assert Square.taxonomy.knowledge == "black box (scores)"


# --- the contract ------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_success_flags_agree_with_a_fresh_forward_pass(norm, batch):
    model, (x, y) = toy_cnn(), batch
    result = make(norm)(model, x, y)
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred != y)
    assert torch.equal(result.predictions, pred)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_outputs_stay_in_the_box_and_the_ball(norm, batch):
    model, (x, y) = toy_cnn(), batch
    result = make(norm)(model, x, y)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert (result.norms <= EPS[norm] * (1 + 1e-5)).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_same_seed_same_result_and_another_seed_another_search(norm, batch):
    model, (x, y) = toy_cnn(), batch
    a, b = make(norm, seed=3)(model, x, y), make(norm, seed=3)(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    c = make(norm, seed=4)(model, x, y)
    assert not torch.equal(a.x_adv, c.x_adv)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_targeted_square_reaches_its_targets(norm, batch):
    model, (x, y) = toy_cnn(), batch
    targets = (y + 3) % 10
    eps = {"linf": 0.5, "l2": 4.0}[norm]
    result = Square(ThreatModel(norm, eps), n_queries=1000)(model, x, y, targets)
    assert result.success.float().mean() >= 0.9
    assert torch.equal(result.predictions[result.success], targets[result.success])


def test_bad_configurations_are_refused():
    linf = ThreatModel("linf", 0.1)
    with pytest.raises(ValueError, match=r"p_init must be in \(0, 1\]"):
        Square(linf, p_init=0.0)
    with pytest.raises(ValueError, match=r"p_init must be in \(0, 1\]"):
        Square(linf, p_init=1.5)
    with pytest.raises(ValueError, match="n_queries must be an integer >= 1"):
        Square(linf, n_queries=0)
    with pytest.raises(ValueError, match="n_queries must be an integer >= 1"):
        Square(linf, n_queries=10.5)
    with pytest.raises(ValueError, match="unknown loss 'dlr'"):
        Square(linf, loss="dlr")
    with pytest.raises(ValueError, match="supports norms"):
        Square(ThreatModel("l1", 5.0))
    with pytest.raises(ValueError, match="finite eps"):
        Square(ThreatModel("linf", float("inf")))


# --- the real MNIST CNN ------------------------------------------------------------------

def test_square_breaks_most_mnist_digits_at_linf_03(mnist_model, mnist_test):
    x, y = mnist_test[0][:100], mnist_test[1][:100]
    model = Counting(mnist_model)
    result = Square(ThreatModel("linf", 0.3), n_queries=1000)(model, x, y)
    queries = result.queries
    # 100% on each of the 7 retrainings (conftest), attack seeds 0 and 1
    assert result.success.float().mean() >= 0.9
    assert (result.norms <= 0.3 + 1e-6).all() and (queries <= 1000 + 2).all()
    assert model.images == int(queries.sum())
