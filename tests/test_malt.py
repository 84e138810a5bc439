"""MALT (Melamed et al., 2024): targeted APGD on the classes nearest in the linearised model."""

from __future__ import annotations

import math

import pytest
import torch
from toys import affine, distance_to_boundary, labelled, random_batch, toy_cnn

from advkit import ThreatModel
from advkit.attacks import MALT
from advkit.attacks.malt import linearised_distances
from advkit.models.access import Oracle


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linearised_distances_are_the_exact_distances_on_an_affine_model(norm):
    model = affine()
    x, y = labelled(model)
    oracle = Oracle(model, len(x))
    distance = linearised_distances(oracle, x, y, norm, 10)
    assert torch.allclose(distance.min(1).values, distance_to_boundary(model, x, y, norm),
                          rtol=1e-4)
    assert (distance.gather(1, y[:, None]) == math.inf).all()
    # One forward and C - 1 backward passes per sample.
    assert oracle.forward_passes == len(x) and oracle.backward_passes == 9 * len(x)


def test_the_first_target_is_the_nearest_class_and_breaks_every_image_within_eps():
    model = affine()
    x, y = labelled(model, 64)
    nearest = distance_to_boundary(model, x, y, "linf")
    eps = float(nearest.median())
    threat = ThreatModel("linf", eps, bounds=(-10.0, 10.0))  # the box out of the way
    result = MALT(threat, n_target_classes=1, steps=50)(model, x, y)
    # On an affine model the nearest boundary within eps is reached by its target alone.
    reachable = nearest < eps * 0.99
    assert result.success[reachable].all()
    assert not result.success[nearest > eps * 1.01].any()  # and nothing else can be


def test_it_costs_the_jacobian_once_plus_apgd_on_at_most_k_targets():
    model = toy_cnn()
    x, y = labelled(model, 16)
    threat = ThreatModel("linf", 1e-4)  # too small to break anything: every run is full
    result = MALT(threat, n_target_classes=2, steps=10)(model, x, y)
    assert not result.success.any()
    # Per sample: the clean pass, the Jacobian (1 + 9), 2 targets x (10 gradients + 1
    # forward), the success pass.
    per_sample = 1 + (1 + 9) + 2 * (2 * 10 + 1) + 1
    assert result.queries.tolist() == [per_sample] * len(x)


def test_targets_are_refused_and_k_is_checked():
    model, (x, y) = toy_cnn(), random_batch(4)
    with pytest.raises(ValueError, match="chooses its own targets"):
        MALT(ThreatModel("linf", 0.1))(model, x, y, targets=(y + 1) % 10)
    with pytest.raises(ValueError, match="n_target_classes"):
        MALT(ThreatModel("linf", 0.1), n_target_classes=0)
