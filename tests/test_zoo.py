"""ZOO (Chen et al., 2017): coordinate-wise zeroth-order ADAM on the C&W loss, L2,
minimal-norm, budgeted per sample."""

from __future__ import annotations

import math

import pytest
import torch
from detection import one_thread
from torch import nn
from toys import toy_cnn

from advkit import ThreatModel, models
from advkit.attacks import ZOO
from advkit.models.access import QueryBudgetExceeded

UNCAPPED = ThreatModel("l2", math.inf)
# toy_cnn()'s logits are far apart: the toy tests take a larger C&W constant (10) than
# MNIST's default.


def test_no_sample_spends_more_than_max_queries_plus_the_success_pass(batch):
    x, y = batch
    box = models.scores_only(toy_cnn(), budget=101)
    result = ZOO(UNCAPPED, max_queries=100, coordinates=16, const=10.0)(box, x, y)
    assert int(result.queries.max()) <= 101
    assert int(result.queries.sum()) == box.queries == result.forward_passes
    # Uncapped, every sample spends its budget shrinking the perturbation (the last round
    # is cut to what is left: 99 = 3 rounds of 32 + 1 pair + 1 left over, which buys nothing).
    assert int(result.queries.min()) >= 100


def test_an_access_budget_below_max_queries_is_refused_before_any_query(batch):
    x, y = batch
    box = models.scores_only(toy_cnn(), budget=10)
    with pytest.raises(QueryBudgetExceeded, match="max_queries=9"):
        ZOO(UNCAPPED, max_queries=10)(box, x, y)
    assert box.queries == 0


def test_the_norm_after_each_budget_never_grows_and_ends_at_the_result(batch):
    x, y = batch
    result = ZOO(UNCAPPED, max_queries=1000, coordinates=16, const=10.0)(toy_cnn(), x, y)
    assert result.success.float().mean() >= 0.9
    at = result.extras["norm_at_queries"]
    assert result.checkpoints == (100, 200, 500, 1000)
    assert bool((at[:, 1:] <= at[:, :-1]).all())
    torch.testing.assert_close(at[:, -1], result.norms)


@pytest.mark.parametrize("binary_steps", [1, 3])
def test_a_cap_ends_a_sample_at_its_first_example_inside_it(binary_steps, batch):
    x, y = batch
    uncapped = ZOO(UNCAPPED, max_queries=1000, coordinates=16, const=10.0,
                   binary_steps=binary_steps)(toy_cnn(), x, y)
    cap = float(uncapped.norms.max()) * 1.5
    capped = ZOO(ThreatModel("l2", cap), max_queries=1000, coordinates=16, const=10.0,
                 binary_steps=binary_steps)(toy_cnn(), x, y)
    assert bool(capped.success.all()) and bool((capped.norms <= cap).all())
    assert int(capped.queries.sum()) < int(uncapped.queries.sum())


def test_the_reduced_attack_space_grows_to_the_image(batch):
    x, y = batch
    attack = ZOO(UNCAPPED, max_queries=600, coordinates=16, const=10.0, reduced_size=2,
                 grow_every=100)
    result = attack(toy_cnn(), x, y)
    # From 2 x 2 (4 coordinates, 8 queries a round) through 4 x 4 to 8 x 8: the perturbation
    # ends at full resolution, not a blocky upsampled grid.
    delta = (result.x_adv - x)[result.success]
    assert result.success.float().mean() >= 0.5
    assert bool((delta[:, :, 0::2] != delta[:, :, 1::2]).any())


def test_targeted_reaches_the_target(batch):
    x, y = batch
    targets = (y + 1) % 10
    result = ZOO(UNCAPPED, max_queries=1500, coordinates=16, const=10.0)(toy_cnn(), x, y,
                                                                        targets=targets)
    assert result.success.float().mean() >= 0.8
    assert torch.equal(result.predictions[result.success], targets[result.success])


def test_the_same_seed_gives_the_same_result_and_another_seed_another(batch):
    x, y = batch
    runs = [ZOO(UNCAPPED, max_queries=200, coordinates=16, const=10.0, seed=s)(toy_cnn(), x, y)
            for s in (3, 3, 4)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert torch.equal(runs[0].queries, runs[1].queries)
    assert not torch.equal(runs[0].x_adv, runs[2].x_adv)


def affine_two_class() -> nn.Module:
    """Logits ``(sum(x) - 2 + 1e-6, 0)`` on 1x2x2 images: the all-0.5 image is class 0 by a
    margin of 1e-6 (any probe that lowers a pixel by h crosses), the all-ones image by 2 (an
    L2 distance of 1 to the boundary)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
        model[1].bias.copy_(torch.tensor([-2.0 + 1e-6, 0.0]))
    return model


def test_the_constant_moves_by_the_carlini_wagner_rule_after_each_segment():
    x = torch.stack([torch.full((1, 2, 2), 0.5), torch.ones(1, 2, 2)])
    result = ZOO(UNCAPPED, max_queries=151, const=0.5, coordinates=4, binary_steps=3)(
        models.scores_only(affine_two_class()), x, torch.tensor([0, 0]))
    # Segments of 50 queries. Sample 0 crosses in every segment: 0.5, then (0 + 0.5) / 2,
    # then (0 + 0.25) / 2. Sample 1 fails at 0.5 (the minimiser of ||d||^2 + 0.5 f stays
    # short of the boundary), so 5 (tenfold: no upper bound yet), crosses at 5, so
    # (0.5 + 5) / 2 = 2.75 for its last segment.
    assert result.extras["const"].tolist() == [0.125, 2.75]
    assert bool(result.success.all())


def test_one_binary_step_runs_the_whole_budget_at_the_given_constant(batch):
    x, y = batch
    one = ZOO(UNCAPPED, max_queries=300, coordinates=16, const=10.0, binary_steps=1)(
        toy_cnn(), x, y)
    default = ZOO(UNCAPPED, max_queries=300, coordinates=16, const=10.0)(toy_cnn(), x, y)
    assert torch.equal(one.x_adv, default.x_adv) and torch.equal(one.queries, default.queries)
    assert bool((one.extras["const"] == 10.0).all())


def test_with_binary_steps_no_sample_spends_more_than_max_queries_plus_the_success_pass(
        batch):
    x, y = batch
    box = models.scores_only(toy_cnn(), budget=301)
    result = ZOO(UNCAPPED, max_queries=300, coordinates=16, const=10.0, binary_steps=4)(
        box, x, y)
    assert int(result.queries.max()) <= 301
    assert int(result.queries.sum()) == box.queries == result.forward_passes
    # Uncapped, every sample spends its budget: each segment ends at most one pair short.
    assert int(result.queries.min()) >= 301 - 4 * 2


@pytest.mark.parametrize(("options", "message"), [
    ({"max_queries": -5}, "max_queries must be an integer >= 1"),
    ({"const": 0}, "const must be > 0"),
    ({"confidence": -1.0}, "confidence must be >= 0"),
    ({"coordinates": 0}, "coordinates must be an integer >= 1"),
    ({"reduced_size": 0}, "reduced_size must be an integer >= 1"),
    ({"h": float("nan")}, "h must be > 0"),
    ({"binary_steps": 0}, "binary_steps must be an integer >= 1"),
])
def test_bad_options_are_refused_with_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        ZOO(UNCAPPED, **options)


def test_on_the_mnist_cnn_a_reduced_space_breaks_most_images_within_2000_queries(
        mnist_model, mnist_test):
    """10 test images, L2 capped at 3.0, a 7 x 7 start, 2,000 queries. Measured (seeds 0-3,
    one thread): 8 of 10 with every seed (median L2 2.25; the seed draws nothing here:
    the 49 coordinates of the 7 x 7 grid are all drawn in every round of 128), 5 s."""
    x, y = mnist_test[0][:10], mnist_test[1][:10]
    with one_thread():
        result = ZOO(ThreatModel("l2", 3.0), max_queries=2000, reduced_size=7)(
            models.scores_only(mnist_model), x, y)
    assert int(result.success.sum()) >= 6
    assert int(result.queries.max()) <= 2001
