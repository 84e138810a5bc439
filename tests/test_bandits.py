"""Bandits-TD (Ilyas et al., 2019): a gradient prior learned from two probes per step, on
tiles, budgeted per sample."""

from __future__ import annotations

import pytest
import torch
from detection import one_thread
from toys import toy_cnn

from advkit import ThreatModel, models
from advkit.attacks import Bandits
from advkit.models.access import AccessError, QueryBudgetExceeded

LINF = ThreatModel("linf", 0.1)
#: The toy images are 8 x 8: the default tiles of 4 would leave 2 x 2 values to search
#: (12-13 of the 16 broken at Linf 0.3, however many queries), so the toy runs use pixels.
PIXELS = {"tile_size": 1}


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_no_sample_spends_more_than_max_queries_and_the_access_layer_counts_them_all(
        norm, batch):
    x, y = batch
    box = models.scores_only(toy_cnn(), budget=101)
    tiny = ThreatModel(norm, 0.01 if norm == "linf" else 0.05)
    result = Bandits(tiny, max_queries=100)(box, x, y)
    assert int(result.queries.max()) <= 101
    assert int(result.queries.sum()) == box.queries == result.forward_passes
    # The first look (1), then 3 queries a step: an unbroken sample stops at 1 + 3 * 33.
    unbroken = ~result.success
    assert unbroken.any() and bool((result.queries[unbroken] == 1 + 3 * 33 + 1).all())


def test_an_access_budget_below_max_queries_is_refused_before_any_query(batch):
    x, y = batch
    box = models.scores_only(toy_cnn(), budget=50)
    with pytest.raises(QueryBudgetExceeded, match="max_queries=49"):
        Bandits(LINF, max_queries=50)(box, x, y)
    assert box.queries == 0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_result_stays_in_the_ball_and_the_box_and_a_success_ends_the_search(norm, batch):
    x, y = batch
    threat = ThreatModel(norm, 0.3 if norm == "linf" else 2.0)
    result = Bandits(threat, max_queries=300, **PIXELS)(toy_cnn(), x, y)
    # Measured (seeds 0-3): 15-16 of 16 for both norms.
    assert int(result.success.sum()) >= 14
    assert bool((result.norms <= threat.eps * (1 + 1e-5)).all())
    assert 0 <= float(result.x_adv.min()) and float(result.x_adv.max()) <= 1
    done = result.success
    torch.testing.assert_close(result.extras["queries_to_success"][done],
                               result.queries[done] - 1)


def test_a_targeted_attack_reaches_the_targets(batch):
    x, y = batch
    targets = (y + 1) % 10
    result = Bandits(ThreatModel("linf", 0.3), max_queries=600, **PIXELS)(
        toy_cnn(), x, y, targets=targets)
    # Measured (seeds 0-3): 15-16 of 16.
    assert int(result.success.sum()) >= 13
    assert torch.equal(result.predictions[result.success], targets[result.success])


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_both_losses_break_the_toy_model_through_a_top_2_view(loss, batch):
    x, y = batch
    box = models.scores_only(toy_cnn(), top_k=2)
    result = Bandits(ThreatModel("linf", 0.3), max_queries=300, loss=loss, **PIXELS)(
        box, x, y)
    # Measured (seeds 0-3): 16 of 16 with each loss.
    assert int(result.success.sum()) >= 14


def test_the_steps_move_whole_tiles():
    """On a flat image (no pixel at a bound), the last iterate of an unbroken sample moves
    every pixel of a tile_size x tile_size tile by the same amount."""
    x = torch.full((4, 1, 8, 8), 0.5)
    with torch.no_grad():
        y = toy_cnn()(x).argmax(1)
    result = Bandits(ThreatModel("linf", 0.01), max_queries=60, tile_size=4)(toy_cnn(), x, y)
    assert not result.success.any()
    delta = (result.x_adv - x)[:, 0]
    tiles = delta.unfold(1, 4, 4).unfold(2, 4, 4)  # (N, 2, 2, 4, 4)
    assert bool((tiles.amax(dim=(-1, -2)) - tiles.amin(dim=(-1, -2)) < 1e-6).all())
    assert bool((delta.abs().amax(dim=(1, 2)) > 0).all())


def test_the_same_seed_gives_the_same_result_and_another_seed_another(batch):
    x, y = batch
    tiny = ThreatModel("linf", 0.02)
    runs = [Bandits(tiny, max_queries=100, seed=s)(toy_cnn(), x, y) for s in (3, 3, 4)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert torch.equal(runs[0].queries, runs[1].queries)
    assert not torch.equal(runs[0].x_adv, runs[2].x_adv)


def test_a_labels_only_model_is_refused_before_any_query(batch):
    x, y = batch
    box = models.labels_only(toy_cnn())
    with pytest.raises(AccessError, match=r"Bandits .* needs scores access.*labels access "
                                          r"only.*decision-based attack"):
        Bandits(LINF)(box, x, y)
    assert box.queries == 0


@pytest.mark.parametrize(("options", "message"), [
    ({"max_queries": 0}, "max_queries must be an integer >= 1"),
    ({"tile_size": 0}, "tile_size must be an integer >= 1"),
    ({"tile_size": 2.5}, "tile_size must be an integer >= 1"),
    ({"exploration": -1.0}, "exploration must be > 0"),
    ({"fd_eta": 0.0}, "fd_eta must be > 0"),
    ({"online_lr": float("nan")}, "online_lr must be > 0"),
    ({"step_size": float("inf")}, "step_size must be > 0"),
    ({"loss": "dlr"}, "unknown loss 'dlr'"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"checkpoints": [100, 20_000]}, "checkpoints must be at most max_queries"),
])
def test_bad_options_are_refused_with_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        Bandits(LINF, **options)


def test_an_l1_threat_is_refused():
    with pytest.raises(ValueError, match="supports norms linf, l2"):
        Bandits(ThreatModel("l1", 1.0))


def test_the_defaults_are_the_papers_per_norm():
    linf, l2 = Bandits(ThreatModel("linf", 0.05)), Bandits(ThreatModel("l2", 5.0))
    assert (linf.exploration, linf.fd_eta, linf.online_lr) == (1.0, 0.1, 100.0)
    assert (l2.exploration, l2.fd_eta, l2.online_lr) == (0.01, 0.01, 0.1)
    assert linf.step_size == pytest.approx(0.01) and l2.step_size == pytest.approx(0.5)


def test_on_the_mnist_cnn_most_images_fall_within_1000_queries(mnist_model, mnist_test):
    """10 test images, untargeted Linf 0.3, 1,000 queries, the defaults (tiles of 4).
    Measured (seeds 0-3, one thread): 9-10 of 10 broken, under 2 s."""
    x, y = mnist_test[0][:10], mnist_test[1][:10]
    with one_thread():
        result = Bandits(ThreatModel("linf", 0.3), max_queries=1000)(
            models.scores_only(mnist_model), x, y)
    assert int(result.success.sum()) >= 8
    assert int(result.queries.max()) <= 1001
    assert bool((result.norms <= 0.3 + 1e-6).all())
