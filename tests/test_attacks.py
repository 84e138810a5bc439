"""The attack contract and the gradient attacks, on small models with known answers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from toys import random_batch, toy_cnn

from advkit import ThreatModel, attacks
from advkit.attacks import BIM, FGSM, ILLC, MIFGSM, PGD

EPS = {"linf": 0.1, "l2": 1.0, "l1": 6.0}
BUDGETED = [(FGSM, "linf"), (FGSM, "l2"), (BIM, "linf"), (BIM, "l2"), (ILLC, "linf"),
            (PGD, "linf"), (PGD, "l2"), (PGD, "l1"), (MIFGSM, "linf"), (MIFGSM, "l2")]


def linear_model(d: int = 16, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).eval()


@pytest.fixture
def batch():
    return random_batch(32)


def make(cls, norm, **kw):
    return cls(ThreatModel(norm, EPS[norm]), **kw)


# --- closed forms ------------------------------------------------------------------------

def test_fgsm_on_a_linear_model_matches_the_closed_form():
    model = linear_model()
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)  # all correctly classified, so FGSM moves every sample
    w = model[1].weight
    # d CE / dx = W^T (softmax - onehot(y)) for a linear model.
    grad = (logits.softmax(1) - nn.functional.one_hot(y, 4).float()) @ w
    expected = (x.flatten(1) + 0.1 * grad.sign()).clamp(0, 1).view_as(x)
    result = FGSM(ThreatModel("linf", 0.1))(model, x, y)
    torch.testing.assert_close(result.x_adv, expected)


def test_l2_fast_gradient_method_on_a_linear_model_matches_the_closed_form():
    model = linear_model()
    x = torch.full((8, 1, 4, 4), 0.5)  # far from the box: no clipping
    with torch.no_grad():
        logits = model(x + torch.randn(8, 1, 4, 4) * 0.1)
    y = model(x).argmax(1)
    grad = (model(x).softmax(1) - nn.functional.one_hot(y, 4).float()) @ model[1].weight
    expected = x.flatten(1) + 0.2 * grad / grad.norm(dim=1, keepdim=True)
    result = FGSM(ThreatModel("l2", 0.2))(model, x, y)
    torch.testing.assert_close(result.x_adv, expected.view_as(x).detach())
    del logits


def test_pgd_with_margin_loss_on_a_binary_linear_model_reaches_the_linf_optimum():
    """f(x) = w.x + b: the strongest Linf perturbation is eps * sign(w_other - w_y)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    x = torch.full((4, 1, 4, 4), 0.5)
    y = model(x).argmax(1)
    w = model[1].weight
    direction = torch.stack([(w[1 - int(c)] - w[int(c)]).sign() for c in y])
    result = PGD(ThreatModel("linf", 0.01), steps=20, random_start=False, loss="margin",
                 step_size=0.002, early_exit=False)(model, x, y)
    torch.testing.assert_close(result.x_adv.flatten(1), x.flatten(1) + 0.01 * direction)


def test_momentum_free_mifgsm_equals_bim():
    model, (x, y) = toy_cnn(), (torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    threat = ThreatModel("linf", 0.05)
    a = MIFGSM(threat, steps=5, decay=0.0)(model, x, y)
    b = BIM(threat, steps=5, step_size=0.01)(model, x, y)
    torch.testing.assert_close(a.x_adv, b.x_adv)


# --- the contract, for every attack ------------------------------------------------------

@pytest.mark.parametrize(("cls", "norm"), BUDGETED)
def test_success_flags_agree_with_a_fresh_forward_pass(cls, norm, batch):
    model, (x, y) = toy_cnn(), batch
    result = make(cls, norm)(model, x, y)
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    goal = pred == result.targets if result.targets is not None else pred != y
    assert torch.equal(result.success, goal)
    assert torch.equal(result.predictions, pred)


@pytest.mark.parametrize(("cls", "norm"), BUDGETED)
def test_outputs_stay_in_the_box_and_the_ball(cls, norm, batch):
    model, (x, y) = toy_cnn(), batch
    result = make(cls, norm)(model, x, y)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert (result.norms <= EPS[norm] * (1 + 1e-5)).all()
    torch.testing.assert_close(result.norms, ThreatModel(norm, EPS[norm]).norms(result.x_adv - x))


@pytest.mark.parametrize(("cls", "norm"), BUDGETED)
def test_same_seed_same_result(cls, norm, batch):
    model, (x, y) = toy_cnn(), batch
    a, b = make(cls, norm, seed=7)(model, x, y), make(cls, norm, seed=7)(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)


def test_different_seeds_give_different_random_starts(batch):
    model, (x, y) = toy_cnn(), batch
    threat = ThreatModel("linf", 0.01)
    a = PGD(threat, steps=1, seed=1, early_exit=False)(model, x, y)
    b = PGD(threat, steps=1, seed=2, early_exit=False)(model, x, y)
    assert not torch.equal(a.x_adv, b.x_adv)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_targeted_pgd_reaches_its_targets(norm, batch):
    model, (x, y) = toy_cnn(), batch
    targets = (y + 3) % 10
    eps = {"linf": 0.8, "l2": 6.0, "l1": 40.0}[norm]
    result = PGD(ThreatModel(norm, eps), steps=100, step_size=eps / 10)(model, x, y, targets)
    assert result.success.float().mean() >= 0.9
    assert torch.equal(result.predictions[result.success], targets[result.success])


def test_targeted_fgsm_steps_down_the_target_loss():
    model = linear_model()
    x = torch.full((8, 1, 4, 4), 0.5)
    y = model(x).argmax(1)
    targets = (y + 1) % 4
    result = FGSM(ThreatModel("linf", 0.05))(model, x, y, targets)
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        before = ce(model(x), targets, reduction="none")
        after = ce(model(result.x_adv), targets, reduction="none")
    assert (after < before).all()


def test_illc_targets_the_least_likely_class(batch):
    model, (x, y) = toy_cnn(), batch
    result = ILLC(ThreatModel("linf", 0.3), steps=30)(model, x, y)
    with torch.no_grad():
        assert torch.equal(result.targets, model(x).argmin(1))
    assert torch.equal(result.success, result.predictions == result.targets)
    with pytest.raises(ValueError, match="chooses its own targets"):
        ILLC(ThreatModel("linf", 0.3))(model, x, y, targets=(y + 1) % 10)


# --- pass counting and early exit --------------------------------------------------------

def test_fgsm_counts_one_gradient_per_image(batch):
    model, (x, y) = toy_cnn(), batch
    result = FGSM(ThreatModel("linf", 0.1))(model, x, y)
    n = x.shape[0]
    assert result.backward_passes == n
    # The gradient pass at x also serves the entry checks; then the fresh success pass.
    assert result.forward_passes == 2 * n


def test_without_early_exit_pgd_spends_exactly_steps_passes(batch):
    model, (x, y) = toy_cnn(), batch
    result = PGD(ThreatModel("linf", 0.1), steps=7, early_exit=False)(model, x, y)
    assert result.backward_passes == 7 * x.shape[0]
    assert result.forward_passes == 8 * x.shape[0]  # the steps and the success pass


@pytest.mark.parametrize(("attack", "clean_pass"), [
    (PGD(ThreatModel("linf", 0.1), steps=7, early_exit=False), 0),      # random start
    (PGD(ThreatModel("linf", 0.1), steps=7, early_exit=False, random_start=False), 0),
    (BIM(ThreatModel("l2", 1.0), steps=7, early_exit=False), 0),
    (MIFGSM(ThreatModel("linf", 0.1), steps=7, early_exit=False), 0),
    (ILLC(ThreatModel("linf", 0.1), steps=7, early_exit=False), 1),     # targets from it
])
def test_a_clean_pass_is_spent_only_by_attacks_that_read_it(attack, clean_pass, batch):
    model, (x, y) = toy_cnn(), batch
    result = attack(model, x, y)
    n = x.shape[0]
    assert result.backward_passes == 7 * n
    assert result.forward_passes == (7 + clean_pass + 1) * n  # steps, clean?, success


def test_early_exit_spends_nothing_on_already_broken_samples(batch):
    model, (x, _) = toy_cnn(), batch
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 10  # every sample already misclassified
    result = PGD(ThreatModel("linf", 0.1), steps=40, random_start=False)(model, x, wrong)
    assert result.success.all()
    assert result.backward_passes == x.shape[0]  # one gradient pass finds them all broken
    assert result.forward_passes == 2 * x.shape[0]  # that pass and the success pass
    torch.testing.assert_close(result.x_adv, x)


def test_early_exit_does_not_change_success(batch):
    model, (x, y) = toy_cnn(), batch
    threat = ThreatModel("linf", 0.03)
    fast = PGD(threat, steps=20)(model, x, y)
    full = PGD(threat, steps=20, early_exit=False)(model, x, y)
    assert fast.backward_passes < full.backward_passes
    # A sample broken at some step stays broken in the early-exit run.
    assert fast.success.sum() >= full.success.sum() - 1


def test_restarts_never_lose_a_sample(batch):
    model, (x, y) = toy_cnn(), batch
    threat = ThreatModel("linf", 0.02)
    one = PGD(threat, steps=5, restarts=1)(model, x, y)
    three = PGD(threat, steps=5, restarts=3)(model, x, y)
    assert (three.success | ~one.success).all()


# --- entry checks ------------------------------------------------------------------------

@pytest.fixture
def pgd():
    return PGD(ThreatModel("linf", 0.1), steps=2)


def test_wrong_shape_is_refused(pgd, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        pgd(toy_cnn(), x[0], y[:1])


def test_nan_is_refused(pgd, batch):
    x, y = batch
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pgd(toy_cnn(), x, y)


def test_out_of_range_values_are_refused(pgd, batch):
    x, y = batch
    with pytest.raises(ValueError, match="outside the bounds"):
        pgd(toy_cnn(), x * 255, y)


def test_integer_images_are_refused(pgd, batch):
    x, y = batch
    with pytest.raises(TypeError, match="floating-point"):
        pgd(toy_cnn(), (x * 255).to(torch.uint8), y)


def test_bad_labels_are_refused(pgd, batch):
    x, y = batch
    model = toy_cnn()
    with pytest.raises(ValueError, match="must have shape"):
        pgd(model, x, y[:-1])
    with pytest.raises(ValueError, match=r"must be in \[0, 9\]"):
        pgd(model, x, y + 10)
    with pytest.raises(TypeError, match="integer class indices"):
        pgd(model, x, y.float())
    with pytest.raises(ValueError, match="targets equal their true labels"):
        pgd(model, x, y, targets=y)


# Attacks that never read the clean logits check their first pass's logits (at x or at a
# random start; no separate clean pass); the others check a clean forward pass. Both must
# refuse bad models and labels alike.
CHECKED = [FGSM(ThreatModel("linf", 0.1)), BIM(ThreatModel("linf", 0.1), steps=2),
           PGD(ThreatModel("linf", 0.1), steps=2, random_start=False),
           MIFGSM(ThreatModel("l2", 1.0), steps=2), PGD(ThreatModel("l2", 1.0), steps=2),
           ILLC(ThreatModel("linf", 0.1), steps=2)]


class _Broken(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out(toy_cnn()(x))


@pytest.mark.parametrize("attack", CHECKED, ids=lambda a: type(a).__name__)
def test_entry_checks_hold_for_every_first_pass(attack, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"must be in \[0, 9\]"):
        attack(toy_cnn(), x, y + 10)  # refused before any loss sees the bad labels
    with pytest.raises(ValueError, match="NaN or inf logits"):
        attack(_Broken(lambda z: z * float("nan")).eval(), x, y)
    with pytest.raises(ValueError, match=r"logits of shape \(N, classes\)"):
        attack(_Broken(lambda z: z[:, :, None]).eval(), x, y)


@pytest.mark.parametrize("attack", CHECKED, ids=lambda a: type(a).__name__)
def test_probability_warning_names_the_callers_line(attack, batch):
    x, y = batch
    model = nn.Sequential(toy_cnn(), nn.Softmax(dim=1)).eval()
    with pytest.warns(UserWarning, match="probabilities") as record:
        attack(model, x, y)
    assert record[0].filename == __file__


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="supports norms"):
        FGSM(ThreatModel("l1", 1.0))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        PGD(ThreatModel("linf", 0.1), steps=0)
    with pytest.raises(ValueError, match="finite eps"):
        PGD(ThreatModel("linf", float("inf")))
    with pytest.raises(ValueError, match="unknown loss"):
        PGD(ThreatModel("linf", 0.1), loss="hinge")
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.get("nonsense")
    with pytest.raises(TypeError, match="ThreatModel"):
        PGD(0.3)


def test_train_mode_model_is_attacked_in_eval_mode_and_restored(batch):
    x, y = batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 10))
    model.train()
    with pytest.warns(UserWarning, match="train mode"):
        trained_mode = FGSM(ThreatModel("linf", 0.1))(model, x, y)
    assert model.training and model[1].training
    expected = FGSM(ThreatModel("linf", 0.1))(model.eval(), x, y)
    assert torch.equal(trained_mode.x_adv, expected.x_adv)  # dropout was off during the attack


def test_probability_outputs_get_a_warning(batch):
    x, y = batch
    model = nn.Sequential(toy_cnn(), nn.Softmax(dim=1)).eval()
    with pytest.warns(UserWarning, match="probabilities"):
        FGSM(ThreatModel("linf", 0.1))(model, x, y)


def test_logits_are_not_mistaken_for_probabilities(batch):
    x, y = batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FGSM(ThreatModel("linf", 0.1))(toy_cnn(), x, y)


def test_registry_lists_every_attack_with_its_taxonomy():
    assert set(attacks.REGISTRY) >= {"fgsm", "bim", "illc", "pgd", "mifgsm"}
    for cls in attacks.REGISTRY.values():
        assert cls.paper and cls.taxonomy.knowledge in (
            "white box", "gray box", "black box (scores)", "black box (decisions)")
    assert attacks.REGISTRY["square"].taxonomy.knowledge == "black box (scores)"
    assert attacks.REGISTRY["pgd"].taxonomy.knowledge == "white box"
    assert FGSM.taxonomy.frequency == "one-time"
    assert ILLC.taxonomy.specificity == "targeted"
