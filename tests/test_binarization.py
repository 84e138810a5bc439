"""The binarization test (Zimmermann et al. 2022): an adversarial example provably exists
inside the ball of the binarised model; a sound evaluation finds it, a masked one does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import Saturated

from advkit import ThreatModel
from advkit.evaluation.binarization import _features, _readout, binarization_test, binarize

LINF = ThreatModel("linf", 0.3)


@pytest.fixture(scope="module")
def few(mnist_test):
    x, y = mnist_test
    return x[:12], y[:12]


def test_the_binarised_model_has_an_adversarial_example_inside_the_ball(mnist_model, few):
    x, _ = few
    made = binarize(mnist_model, x[:1], LINF, generator=torch.Generator().manual_seed(0))
    assert made is not None
    binarised, boundary = made
    with torch.no_grad():
        assert binarised(x[:1]).argmax(1).item() == 0
        assert binarised(boundary).argmax(1).item() == 1
    assert float(LINF.norms(boundary - x[:1])) <= 0.3 + 1e-6
    # Only the readout changed: the features it reads are the model's own.
    old, _ = _readout(mnist_model)
    new, _ = _readout(binarised)
    assert new.out_features == 2
    assert torch.equal(_features(mnist_model, old, x), _features(binarised, new, x))


def test_it_passes_a_plain_model_and_fails_a_masked_one(mnist_model, few):
    x, y = few
    plain = binarization_test(mnist_model, x, y, LINF, "fast", samples=8)
    masked = binarization_test(Saturated(mnist_model).eval(), x, y, LINF, "fast", samples=8)
    assert plain.status == "pass", plain.message
    assert masked.status == "fail", masked.message
    assert masked.details["tested"] >= 4 and masked.details["share"] < 0.7


def test_a_margin_loss_passes_the_masked_model(mnist_model, few):
    """PGD on the logit margin takes sign steps that the logits' scale does not change: the
    same masked model passes with it (a two-class readout leaves no room for DLR)."""
    x, y = few
    check = binarization_test(Saturated(mnist_model).eval(), x, y, LINF,
                              "pgd:loss=\"margin\",steps=50", samples=6)
    assert check.status == "pass", check.message


def test_a_model_without_a_linear_readout_and_an_unbounded_eps_are_refused(few):
    x, y = few
    with pytest.raises(ValueError, match="last nn.Linear"):
        binarization_test(nn.Sequential(nn.Flatten()), x, y, LINF)
    with pytest.raises(ValueError, match="finite eps"):
        binarization_test(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), x, y,
                          ThreatModel("linf", float("inf")))


def test_the_engine_runs_it_as_a_check_and_a_masked_model_is_marked_unreliable(mnist_model,
                                                                               few):
    import advkit

    x, y = few
    report = advkit.evaluate(Saturated(mnist_model).eval(), x, y, LINF, "fast",
                             progress=False, check_samples=6, binarization=6)
    check = next(c for c in report.checks if c.name == "binarization")
    assert check.status == "fail" and not report.reliable
    with pytest.raises(ValueError, match="binarization must be"):
        advkit.evaluate(mnist_model, x, y, LINF, "fast", progress=False, binarization=-1)
