"""The Carlini-Wagner attacks: closed forms, the minimal-norm contract, figures on MNIST."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import toy_cnn

from advkit import ThreatModel
from advkit.attacks import FGSM, DeepFool
from advkit.attacks._const_search import estimate_const
from advkit.attacks.carlini_wagner import CarliniWagnerL2, CarliniWagnerLinf
from advkit.models.access import Oracle

INF = float("inf")
#: Short runs for the small models: the contract does not depend on the budget.
QUICK = {CarliniWagnerL2: {"steps": 30, "search_steps": 5, "initial_const": 1e-2,
                           "learning_rate": 0.1},
         CarliniWagnerLinf: {"steps": 10, "initial_const": 1e-2, "largest_const": 5.0,
                             "learning_rate": 0.05}}
NORM = {CarliniWagnerL2: "l2", CarliniWagnerLinf: "linf"}
CLASSES = list(QUICK)


def make(cls, eps: float = INF, **kw):
    return cls(ThreatModel(NORM[cls], eps), **{**QUICK[cls], **kw})


@pytest.fixture(scope="module")
def batch():
    """16 images the small CNN classifies as their labels (so every one needs a perturbation)."""
    model = toy_cnn()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, x, model(x).argmax(1)


@pytest.fixture(scope="module")
def runs(batch):
    """One untargeted run of each attack on the batch, shared by the contract tests."""
    model, x, y = batch
    return {cls: make(cls)(model, x, y) for cls in CLASSES}


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Best other logit minus the true one (positive = misclassified), fresh pass."""
    with torch.no_grad():
        logits = model(x)
    own = logits.gather(1, y[:, None]).squeeze(1)
    return logits.scatter(1, y[:, None], -INF).amax(1) - own


# --- closed forms ------------------------------------------------------------------------

def binary_linear(d: int = 16) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2-class linear model, images at the centre of the box, and the true class of each."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2)).eval()
    x = 0.5 + 0.05 * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, model[1].weight[1] - model[1].weight[0]


def test_cw_l2_on_a_linear_model_approaches_the_closed_form_distance_from_above():
    """For f = a.x + b the smallest L2 step to the boundary is |a.x + b| / ||a||_2."""
    model, x, y, a = binary_linear()
    with torch.no_grad():
        exact = margins(model, x, y).abs() / a.norm()
    result = CarliniWagnerL2(ThreatModel("l2", INF), steps=200)(model, x, y)
    assert result.success.all()
    assert (result.norms >= exact * (1 - 1e-4)).all()
    assert (result.norms <= exact * 1.03).all()


def test_cw_linf_on_a_linear_model_lands_within_the_tau_factor_of_the_closed_form():
    """The smallest Linf step is |a.x + b| / ||a||_1; tau shrinks by 0.9 per success."""
    model, x, y, a = binary_linear()
    with torch.no_grad():
        exact = margins(model, x, y).abs() / a.abs().sum()
    result = CarliniWagnerLinf(ThreatModel("linf", INF), steps=30, learning_rate=0.05,
                               abort_early=False)(model, x, y)
    assert result.success.all()
    assert (result.norms >= exact * (1 - 1e-4)).all()
    assert (result.norms <= exact / 0.9 * 1.01).all()


# --- the minimal-norm contract -----------------------------------------------------------

@pytest.mark.parametrize("cls", CLASSES)
def test_success_flags_agree_with_a_fresh_forward_pass(cls, batch, runs):
    model, x, y = batch
    result = runs[cls]
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred != y)
    assert result.success.float().mean() >= 0.9


@pytest.mark.parametrize("cls", CLASSES)
def test_outputs_stay_in_the_box_and_norms_are_measured_on_them(cls, batch, runs):
    _, x, _ = batch
    result = runs[cls]
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    measured = ThreatModel(NORM[cls], INF).norms(result.x_adv - x)
    torch.testing.assert_close(result.norms[result.success], measured[result.success])
    assert torch.isinf(result.norms[~result.success]).all()
    assert torch.equal(result.x_adv[~result.success], x[~result.success])


@pytest.mark.parametrize("cls", CLASSES)
def test_same_configuration_same_result(cls, batch, runs):
    model, x, y = batch
    again = make(cls)(model, x, y)
    assert torch.equal(again.x_adv, runs[cls].x_adv)


@pytest.mark.parametrize("cls", CLASSES)
def test_the_eps_cap_keeps_exactly_the_examples_within_it(cls, batch, runs):
    model, x, y = batch
    free = runs[cls]
    cap = free.norms[free.success].median().item()
    capped = make(cls, eps=cap)(model, x, y)
    assert torch.equal(capped.success, free.success & (free.norms <= cap))
    assert (capped.norms[capped.success] <= cap).all()
    # Over-cap examples are not handed out: those images come back unchanged.
    assert torch.equal(capped.x_adv[~capped.success], x[~capped.success])


@pytest.mark.parametrize("cls", CLASSES)
def test_the_robust_accuracy_curve_falls_with_eps(cls, runs):
    result = runs[cls]
    eps = sorted(result.norms[result.success].tolist())
    curve = [acc for _, acc in result.curve([0.0, *eps, INF])]
    assert curve == sorted(curve, reverse=True)
    assert curve[0] == 1.0 and curve[-1] == pytest.approx(1 - result.success_rate)


@pytest.mark.parametrize("cls", CLASSES)
def test_already_misclassified_images_are_returned_at_no_cost(cls, batch):
    model, x, y = batch
    wrong = (y + 1) % 10
    result = make(cls)(model, x, wrong)
    assert result.success.all() and (result.norms == 0).all()
    assert result.backward_passes == 0
    assert torch.equal(result.x_adv, x)


@pytest.mark.parametrize("cls", CLASSES)
def test_targeted_attacks_reach_their_targets(cls, batch):
    model, x, y = batch
    targets = (y + 3) % 10
    result = make(cls)(model, x, y, targets)
    assert result.success.float().mean() >= 0.9
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred == targets)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_larger_confidence_buys_a_margin_of_at_least_kappa_with_a_larger_norm(cls, batch,
                                                                                runs):
    model, x, y = batch
    kappa = 0.1  # the small models' logits are about 0.1 apart
    strong = make(cls, confidence=kappa)(model, x, y)
    both = strong.success & runs[cls].success
    assert strong.success.float().mean() >= 0.9
    assert (margins(model, strong.x_adv, y)[strong.success] >= kappa - 1e-4).all()
    assert (strong.norms[both] > runs[cls].norms[both]).all()


def test_cw_l2_spends_one_gradient_per_image_per_step(batch):
    """The paper's search (fixed first c, every search step run): steps x search_steps."""
    model, x, y = batch
    result = CarliniWagnerL2(ThreatModel("l2", INF), steps=7, search_steps=3, initial_const=1e-2,
                             search_tolerance=0.0, abort_early=False)(model, x, y)
    n = x.shape[0]
    assert result.backward_passes == 7 * 3 * n
    assert result.forward_passes == result.backward_passes + 2 * n  # entry + success check


def test_the_estimated_first_c_is_twice_the_linearised_threshold_on_a_linear_model():
    """For a linear margin m + g.d, c = 2 m / ||g||^2 puts the minimiser on the boundary."""
    model, x, y, a = binary_linear()
    counted = Oracle(model, x.shape[0])
    with torch.no_grad():
        m = -margins(model, x, y)  # own logit minus the other: the margin the attack removes
    const = estimate_const(counted, x, y, None, kappa=0.0)
    torch.testing.assert_close(const, 2 * 2 * m / a.pow(2).sum(), rtol=1e-4, atol=0)
    assert counted.backward_passes == x.shape[0]  # one gradient pass per image
    with_kappa = estimate_const(counted, x, y, None, kappa=0.5)
    torch.testing.assert_close(with_kappa, 2 * 2 * (m + 0.5) / a.pow(2).sum(), rtol=1e-4,
                               atol=0)


def test_by_default_one_run_per_image_after_the_estimate_when_it_succeeds():
    """Every first run succeeds on a linear model, so the search stops there."""
    model, x, y, _ = binary_linear()
    result = CarliniWagnerL2(ThreatModel("l2", INF), steps=20, abort_early=False)(model, x, y)
    n = x.shape[0]
    assert result.success.all()
    assert result.backward_passes == n + 20 * n  # the estimate, then one run of 20 steps


@pytest.mark.parametrize(("tolerance", "runs"), [(1.0, 1), (0.0, 4)])
def test_the_search_tolerance_decides_how_many_values_of_c_a_broken_sample_tries(
        batch, tolerance, runs):
    """A first c large enough for every sample: 1 stops there, 0 bisects every step."""
    model, x, y = batch
    result = CarliniWagnerL2(ThreatModel("l2", INF), steps=10, search_steps=4,
                             initial_const=100.0, search_tolerance=tolerance,
                             learning_rate=0.1, abort_early=False)(model, x, y)
    assert result.success.all()
    assert result.backward_passes == runs * 10 * x.shape[0]


def test_samples_whose_first_c_is_too_small_keep_searching_until_they_succeed(batch):
    model, x, y = batch
    once = make(CarliniWagnerL2, initial_const=1e-6, search_steps=1)(model, x, y)
    searched = make(CarliniWagnerL2, initial_const=1e-6, search_steps=8)(model, x, y)
    assert once.success.float().mean() <= 0.1  # c = 1e-6 is far too small here
    assert searched.success.float().mean() >= 0.9  # c grew tenfold per failed run


def test_early_abort_saves_passes_without_losing_samples(batch, runs):
    model, x, y = batch
    full = make(CarliniWagnerL2, abort_early=False)(model, x, y)
    assert runs[CarliniWagnerL2].backward_passes < full.backward_passes
    assert runs[CarliniWagnerL2].success.sum() >= full.success.sum() - 1


def test_the_minimal_norm_taxonomy_is_declared():
    for cls in CLASSES:
        assert cls.kind == "minimal" and cls.taxonomy.perturbation == "optimized"
        assert cls.norms == (NORM[cls],)
    with pytest.raises(ValueError, match="supports norms"):
        CarliniWagnerL2(ThreatModel("linf", 0.1))
    with pytest.raises(ValueError, match="supports norms"):
        CarliniWagnerLinf(ThreatModel("l2", 1.0))


# --- bad configurations ------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"confidence": -1.0}, "confidence"),
    ({"steps": 0}, "steps must be"),
    ({"steps": 2.5}, "steps must be"),
    ({"search_steps": 0}, "search_steps must be"),
    ({"initial_const": 0.0}, "initial_const must be"),
    ({"learning_rate": -0.1}, "learning_rate must be"),
    ({"search_tolerance": -0.1}, "search_tolerance must be"),
    ({"search_tolerance": 1.5}, "search_tolerance must be"),
])
def test_cw_l2_refuses_bad_configurations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CarliniWagnerL2(ThreatModel("l2", INF), **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"confidence": -0.5}, "confidence"),
    ({"steps": 0}, "steps must be"),
    ({"decrease_factor": 1.0}, "decrease_factor must be"),
    ({"const_factor": 1.0}, "const_factor must be"),
    ({"initial_const": 50.0}, "initial_const must be"),
])
def test_cw_linf_refuses_bad_configurations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CarliniWagnerLinf(ThreatModel("linf", INF), **kwargs)


# --- the real MNIST CNN ------------------------------------------------------------------

MNIST_N = 100
MNIST_CW = {"steps": 50, "search_steps": 5}


@pytest.fixture(scope="module")
def mnist_slice(mnist_test):
    x, y = mnist_test
    return x[:MNIST_N], y[:MNIST_N]


@pytest.fixture(scope="module")
def mnist_cw_l2(mnist_model, mnist_slice):
    x, y = mnist_slice
    return CarliniWagnerL2(ThreatModel("l2", INF), **MNIST_CW)(mnist_model, x, y)


def test_cw_l2_breaks_99_percent_of_mnist_with_a_median_l2_below_2(mnist_cw_l2):
    # 100% with a median of 1.61-1.75 over the 7 retrainings (conftest)
    assert mnist_cw_l2.success_rate >= 0.99
    assert mnist_cw_l2.summary()["median_norm"] < 2.0


def test_cw_l2_finds_a_smaller_median_l2_than_deepfool_on_mnist(mnist_model, mnist_slice):
    """Both attacks with their defaults (C&W: 100 Adam steps at an estimated c; DeepFool: 50
    steps, overshoot 0.02) on the first 100 test images. On 100 images C&W's median is 10%
    below DeepFool's (1.61 vs 1.78; 1.60 vs 1.77 on 200), so the comparison stands well
    outside the spread of a median over 100 images, and C&W's ~100 gradient passes per image
    keep the test to a few seconds. Over the 7 retrainings (conftest) C&W's median was
    5.6-11% below DeepFool's, and both broke every image."""
    x, y = mnist_slice
    cw = CarliniWagnerL2(ThreatModel("l2", INF))(mnist_model, x, y)
    deepfool = DeepFool(ThreatModel("l2", INF))(mnist_model, x, y)
    assert cw.success.all() and deepfool.success.all()
    assert cw.norms.median() <= deepfool.norms.median()


def test_cw_l2_needs_less_than_the_smallest_fgsm_step_that_works(mnist_model, mnist_slice,
                                                                 mnist_cw_l2):
    """Per image, the smallest eps on a grid at which the L2 fast gradient method succeeds."""
    x, y = mnist_slice
    fgsm_min = torch.full((len(y),), INF)
    for eps in reversed([0.5 * k for k in range(1, 17)]):
        hit = FGSM(ThreatModel("l2", eps))(mnist_model, x, y).success
        fgsm_min = torch.where(hit, torch.full_like(fgsm_min, eps), fgsm_min)
    # 0.64-0.70 of it over the 7 retrainings (conftest)
    assert mnist_cw_l2.norms.median() < 0.8 * fgsm_min.median()


def test_cw_linf_finds_smaller_linf_norms_than_cw_l2(mnist_model, mnist_slice, mnist_cw_l2):
    x, y = mnist_slice[0][:12], mnist_slice[1][:12]
    linf = CarliniWagnerLinf(ThreatModel("linf", INF), steps=50, initial_const=1e-3)(
        mnist_model, x, y)
    l2_linf = (mnist_cw_l2.x_adv[:12] - x).flatten(1).abs().amax(1)
    both = linf.success & mnist_cw_l2.success[:12]
    # 100% and 0.35-0.43 of the L2 attack's Linf over the 7 retrainings (conftest)
    assert linf.success.float().mean() >= 0.95
    assert linf.norms[both].mean() < 0.8 * l2_linf[both].mean()


def test_cw_l2_reaches_targets_on_mnist(mnist_model, mnist_slice):
    x, y = mnist_slice[0][:20], mnist_slice[1][:20]
    targets = (y + 1) % 10
    result = CarliniWagnerL2(ThreatModel("l2", INF), **MNIST_CW)(mnist_model, x, y, targets)
    assert result.success.all()
    with torch.no_grad():
        assert torch.equal(mnist_model(result.x_adv).argmax(1), targets)


def test_cw_l2_with_kappa_on_mnist_gives_the_margin_at_a_larger_norm(mnist_model, mnist_slice,
                                                                      mnist_cw_l2):
    x, y = mnist_slice[0][:20], mnist_slice[1][:20]
    kappa = 5.0
    strong = CarliniWagnerL2(ThreatModel("l2", INF), confidence=kappa, **MNIST_CW)(
        mnist_model, x, y)
    assert strong.success.all()
    assert (margins(mnist_model, strong.x_adv, y) >= kappa - 1e-3).all()
    weak = mnist_cw_l2.norms[:20]
    assert strong.norms.median() > weak.median()  # 2.28-2.79 vs 1.55-1.81 (7 retrainings)


def test_the_per_image_early_abort_keeps_the_papers_search_as_good_as_no_abort(mnist_model,
                                                                              mnist_test):
    """The paper's search (c from 1e-3, 9 search steps of 100 Adam steps) on the first 50
    test images, with and without early abort. A run that has succeeded needs three stalled
    checks in a row to stop: with one (the authors' rule applied per image) the mean L2 on
    the test model was 0.28% above the no-abort run's (1.5889 vs 1.5845, measured), with
    three 0.00% (1.5845), for 21% fewer gradient passes. Over the 7 retrainings (conftest):
    0.000-0.006% above, for 78.5-80% of the passes."""
    x, y = mnist_test
    x, y = x[:50], y[:50]
    paper = {"initial_const": 1e-3, "search_tolerance": 0.0}
    aborted = CarliniWagnerL2(ThreatModel("l2", INF), **paper)(mnist_model, x, y)
    full = CarliniWagnerL2(ThreatModel("l2", INF), abort_early=False, **paper)(mnist_model, x, y)
    assert aborted.success.all() and full.success.all()
    assert aborted.backward_passes < 0.85 * full.backward_passes
    assert aborted.norms.mean() <= 1.001 * full.norms.mean()
