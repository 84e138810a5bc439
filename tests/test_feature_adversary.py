"""FeatureAdversary (Sabour et al., 2016): match a guide's representation inside an eps-ball."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import toy_cnn

from advkit import ThreatModel
from advkit.attacks.feature_adversary import FeatureAdversary, resolve_layer

LINF = ThreatModel("linf", 0.3)


class Named(nn.Module):
    """A non-Sequential model with named submodules."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def guided_batch(model, n=16, seed=0):
    """Images, labels (the model's predictions) and guides the model puts in other classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4 * n, 1, 8, 8, generator=g)
    pred = predict(model, x)
    guides = x.roll(1, 0)
    keep = predict(model, guides) != pred
    return x[keep][:n], pred[keep][:n], guides[keep][:n]


@pytest.fixture(scope="module")
def mnist_run(mnist_model, mnist_test):
    x, y = mnist_test
    x, y = x[:60], y[:60]
    guides = x.roll(1, 0)
    keep = predict(mnist_model, guides) != y
    x, y, guides = x[keep][:20], y[keep][:20], guides[keep][:20]
    attack = FeatureAdversary(LINF, layer=9, guides=guides, steps=40)  # fc128 + ReLU
    return x, y, guides, attack(mnist_model, x, y)


# --- the representation ------------------------------------------------------------------

def test_the_layer_distance_to_the_guide_drops_substantially_on_mnist(mnist_run):
    x, _, _, result = mnist_run
    before = result.extras["feature_distance_before"]
    after = result.extras["feature_distance"]
    ratio = after / before
    print(f"FeatureAdversary Linf 0.3, layer 9 on 20 MNIST images: distance ratio median "
          f"{ratio.median():.2f} (max {ratio.max():.2f}), guide class reached "
          f"{result.success_rate:.0%}, {result.seconds:.1f} s")
    assert ratio.median() < 0.5  # 0.35-0.39 over the 7 retrainings (conftest)
    assert (ratio <= 1).all()


def test_reported_distances_are_the_layer_distances(mnist_model, mnist_run):
    x, _, guides, result = mnist_run
    phi = mnist_model[:10]
    with torch.no_grad():
        target = phi(guides)
        before = (phi(x) - target).flatten(1).norm(dim=1)
        after = (phi(result.x_adv) - target).flatten(1).norm(dim=1)
    torch.testing.assert_close(result.extras["feature_distance_before"], before)
    torch.testing.assert_close(result.extras["feature_distance"], after, rtol=1e-4, atol=1e-4)


def test_the_perturbation_stays_in_the_linf_budget_and_the_box(mnist_run):
    x, _, _, result = mnist_run
    assert ((result.x_adv - x).abs() <= 0.3 + 1e-6).all()
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert (result.norms <= 0.3 + 1e-6).all()


def test_success_means_classified_as_the_guide(mnist_model, mnist_run):
    _, _, guides, result = mnist_run
    assert torch.equal(result.targets, predict(mnist_model, guides))
    assert torch.equal(result.success, predict(mnist_model, result.x_adv) == result.targets)


# --- the contract ------------------------------------------------------------------------

def test_counts_the_guide_pass_and_one_gradient_per_step():
    model = toy_cnn()
    x, y, guides = guided_batch(model)
    n = x.shape[0]
    result = FeatureAdversary(LINF, layer=1, guides=guides, steps=7)(model, x, y)
    assert result.backward_passes == 7 * n
    assert result.forward_passes == (1 + 1 + 7 + 1 + 1) * n  # guides, clean, steps, last, check


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_stays_in_the_ball_for_each_norm(norm, eps):
    model = toy_cnn()
    x, y, guides = guided_batch(model)
    result = FeatureAdversary(ThreatModel(norm, eps), layer=1, guides=guides, steps=10)(
        model, x, y)
    assert (result.norms <= eps * (1 + 1e-5)).all()
    assert (result.extras["feature_distance"] <= result.extras["feature_distance_before"]).all()


def test_same_input_same_result():
    model = toy_cnn()
    x, y, guides = guided_batch(model)
    a = FeatureAdversary(LINF, layer=1, guides=guides, steps=5)(model, x, y)
    b = FeatureAdversary(LINF, layer=1, guides=guides, steps=5)(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv)


def test_a_named_layer_of_a_non_sequential_model_and_one_shared_guide():
    model = Named().eval()
    x, y, guides = guided_batch(model)
    guide = guides[:1]
    keep = predict(model, guide).item() != y
    x, y = x[keep], y[keep]
    result = FeatureAdversary(LINF, layer="features.1", guides=guide, steps=10)(model, x, y)
    assert torch.equal(result.targets, predict(model, guide).expand(x.shape[0]))
    assert (result.extras["feature_distance"] < result.extras["feature_distance_before"]).all()


def test_with_guides_returns_a_configured_copy():
    model = toy_cnn()
    x, y, guides = guided_batch(model)
    bare = FeatureAdversary(LINF, layer=1, steps=3)
    ready = bare.with_guides(guides)
    assert ready is not bare
    assert ready(model, x, y).extras["feature_distance"].shape == (x.shape[0],)
    with pytest.raises(ValueError, match="needs guide images"):
        bare(model, x, y)


# --- bad inputs and configurations -------------------------------------------------------

def test_an_unknown_layer_name_lists_the_valid_names():
    model = Named().eval()
    x, y, guides = guided_batch(model)
    with pytest.raises(ValueError, match=r"no layer 'featurs'.*features\.0 \(Conv2d\)"):
        FeatureAdversary(LINF, layer="featurs", guides=guides)(model, x, y)


def test_an_index_needs_a_sequential_model_and_must_be_in_range():
    with pytest.raises(ValueError, match="needs an nn.Sequential.*head"):
        resolve_layer(Named(), 1)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(toy_cnn(), 4)
    assert isinstance(resolve_layer(toy_cnn(), -1), nn.Linear)


def test_bad_guides_and_targets_are_refused():
    model = toy_cnn()
    x, y, guides = guided_batch(model)
    attack = FeatureAdversary(LINF, layer=1, guides=guides)
    with pytest.raises(ValueError, match="targets from the guides"):
        attack(model, x, y, targets=(y + 1) % 10)
    with pytest.raises(ValueError, match="guides must have shape"):
        attack.with_guides(guides[:3])(model, x, y)
    with pytest.raises(ValueError, match="outside the bounds"):
        attack.with_guides(guides * 3)(model, x, y)
    with pytest.raises(ValueError, match="their source image's true class"):
        attack.with_guides(x)(model, x, y)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        FeatureAdversary(LINF, layer=1, steps=0)
    with pytest.raises(TypeError, match="layer must be"):
        FeatureAdversary(LINF, layer=1.5)
