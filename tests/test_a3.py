"""A3, Adaptive Auto Attack (Liu et al., 2022): margin PGD restarts from adaptive output-space
directions, with discarding, within a total gradient budget."""

from __future__ import annotations

import pytest
import torch
from toys import affine, distance_to_boundary, labelled, random_batch, toy_cnn

from advkit import ThreatModel
from advkit.attacks import A3


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_on_an_affine_model_it_breaks_what_lies_within_eps_and_nothing_else(norm):
    model = affine()
    x, y = labelled(model, 64)
    nearest = distance_to_boundary(model, x, y, norm)
    eps = float(nearest.median())
    threat = ThreatModel(norm, eps, bounds=(-10.0, 10.0))  # the box out of the way
    result = A3(threat, budget=60, keep_min=8)(model, x, y)
    assert result.success[nearest < 0.95 * eps].all()
    assert not result.success[nearest > 1.0001 * eps].any()
    assert (result.norms <= eps * (1 + 1e-5)).all()


@pytest.mark.parametrize("budget", [5, 30])
def test_the_gradient_budget_is_never_exceeded(budget):
    model = toy_cnn()
    x, y = labelled(model, 16)
    threat = ThreatModel("linf", 1e-4)  # nothing breaks: every restart runs in full
    result = A3(threat, budget=budget, min_steps=2, keep_min=4)(model, x, y)
    assert not result.success.any()
    assert result.backward_passes <= budget * len(x)
    # It spends most of it (a restart that would overrun is cut to what is left).
    assert result.backward_passes >= 0.5 * budget * len(x)


def test_same_seed_same_result_and_discarding_leaves_the_worst_images_out():
    model = toy_cnn()
    x, y = labelled(model, 32)
    threat = ThreatModel("linf", 0.02)
    one = A3(threat, budget=40, keep_min=4, seed=3)(model, x, y)
    two = A3(threat, budget=40, keep_min=4, seed=3)(model, x, y)
    assert torch.equal(one.x_adv, two.x_adv) and torch.equal(one.queries, two.queries)
    # With discarding, images do not all get the same share of the budget.
    assert len(set(one.queries[~one.success].tolist())) > 1


def test_targets_are_refused_and_bad_settings_too():
    model, (x, y) = toy_cnn(), random_batch(4)
    with pytest.raises(ValueError, match="untargeted"):
        A3(ThreatModel("linf", 0.1))(model, x, y, targets=(y + 1) % 10)
    with pytest.raises(ValueError, match="budget"):
        A3(ThreatModel("linf", 0.1), budget=0)


def test_the_polish_spends_squares_queries_on_the_share_closest_to_breaking_only():
    model = toy_cnn()
    x, y = labelled(model, 16)
    threat = ThreatModel("linf", 1e-4)  # nothing breaks
    plain = A3(threat, budget=5, min_steps=2, keep_min=4)(model, x, y)
    polished = A3(threat, budget=5, min_steps=2, keep_min=4, polish_queries=20,
                  polish_share=0.25)(model, x, y)
    extra = polished.queries - plain.queries
    # 4 of 16 images: Square's 20 queries (its first look included) and one look at its
    # result; the others nothing more.
    assert sorted(extra.tolist()) == [0] * 12 + [21] * 4
    assert torch.equal(polished.x_adv[extra == 0], plain.x_adv[extra == 0])
    with pytest.raises(ValueError, match="polish_share"):
        A3(threat, polish_share=0)


def test_the_targeted_finish_only_adds_to_what_the_restarts_broke(batch):
    """The targeted finish runs after the restarts (same seed, same restarts): it can only
    break more images, each pass counted; its settings are checked."""
    from toys import toy_cnn

    x, y = batch
    model = toy_cnn()
    threat = ThreatModel("linf", 0.03)
    plain = A3(threat, budget=20, keep_min=2, min_steps=2)(model, x, y)
    finish = A3(threat, budget=20, keep_min=2, min_steps=2, targeted_share=1.0,
                targeted_steps=20)(model, x, y)
    assert (finish.success >= plain.success).all()
    assert finish.backward_passes > plain.backward_passes
    assert int(finish.queries.sum()) == finish.forward_passes + finish.backward_passes
    with pytest.raises(ValueError, match="targeted_share"):
        A3(threat, targeted_share=1.5)
    with pytest.raises(ValueError, match="targeted_classes"):
        A3(threat, targeted_classes=0)
