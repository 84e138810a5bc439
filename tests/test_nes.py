"""NES (Ilyas et al., 2018): gradients estimated from scores, query-limited and partial
information, budgeted per sample."""

from __future__ import annotations

import pytest
import torch
from detection import one_thread
from toys import toy_cnn

from advkit import ThreatModel, models
from advkit.attacks import NES
from advkit.models.access import AccessError, Oracle, QueryBudgetExceeded

LINF = ThreatModel("linf", 0.1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_no_sample_spends_more_than_max_queries_plus_the_success_pass(norm, batch):
    x, y = batch
    box = models.scores_only(toy_cnn(), budget=101)
    tiny = ThreatModel(norm, 0.02 if norm == "linf" else 0.1)
    result = NES(tiny, max_queries=100, samples=10)(box, x, y)
    assert int(result.queries.max()) <= 101
    assert int(result.queries.sum()) == box.queries == result.forward_passes
    # An iteration costs samples + 1 = 11: an unbroken sample stops when it cannot pay one.
    unbroken = ~result.success
    assert unbroken.any() and bool((result.queries[unbroken] >= 101 - 11).all())


def test_an_access_budget_below_max_queries_is_refused_before_any_query(batch):
    x, y = batch
    box = models.scores_only(toy_cnn(), budget=50)
    with pytest.raises(QueryBudgetExceeded, match="max_queries=49"):
        NES(LINF, max_queries=50)(box, x, y)
    assert box.queries == 0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_point_stays_in_the_ball_and_a_success_ends_the_search(norm, batch):
    x, y = batch
    threat = ThreatModel(norm, 0.3 if norm == "linf" else 2.0)
    result = NES(threat, max_queries=300, samples=10)(toy_cnn(), x, y)
    assert result.success.float().mean() >= 0.9
    assert bool((result.norms <= threat.eps * (1 + 1e-5)).all())
    done = result.success
    torch.testing.assert_close(result.extras["queries_to_success"][done],
                               result.queries[done] - 1)


def test_partial_information_reaches_the_target_through_a_top_2_view(batch):
    x, y = batch
    # toy_cnn() gives 15 of these images class 5 and one class 6: each target is the class
    # of another input, which the attack starts from.
    targets = torch.where(y == 5, 6, 5)
    box = models.scores_only(toy_cnn(), top_k=2)
    result = NES(ThreatModel("linf", 0.2), max_queries=1500, samples=10)(box, x, y,
                                                                        targets=targets)
    # Measured: 12 of 16.
    assert result.success.float().mean() >= 0.6
    assert torch.equal(result.predictions[result.success], targets[result.success])
    assert bool((result.norms <= 0.2 + 1e-6).all())


def test_partial_information_starts_from_given_images(batch):
    x, y = batch
    model = toy_cnn()
    targets = (y + 1) % 10
    # Images the model gives the targets: a plain targeted NES run with a large budget.
    found = NES(ThreatModel("linf", 0.5), max_queries=2000, samples=10)(model, x, y,
                                                                       targets=targets)
    keep = found.success
    result = NES(ThreatModel("linf", 0.2), max_queries=1500, samples=10, partial=True)(
        models.scores_only(model, top_k=2), x[keep], y[keep], targets=targets[keep],
        starting_points=found.x_adv[keep])
    assert result.success.float().mean() >= 0.7


def test_partial_information_without_targets_is_refused(batch):
    x, y = batch
    with pytest.raises(ValueError, match="partial-information schedule is targeted"):
        NES(LINF, max_queries=100, samples=10, partial=True)(toy_cnn(), x, y)
    with pytest.raises(ValueError, match="shrinks a Linf box"):
        NES(ThreatModel("l2", 1.0), partial=True)


def test_the_same_seed_gives_the_same_result_and_another_seed_another(batch):
    x, y = batch
    tiny = ThreatModel("linf", 0.02)
    runs = [NES(tiny, max_queries=100, samples=10, seed=s)(toy_cnn(), x, y) for s in (3, 3, 4)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert torch.equal(runs[0].queries, runs[1].queries)
    assert not torch.equal(runs[0].x_adv, runs[2].x_adv)


@pytest.mark.parametrize(("options", "message"), [
    ({"max_queries": 0}, "max_queries must be an integer >= 1"),
    ({"samples": 7}, "samples must be an even integer >= 2"),
    ({"sigma": -1.0}, "sigma must be > 0"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"min_lr": 1.0}, "min_lr must be <= max_lr"),
    ({"step_size": 0.0}, "step_size must be > 0"),
])
def test_bad_options_are_refused_with_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        NES(LINF, **options)


# -- the label-only setting ---------------------------------------------------------------
def label_only_batch(batch):
    """The batch with targets each some other input's class (toy_cnn() gives 15 of these
    images class 5 and one class 6), so every sample has an input to start from."""
    x, y = batch
    return x, y, torch.where(y == 5, 6, 5)


def test_label_only_reaches_the_target_inside_the_ball_from_labels_alone(batch):
    x, y, targets = label_only_batch(batch)
    result = NES(ThreatModel("linf", 0.2), max_queries=10_000, samples=10, mc_samples=10)(
        models.labels_only(toy_cnn()), x, y, targets=targets)
    # Measured (seeds 0-3): 6-7 of 16.
    assert int(result.success.sum()) >= 4
    done = result.success
    assert torch.equal(result.predictions[done], targets[done])
    assert bool((result.norms <= 0.2 + 1e-6).all())
    seen = result.extras["queries_to_success"] >= 0
    assert bool(result.success[seen].all())


def test_label_only_spends_at_most_max_queries_all_counted_by_the_access(batch):
    x, y, targets = label_only_batch(batch)
    box = models.labels_only(toy_cnn(), budget=3001)
    result = NES(ThreatModel("linf", 0.2), max_queries=3000, samples=10, mc_samples=10)(
        box, x, y, targets=targets)
    assert int(result.queries.max()) <= 3001
    assert int(result.queries.sum()) == box.queries == result.forward_passes
    seen = result.extras["queries_to_success"]
    assert bool((seen[seen >= 0] < result.queries[seen >= 0]).all())
    # A gradient estimate costs samples * mc_samples = 100 queries: an unbroken sample
    # stops when it cannot pay one more and a step.
    unbroken = ~result.success
    assert unbroken.any() and bool((result.queries[unbroken] >= 3001 - 101 - 8).all())


def test_label_only_asks_for_labels_never_scores(batch, monkeypatch):
    x, y, targets = label_only_batch(batch)
    asked = []
    real = Oracle.logits

    def logits(self, *args, **kwargs):
        asked.append(args[0].shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Oracle, "logits", logits)
    attack = NES(ThreatModel("linf", 0.2), max_queries=1000, samples=10, mc_samples=10,
                 label_only=True)
    # Through a score access too: the setting, not the access, decides what is asked.
    through_labels = attack(models.labels_only(toy_cnn()), x, y, targets=targets)
    through_scores = attack(models.scores_only(toy_cnn()), x, y, targets=targets)
    assert asked == []
    assert torch.equal(through_labels.x_adv, through_scores.x_adv)
    assert torch.equal(through_labels.queries, through_scores.queries)


def test_label_only_gives_the_same_result_for_the_same_seed_and_another_for_another(batch):
    x, y, targets = label_only_batch(batch)
    runs = [NES(ThreatModel("linf", 0.2), max_queries=1000, samples=10, mc_samples=10,
                seed=s)(models.labels_only(toy_cnn()), x, y, targets=targets)
            for s in (3, 3, 4)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert torch.equal(runs[0].queries, runs[1].queries)
    assert not torch.equal(runs[0].x_adv, runs[2].x_adv)


def test_label_only_leaves_a_sample_without_a_start_at_x(batch):
    x, y = batch
    # No input of the batch is labelled 0, and no starting point is given.
    box = models.labels_only(toy_cnn())
    with pytest.warns(UserWarning, match="they stay at x, unbroken"):
        result = NES(ThreatModel("linf", 0.2), max_queries=1000, samples=10, mc_samples=10)(
            box, x, y, targets=torch.zeros_like(y))
    assert torch.equal(result.x_adv, x) and not result.success.any()
    assert result.queries.tolist() == [2] * len(y)  # the first look and the success pass


def test_label_only_starts_from_given_images_of_the_target(batch):
    x, y = batch
    model = toy_cnn()
    targets = (y + 1) % 10
    found = NES(ThreatModel("linf", 0.5), max_queries=2000, samples=10)(model, x, y,
                                                                       targets=targets)
    keep = found.success
    result = NES(ThreatModel("linf", 0.2), max_queries=5000, samples=10, mc_samples=10)(
        models.labels_only(model), x[keep], y[keep], targets=targets[keep],
        starting_points=found.x_adv[keep])
    # Measured (seeds 0-3): all 16 kept, 5-8 of them broken.
    assert int(keep.sum()) >= 12 and int(result.success.sum()) >= 3


@pytest.mark.parametrize(("threat", "targeted", "message"), [
    (LINF, False, "label-only NES is targeted.*use HopSkipJump or Boundary"),
    (ThreatModel("l2", 1.0), True, "label-only setting shrinks a Linf box"),
])
def test_label_only_refuses_what_it_cannot_do_before_any_query(threat, targeted, message,
                                                               batch):
    x, y, targets = label_only_batch(batch)
    box = models.labels_only(toy_cnn())
    with pytest.raises(ValueError, match=message):
        NES(threat)(box, x, y, targets=targets if targeted else None)
    assert box.queries == 0


def test_the_configured_attack_needs_labels_unless_label_only_is_false():
    assert NES.access == "scores"  # what the registry lists
    assert NES(LINF).access == NES(LINF, label_only=True).access == "labels"
    assert NES(LINF, label_only=False).access == "scores"
    # The configuration records label_only, which says it.
    assert NES(LINF).config()["label_only"] is None and "access" not in NES(LINF).config()


@pytest.mark.parametrize(("label_only", "level", "refused"), [
    (None, "labels", True), (None, "scores", False), (None, "gradients", False),
    (True, "scores", True), (True, "gradients", True), (False, "labels", False),
])
def test_an_untargeted_call_is_refused_where_the_label_only_setting_is_taken(
        label_only, level, refused):
    attack = NES(LINF, label_only=label_only)
    attack.check_call(level, targeted=True)
    if refused:
        with pytest.raises(ValueError, match="label-only NES is targeted"):
            attack.check_call(level, targeted=False)
    else:
        attack.check_call(level, targeted=False)


def test_label_only_false_refuses_a_label_only_model(batch):
    x, y, targets = label_only_batch(batch)
    with pytest.raises(AccessError, match="needs scores access"):
        NES(LINF, label_only=False)(models.labels_only(toy_cnn()), x, y, targets=targets)


@pytest.mark.parametrize(("options", "message"), [
    ({"mc_samples": 0}, "mc_samples must be an integer >= 1"),
    ({"mu": -0.001}, "mu must be > 0"),
    ({"label_only": "yes"}, "label_only must be True, False or None"),
    ({"label_only": True, "partial": False}, "runs the partial-information schedule"),
])
def test_bad_label_only_options_are_refused_with_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        NES(LINF, **options)


def test_on_the_mnist_cnn_most_images_fall_within_1000_queries(mnist_model, mnist_test):
    """20 test images, Linf 0.3, 1,000 queries, the defaults. Measured (seeds 0-3, one
    thread): 19-20 of 20 broken, 4-5 s."""
    x, y = mnist_test[0][:20], mnist_test[1][:20]
    with one_thread():
        result = NES(ThreatModel("linf", 0.3), max_queries=1000)(
            models.scores_only(mnist_model), x, y)
    assert int(result.success.sum()) >= 17
    assert int(result.queries.max()) <= 1001


def test_on_the_mnist_cnn_partial_information_works_through_top_3(mnist_model, mnist_test):
    """10 test images, targeted (y + 1), Linf 0.3, top 3 scores shown, 3,000 queries.
    Measured (seeds 0-3, one thread): 4-6 of 10 (3 of the 10 have no input of the target
    class in the batch to start from, and start from x), 4-15 s."""
    x, y = mnist_test[0][:10], mnist_test[1][:10]
    with one_thread():
        result = NES(ThreatModel("linf", 0.3), max_queries=3000)(
            models.scores_only(mnist_model, top_k=3), x, y, targets=(y + 1) % 10)
    assert int(result.success.sum()) >= 3


def test_on_the_mnist_cnn_label_only_reaches_the_target_inside_the_ball(mnist_model,
                                                                        mnist_test):
    """5 test images, targeted (y + 1), Linf 0.4, labels only, 20,000 queries, each started
    from the first of test images 1000-1999 the model labels as its target; probes and
    noise of 0.02 (the paper's 0.001 leaves the proxy score flat on MNIST), 20 probes of 10
    copies. Measured (seeds 0-3, one thread): 4-5 of 5 broken (1-4 of them seen at the
    target in the search, the others by the final projection into the ball), 8-15 s."""
    images, labels = mnist_test
    x, y = images[:5], labels[:5]
    targets = (y + 1) % 10
    with torch.no_grad():
        pool = mnist_model(images[1000:2000]).argmax(1)
    starts = torch.stack([images[1000 + int((pool == t).nonzero()[0])] for t in targets])
    box = models.labels_only(mnist_model)
    with one_thread():
        result = NES(ThreatModel("linf", 0.4), max_queries=20_000, samples=20, mc_samples=10,
                     sigma=0.02, mu=0.02)(box, x, y, targets=targets, starting_points=starts)
    assert int(result.success.sum()) >= 3
    assert torch.equal(result.predictions[result.success], targets[result.success])
    assert bool((result.norms <= 0.4 + 1e-6).all())
    assert int(result.queries.max()) <= 20_001 and int(result.queries.sum()) == box.queries
