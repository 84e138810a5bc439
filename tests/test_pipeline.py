"""Protected pipelines: reconstruct, classify, reject; the metrics on a case counted by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from advkit import ThreatModel
from advkit.attacks import PGD
from advkit.defenses.pipeline import REJECT, Protected, protection_metrics


class FirstPixel(nn.Module):
    """Two classes: class 1 where the first pixel is above 0.5, class 0 otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        p = x.flatten(1)[:, 0]
        return torch.stack([0.5 - p, p - 0.5], dim=1)


class Bright:
    """Flags an image whose mean exceeds ``limit`` (fit records what it was given)."""

    def __init__(self, limit: float = 0.5) -> None:
        self.limit, self.fitted = limit, None

    def fit(self, model, x_clean, y_clean=None, *, fpr=0.05, **options):
        self.fitted = (x_clean.shape[0], fpr)
        return self

    def flag(self, x: Tensor) -> Tensor:
        return x.flatten(1).mean(1) > self.limit


class Doubles(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2


def images(first: list[float], mean_fill: list[float]) -> Tensor:
    """1x2x2 images: pixel 0 is ``first``, the other three are ``mean_fill``."""
    x = torch.tensor(mean_fill)[:, None].repeat(1, 4)
    x[:, 0] = torch.tensor(first)
    return x.view(-1, 1, 2, 2)


def test_metrics_equal_a_hand_count():
    pipe = Protected(FirstPixel(), detectors=[Bright(0.5)])
    y = torch.tensor([0, 1, 0, 1, 0])
    # clean: 0 right; 1 right; 0 right but bright (rejected); 1 wrong (first pixel 0.2);
    # 0 right
    x = images([0.1, 0.9, 0.1, 0.2, 0.1], [0.1, 0.1, 0.9, 0.1, 0.1])
    # adversarial: 0 flipped (accepted); 1 still right; bright (rejected, but its clean
    # image was rejected too: not defended); 1 flipped from a wrong clean image; bright
    # (rejected: detected)
    x_adv = images([0.9, 0.8, 0.9, 0.1, 0.1], [0.1, 0.1, 0.9, 0.1, 0.9])
    assert pipe.predict(x).tolist() == [0, 1, REJECT, 0, 0]
    assert pipe.predict(x_adv).tolist() == [1, 1, REJECT, 0, REJECT]
    m = protection_metrics(pipe, x, y, x_adv)
    # Shares of 5 samples: 3 right when clean, 1 rejected, 1 detected, 1 correct accepted.
    assert (m.clean_accuracy, m.false_rejection) == pytest.approx((3 / 5, 1 / 5))
    assert (m.detected, m.correct_accepted) == pytest.approx((1 / 5, 1 / 5))
    assert m.robust_accuracy == pytest.approx(2 / 5)
    assert m.n == 5


def test_forward_is_the_classifier_on_the_reconstructed_input():
    class Invert(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return 1 - x

    x = images([0.1, 0.9], [0.0, 0.0])
    pipe = Protected(FirstPixel(), transforms=[Invert()])
    assert torch.equal(pipe(x), FirstPixel()(1 - x))
    assert pipe.predict(x).tolist() == [1, 0]


def test_fit_fits_every_detector_with_the_false_positive_rate():
    first, second = Bright(), Bright()
    x = images([0.1] * 6, [0.1] * 6)
    Protected(FirstPixel(), detectors=[first, second]).fit(x, fpr=0.1)
    assert first.fitted == second.fitted == (6, 0.1)


def test_a_pipeline_is_attacked_like_any_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    pipe = Protected(model, detectors=[Bright()])
    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 2, (8,))
    result = PGD(ThreatModel("linf", 0.2), steps=3)(pipe, x, y)
    assert result.x_adv.shape == x.shape and result.queries.shape == (8,)


def test_a_transform_leaving_the_box_is_an_error_naming_it():
    pipe = Protected(FirstPixel(), transforms=[Doubles()])
    with pytest.raises(ValueError, match=r"Doubles returned values outside \[0, 1\]"):
        pipe(images([0.9], [0.9]))


def test_bad_parts_are_refused():
    with pytest.raises(TypeError, match="transform must be an nn.Module"):
        Protected(FirstPixel(), transforms=[lambda x: x])
    with pytest.raises(TypeError, match=r"detector needs fit\(\) and flag\(\)"):
        Protected(FirstPixel(), detectors=[object()])
    with pytest.raises(ValueError, match="same shape"):
        protection_metrics(Protected(FirstPixel()), images([0.1], [0.1]), torch.tensor([0]),
                           images([0.1, 0.2], [0.1, 0.1]))


def test_for_attack_keeps_the_forward_and_lets_gradients_through_bit_depth():
    from advkit.defenses import BitDepth
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    pipe = Protected(model, transforms=[BitDepth(bits=2)])
    x = torch.rand(6, 1, 2, 2, requires_grad=True)
    (grad_masked,) = torch.autograd.grad(pipe(x).sum(), x)
    assert not grad_masked.any()  # rounding has no gradient: the masking BPDA removes
    adaptive = pipe.for_attack()
    assert torch.equal(adaptive(x), pipe(x))
    (grad,) = torch.autograd.grad(adaptive(x).sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(model(x).sum(), x)[0])


def test_an_attack_never_counts_a_rejected_input_as_a_success():
    # Class 1 needs the first pixel above 0.5; a detector rejects images whose first pixel
    # exceeds 0.45: every way to flip a class-0 image is rejected.
    class FirstPixelHigh:
        def fit(self, *args, **kwargs):
            return self

        def flag(self, x: Tensor) -> Tensor:
            return x.flatten(1)[:, 0] > 0.45

    pipe = Protected(FirstPixel().eval(), detectors=[FirstPixelHigh()])
    x = images([0.2, 0.3], [0.0, 0.0])
    y = torch.tensor([0, 0])
    result = PGD(ThreatModel("linf", 0.5), steps=10)(pipe, x, y)
    assert (result.x_adv.flatten(1)[:, 0] > 0.5).all()  # the classifier alone is fooled
    assert result.predictions.tolist() == [REJECT, REJECT]
    assert not result.success.any()
    bare = PGD(ThreatModel("linf", 0.5), steps=10)(FirstPixel().eval(), x, y)
    assert bare.success.all()
