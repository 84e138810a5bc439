"""advkit.defenses.measure: the protection experiment's figures on hand-counted toy cases,
and the helpers that craft the oblivious and adaptive adversarial images."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from toys import random_batch, toy_cnn

from advkit import ThreatModel
from advkit.defenses import Protected
from advkit.defenses.measure import (
    adaptive_examples,
    detection_scores,
    measure_protection,
    oblivious_examples,
)


class MeanClass(nn.Module):
    """Two classes: 1 where the image's mean is above 0.5, else 0."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([0.5 - m, m - 0.5], dim=1) * 10


class PixelAbove:
    """A toy detector: the score is one pixel's value, flagged above ``threshold``."""

    def __init__(self, pixel: tuple[int, int] = (0, 0), threshold: float = 0.5) -> None:
        self.pixel, self.threshold = pixel, threshold

    def fit(self, *args, **kwargs):
        return self

    def score(self, x: Tensor) -> Tensor:
        return x[:, 0, self.pixel[0], self.pixel[1]]

    def attack_score(self, x: Tensor) -> Tensor:
        return self.score(x)

    def flag(self, x: Tensor) -> Tensor:
        return self.score(x) > self.threshold


def images(*pixels: list[float]) -> Tensor:
    return torch.tensor(pixels).view(-1, 1, 2, 2)


# Four samples, counted by hand (PixelAbove flags a first pixel above 0.5):
#   0: y=0, clean right and accepted; adversarial class 1 and flagged  -> detected, fooling
#   1: y=0, clean right and accepted; adversarial class 1, accepted    -> broken, fooling
#   2: y=1, clean right and accepted; adversarial unchanged            -> correct_accepted
#   3: y=1, clean flagged                                              -> false rejection
X = images([0.2] * 4, [0.2] * 4, [0.2, 1, 1, 1], [0.9] * 4)
X_ADV = images([0.8] * 4, [0.0, 1, 1, 1], [0.2, 1, 1, 1], [0.9] * 4)
Y = torch.tensor([0, 0, 1, 1])


def test_rows_equal_a_hand_count():
    pipe = Protected(MeanClass(), detectors=[PixelAbove()])
    (row,) = measure_protection(pipe, X, Y, {"toy": X_ADV}, reference=0.4)
    assert row.attack == "toy" and row.n == 4
    assert row.clean_accuracy == 0.75 and row.false_rejection == 0.25
    assert row.detected == 0.25 and row.correct_accepted == 0.25
    assert row.robust_accuracy == 0.5
    assert row.fooled == 0.5
    assert row.tpr == 0.5  # of the two fooling images, one is flagged
    # Margins (first pixel - 0.5): clean -0.3, -0.3, -0.3, +0.4; fooling +0.3, -0.5. The
    # positive +0.3 beats 3 of the 4 negatives, -0.5 none: AUROC 3/8.
    assert row.auroc == pytest.approx(3 / 8)
    assert row.implied_robust_accuracy_at_half_eps == 0.5
    assert row.reference_robust_accuracy == 0.4 and row.tramer_flag
    (row,) = measure_protection(pipe, X, Y, {"toy": X_ADV}, reference=0.6)
    assert not row.tramer_flag
    (row,) = measure_protection(pipe, X, Y, {"toy": X_ADV})
    assert math.isnan(row.reference_robust_accuracy) and not row.tramer_flag
    assert row.to_dict()["tpr"] == 0.5


def test_without_detectors_there_are_no_detection_figures():
    rows = measure_protection(Protected(MeanClass()), X, Y, {"a": X_ADV, "clean": X},
                              reference=0.1)
    assert [r.attack for r in rows] == ["a", "clean"]
    a, clean = rows
    assert a.clean_accuracy == 1.0 and a.false_rejection == 0.0
    assert a.robust_accuracy == a.correct_accepted == 0.5 and a.detected == 0.0
    assert math.isnan(a.auroc) and math.isnan(a.tpr)
    assert math.isnan(a.implied_robust_accuracy_at_half_eps) and not a.tramer_flag
    assert clean.robust_accuracy == 1.0 and clean.fooled == 0.0


def test_no_fooling_image_leaves_auroc_and_tpr_undefined():
    pipe = Protected(MeanClass(), detectors=[PixelAbove()])
    (row,) = measure_protection(pipe, X, Y, {"none": X})
    assert row.fooled == 0.0 and math.isnan(row.auroc) and math.isnan(row.tpr)
    assert row.implied_robust_accuracy_at_half_eps == 0.75  # right, accepted, unchanged


class Grey(nn.Module):
    """A toy reconstruction: every image becomes uniform grey 0.1 (class 0 for MeanClass)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.full_like(x, 0.1)


def test_detection_counts_what_fools_the_base_model_not_the_transformed_pipeline():
    pipe = Protected(MeanClass(), [Grey()], [PixelAbove()])
    (row,) = measure_protection(pipe, X, Y, {"toy": X_ADV})
    # The pipeline calls everything class 0: clean right on samples 0, 1 (2 and 3 are class
    # 1; 3 is rejected too); their adversarial images stay class 0 whatever they are.
    assert row.clean_accuracy == 0.5 and row.false_rejection == 0.25
    assert row.detected == 0.25 and row.correct_accepted == 0.25
    # The base model on the raw images: samples 0 and 1 are fooled, as without the transform.
    assert row.fooled == 0.5 and row.tpr == 0.5 and row.auroc == pytest.approx(3 / 8)


def test_several_detectors_combine_by_the_largest_margin():
    pipe = Protected(MeanClass(), detectors=[PixelAbove((0, 0), 0.5),
                                             PixelAbove((1, 1), 0.95)])
    scores = detection_scores(pipe, X_ADV)
    assert torch.allclose(scores, torch.tensor([0.3, 0.05, 0.05, 0.4], dtype=torch.float64))
    # The second detector flags sample 1's adversarial image (last pixel 1 > 0.95).
    (row,) = measure_protection(pipe, X, Y, {"toy": X_ADV})
    assert row.tpr == 1.0 and row.detected == 0.5
    with pytest.raises(ValueError, match="no detectors"):
        detection_scores(Protected(MeanClass()), X)


def test_a_pipeline_is_required():
    with pytest.raises(TypeError, match="Protected"):
        measure_protection(MeanClass(), X, Y, {"toy": X_ADV})


THREAT = ThreatModel("linf", 0.1)


def test_oblivious_examples_are_crafted_on_the_base_model_inside_the_ball():
    model = toy_cnn()
    x, y = random_batch(8)
    out = oblivious_examples(model, x, y, THREAT)
    assert list(out) == ["fgsm", "pgd", "cw"]
    for x_adv, seconds in out.values():
        assert x_adv.shape == x.shape and seconds >= 0
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert (model(out["pgd"][0]).argmax(1) != y).sum() >= (model(x).argmax(1) != y).sum()
    with pytest.raises(ValueError, match="unknown oblivious attack"):
        oblivious_examples(model, x, y, THREAT, attacks=["deepfool"])


def test_adaptive_examples_get_past_a_toy_detector():
    model = toy_cnn()
    x, y = random_batch(8)
    x = x * 0.6  # image means about 0.3
    threshold = float(x.flatten(1).mean(1).max()) + 0.01  # every clean image accepted

    class MeanAbove(PixelAbove):
        def score(self, x: Tensor) -> Tensor:
            return x.flatten(1).mean(1)

    pipe = Protected(model, detectors=[MeanAbove(threshold=threshold)])
    x_adv = adaptive_examples(pipe, x, y, ThreatModel("linf", 0.05))
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6
    with torch.no_grad():
        broken = (pipe.predict(x_adv) != y) & (pipe.predict(x_adv) != -1)
    only = adaptive_examples(pipe, x, y, ThreatModel("linf", 0.05), detector_aware_only=True)
    with torch.no_grad():
        broken_only = (pipe.predict(only) != y) & (pipe.predict(only) != -1)
    # More stages never break fewer images than a subset of them would, on the whole.
    assert broken.sum() >= broken_only.sum() - 1
    assert broken.sum() >= 4
