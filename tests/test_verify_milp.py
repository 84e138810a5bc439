"""Complete verification (MILP) and the Ground-Truth Attack: hand-computed answers on a
2-neuron network, counter-examples confirmed by fresh forward passes, agreement with CROWN
and with attacks on a small trained-free MLP, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advkit.attacks import FAB, PGD
from advkit.threat import ThreatModel
from advkit.verify import certify
from advkit.verify.bounds import InputSet, backward_lower, layer_bounds, network
from advkit.verify.certify import _spec
from advkit.verify.milp import ground_truth, verify


def absolute_value_net() -> nn.Module:
    """z0 = relu(x) + relu(-x) = |x|, z1 = 0.5: class 0 exactly where |x| > 0.5."""
    first, second = nn.Linear(1, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        first.bias.zero_()
        second.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        second.bias.copy_(torch.tensor([0.0, 0.5]))
    return nn.Sequential(first, nn.ReLU(), second).eval()


BOX = (-2.0, 2.0)


def test_two_neurons_verified_with_the_exact_minimum_margin():
    # x0 = 1, eps 0.4: x in [0.6, 1.4], min |x| - 0.5 = 0.1.
    result = verify(absolute_value_net(), torch.tensor([[1.0]]), torch.tensor([0]),
                    ThreatModel("linf", 0.4, BOX))
    assert result.status == ["verified"]
    assert result.lower_bounds[0, 1].item() == pytest.approx(0.1, abs=1e-6)
    assert math.isinf(result.lower_bounds[0, 0].item())


def test_two_neurons_falsified_across_the_kink():
    # eps 1.2: x in [-0.2, 2.2]; both neurons are unstable and min |x| = 0 at x = 0.
    model = absolute_value_net()
    # The solver alone (no attack first, to the exact minimum), then with both.
    threat = ThreatModel("linf", 1.2, BOX)
    exact = verify(model, torch.tensor([[1.0]]), torch.tensor([0]), threat, attack_steps=0,
                   gap=0.0)
    quick = verify(model, torch.tensor([[1.0]]), torch.tensor([0]), threat)
    assert exact.status == quick.status == ["falsified"]
    assert exact.lower_bounds[0, 1].item() == pytest.approx(-0.5, abs=1e-6)
    assert quick.lower_bounds[0, 1].item() <= -0.5 + 1e-6  # a sound bound, not the minimum
    for result in (exact, quick):
        example = result.counterexamples[0]
        assert abs(example.item() - 1.0) <= 1.2 + 1e-6
        assert model(example.unsqueeze(0)).argmax(1).item() == 1  # a fresh forward pass


def test_ground_truth_on_two_neurons_is_the_hand_computed_distance():
    # The nearest x with z1 - z0 >= delta: |x| <= 0.5 - delta, so Linf and L1 distance
    # from x0 = 1 is 0.5 + delta (for x0 = -1.5: 1 + delta).
    delta = 1e-3
    x = torch.tensor([[1.0], [-1.5]])
    for norm in ("linf", "l1"):
        gt = ground_truth(absolute_value_net(), x, torch.tensor([0, 0]), norm, cap=1.9,
                          delta=delta, bounds=BOX)
        assert gt.status == ["optimal", "optimal"]
        assert gt.distance.tolist() == pytest.approx([0.5 + delta, 1.0 + delta], abs=1e-6)
        assert gt.lower.tolist() == pytest.approx(gt.distance.tolist())
    none = ground_truth(absolute_value_net(), x[:1], torch.tensor([0]), "linf", cap=0.3,
                        delta=delta, bounds=BOX)
    assert none.status == ["none within cap"] and math.isinf(none.distance.item())


def test_sign_deciding_mode_on_two_neurons():
    """The default solve only decides the sign (the margin constrained to at most
    SIGN_CUTOFF): a margin proven above it gets SIGN_CUTOFF / 2 as its bound, one whose
    minimum lies between 0 and the cutoff gets its exact minimum."""
    from advkit.verify.milp import SIGN_CUTOFF

    # z0 - z1 = |x| + b over x in [-0.3, 0.4]: CROWN's bound (x + b >= b - 0.3) is
    # negative, the minimum is b at x = 0.
    threat, x, y = ThreatModel("linf", 0.35, BOX), torch.tensor([[0.05]]), torch.tensor([0])
    for b, expected in ((0.1, SIGN_CUTOFF / 2), (SIGN_CUTOFF / 4, SIGN_CUTOFF / 4)):
        model = absolute_value_net()
        with torch.no_grad():
            model[2].bias.copy_(torch.tensor([0.0, -b]))
        # MILP starts from CROWN's own bound (certify's "crown" also keeps the interval
        # bound, which proves this margin: |x| is folded into the last layer).
        net, region = network(model, x), InputSet.from_threat(x, threat)
        crown = backward_lower(net, region, layer_bounds(net, region, "crown"),
                               _spec(y, 2, x.dtype))
        assert crown[0, 0].item() < 0
        quick = verify(model, x, y, threat, attack_steps=0)
        exact = verify(model, x, y, threat, attack_steps=0, gap=0.0)
        assert quick.status == exact.status == ["verified"]
        assert quick.lower_bounds[0, 1].item() == pytest.approx(expected, abs=1e-6)
        assert exact.lower_bounds[0, 1].item() == pytest.approx(b, abs=1e-6)


def test_sign_deciding_bounds_hold_at_sampled_points():
    """Soundness of the default mode's bounds: every sampled point of the ball has margins
    at or above ``lower_bounds`` (the verified samples' bounds are positive)."""
    model = small_mlp(1)
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = ThreatModel("linf", 0.2)
    result = verify(model, x, y, threat, attack_steps=0, time_limit=30)
    assert {"verified", "falsified"} <= set(result.status)
    crown = certify(model, x, y, threat, "crown").lower_bounds.double()
    assert ((result.lower_bounds > 0) & (crown <= 0)).any()  # margins the solver proved
    g = torch.Generator().manual_seed(5)
    for i in range(len(x)):
        noise = (torch.rand(4000, *x.shape[1:], generator=g) * 2 - 1) * threat.eps
        noise[:1000] = noise[:1000].sign() * threat.eps  # the ball's corners
        points = (x[i] + noise).clamp(0, 1)
        with torch.no_grad():
            logits = model(points).double()
        margins = logits[:, y[i]:y[i] + 1] - logits
        bound = result.lower_bounds[i]
        keep = torch.isfinite(bound)
        assert (margins[:, keep] >= bound[keep] - 1e-5).all()


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10),
                         nn.ReLU(), nn.Linear(10, 3)).eval()


@pytest.fixture(scope="module")
def mlp_data():
    model = small_mlp()
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("linf", 0.2), ("l1", 0.5)])
def test_milp_agrees_with_crown_and_attacks(mlp_data, norm, eps):
    """Sound and complete: whatever CROWN verifies MILP verifies, whatever PGD breaks MILP
    falsifies, every falsified sample's counter-example is adversarial by a fresh forward
    pass inside the set, and MILP's exact margins are never below CROWN's bounds."""
    model, x, y = mlp_data
    threat = ThreatModel(norm, eps)
    result = verify(model, x, y, threat, time_limit=30)
    assert set(result.status) == {"verified", "falsified"}  # both outcomes exercised
    crown = certify(model, x, y, threat, "crown")
    assert not (crown.verified & ~result.verified).any()
    assert (result.lower_bounds >= crown.lower_bounds.double() - 1e-5).all()
    broken = PGD(threat, steps=50, restarts=3)(model, x, y).success
    assert not (broken & result.verified).any()
    for i in result.falsified.nonzero().squeeze(1).tolist():
        example = result.counterexamples[i]
        assert model(example.unsqueeze(0)).argmax(1).item() != y[i].item()
        assert threat.norms(example - x[i]).item() <= eps * (1 + 1e-5)
        assert example.min() >= 0 and example.max() <= 1
    for i in result.verified.nonzero().squeeze(1).tolist():
        assert (result.lower_bounds[i] > 0).all()
    # The solver alone (no attack, exact minima) and certify(method="milp") decide alike;
    # the exact minima lie above the quick run's bounds, and are negative where falsified.
    alone = verify(model, x, y, threat, time_limit=30, attack_steps=0, gap=0.0)
    assert alone.status == result.status
    assert (alone.lower_bounds >= result.lower_bounds - 1e-6).all()
    same = certify(model, x, y, threat, "milp", time_limit=30)
    assert torch.equal(same.verified, result.verified)


def test_ground_truth_is_below_every_attack_and_adversarial(mlp_data):
    model, x, y = mlp_data
    gt = ground_truth(model, x, y, "linf", cap=0.5, time_limit=30)
    assert set(gt.status) <= {"optimal", "none within cap"}
    # An attack's distances narrow the search, never the answer (even when too small).
    fab = FAB(ThreatModel("linf", math.inf), steps=50)(model, x, y)
    hinted = ground_truth(model, x, y, "linf", cap=0.5, time_limit=30,
                          upper=torch.where(fab.success, fab.norms.double(), math.inf) * 0.5)
    assert hinted.status == gt.status
    assert torch.allclose(hinted.distance, gt.distance, atol=1e-6)
    found = gt.distance < math.inf
    for i in found.nonzero().squeeze(1).tolist():
        assert model(gt.x_adv[i:i + 1]).argmax(1).item() != y[i].item()
        assert (gt.x_adv[i] - x[i]).abs().max().item() <= gt.distance[i].item() + 1e-6
    # Nothing reaches the margin delta below the ground truth: not PGD (on the logit
    # margin), and MILP's exact minimum margins over the smaller ball say so.
    delta = 1e-4
    for i in found.nonzero().squeeze(1).tolist():
        threat = ThreatModel("linf", gt.distance[i].item() * 0.999)
        attack = PGD(threat, steps=100, restarts=5, loss="margin")(model, x[i:i + 1],
                                                                     y[i:i + 1])
        logits = model(attack.x_adv)[0]
        others = torch.cat([logits[:y[i]], logits[y[i] + 1:]])
        assert (others.max() - logits[y[i]]).item() < delta
        exact = verify(model, x[i:i + 1], y[i:i + 1], threat, attack_steps=0, gap=0.0)
        assert exact.status in (["verified"], ["falsified"])
        assert exact.lower_bounds[0].min().item() > -delta


def test_errors_are_clear(mlp_data):
    model, x, y = mlp_data
    with pytest.raises(ValueError, match="quadratic"):
        verify(model, x, y, ThreatModel("l2", 0.1))
    with pytest.raises(ValueError, match="max pooling"):
        verify(nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3)).eval(), x, y,
               ThreatModel("linf", 0.1))
    with pytest.raises(ValueError, match="train mode"):
        verify(small_mlp().train(), x, y, ThreatModel("linf", 0.1))
    with pytest.raises(ValueError, match="time_limit"):
        verify(model, x, y, ThreatModel("linf", 0.1), time_limit=0)
    with pytest.raises(ValueError, match="gap"):
        verify(model, x, y, ThreatModel("linf", 0.1), gap=-1)
    with pytest.raises(ValueError, match="delta"):
        ground_truth(model, x, y, delta=0)
    with pytest.raises(ValueError, match="cap"):
        ground_truth(model, x, y, cap=math.inf)
    wrong = y.clone()
    wrong[0] = (y[0] + 1) % 3
    with pytest.raises(ValueError, match="misclassified"):
        ground_truth(model, x, wrong)


def test_the_ground_truth_attack_through_the_attack_contract():
    """advkit.attacks.GroundTruth returns the MILP's minimal examples, counted as a minimal
    attack, never farther than FAB's on the same images."""
    from advkit.attacks import GroundTruth

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.manual_seed(3)
    model = model.eval()
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # one misclassified image: returned as is, norm 0
    unbounded = ThreatModel("linf", math.inf)
    result = GroundTruth(unbounded, cap=0.6, time_limit=30)(model, x, y)
    assert result.kind == "minimal" and result.success.all()
    assert result.norms[0].item() == 0
    direct = ground_truth(model, x[1:], y[1:], "linf", cap=0.6, time_limit=30)
    assert torch.allclose(result.norms[1:].double(), direct.distance, atol=1e-6)
    fab = FAB(unbounded, steps=100, restarts=3)(model, x, y)
    assert (result.norms[fab.success] <= fab.norms[fab.success] + 1e-4).all()
    with pytest.raises(ValueError, match="supports norms"):
        GroundTruth(ThreatModel("l2", 1.0))
