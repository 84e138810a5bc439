"""EAD: the shrinkage operator, the decision rules, the minimal-norm contract, MNIST sparsity."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import toy_cnn

from advkit import ThreatModel
from advkit.attacks.carlini_wagner import CarliniWagnerL2
from advkit.attacks.ead import EAD, _shrink

INF = float("inf")
QUICK = {"steps": 30, "search_steps": 5, "initial_const": 1.0}


@pytest.fixture(scope="module")
def batch():
    """16 images the small CNN classifies as their labels (so every one needs a perturbation)."""
    model = toy_cnn()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, x, model(x).argmax(1)


@pytest.fixture(scope="module")
def run(batch):
    model, x, y = batch
    return EAD(ThreatModel("l1", INF), **QUICK)(model, x, y)


def elastic_net(delta: torch.Tensor, beta: float) -> torch.Tensor:
    flat = delta.flatten(1)
    return beta * flat.abs().sum(1) + flat.pow(2).sum(1)


# --- the operator and the decision rules -------------------------------------------------

def test_shrinkage_snaps_small_moves_back_and_shortens_the_others_inside_the_box():
    x = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.95, 0.02])
    z = torch.tensor([0.55, 0.45, 0.7, 0.2, 1.3, -0.4])
    out = _shrink(z, x, 0.1, (0.0, 1.0))
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5, 0.6, 0.3, 1.0, 0.0]))


def test_each_decision_rule_picks_the_smallest_example_by_its_own_measure(batch):
    """With the same step (each rule's default differs, see below), the rule does not steer
    the optimisation, so both runs see the same iterates."""
    model, x, y = batch
    beta = 0.05
    same = {"beta": beta, "shrink_only_when_adversarial": False, **QUICK}
    l1 = EAD(ThreatModel("l1", INF), decision_rule="l1", **same)(model, x, y)
    en = EAD(ThreatModel("l1", INF), decision_rule="en", **same)(model, x, y)
    assert torch.equal(l1.success, en.success)
    ok = l1.success
    assert (l1.norms[ok] <= en.norms[ok] + 1e-6).all()
    assert (elastic_net(en.x_adv - x, beta)[ok] <= elastic_net(l1.x_adv - x, beta)[ok] + 1e-6).all()
    assert (l1.norms[ok] < en.norms[ok]).any()


def test_a_larger_beta_gives_sparser_perturbations(batch):
    model, x, y = batch
    light = EAD(ThreatModel("l1", INF), beta=1e-3, **QUICK)(model, x, y)
    heavy = EAD(ThreatModel("l1", INF), beta=5e-2, **QUICK)(model, x, y)
    both = light.success & heavy.success
    assert both.float().mean() >= 0.9
    unchanged = lambda r: ((r.x_adv - x).flatten(1) == 0).sum(1)  # noqa: E731
    assert unchanged(heavy)[both].sum() > 1.5 * unchanged(light)[both].sum()


def test_without_the_l1_term_ead_approaches_the_closed_form_l2_distance():
    """beta = 0 leaves C&W's objective; on f = a.x + b the minimum is |a.x + b| / ||a||_2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    x = 0.5 + 0.05 * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    exact = (logits[:, 0] - logits[:, 1]).abs() / (model[1].weight[1] - model[1].weight[0]).norm()
    result = EAD(ThreatModel("l1", INF), beta=0.0, decision_rule="en", steps=200)(model, x, y)
    l2 = (result.x_adv - x).flatten(1).norm(dim=1)
    assert result.success.all()
    assert (l2 >= exact * (1 - 1e-4)).all() and (l2 <= exact * 1.03).all()


# --- the minimal-norm contract -----------------------------------------------------------

def test_success_flags_agree_with_a_fresh_forward_pass(batch, run):
    model, x, y = batch
    with torch.no_grad():
        pred = model(run.x_adv).argmax(1)
    assert torch.equal(run.success, pred != y)
    assert run.success.float().mean() >= 0.9


def test_outputs_stay_in_the_box_and_norms_are_l1(batch, run):
    _, x, _ = batch
    assert run.x_adv.min() >= 0 and run.x_adv.max() <= 1
    l1 = (run.x_adv - x).flatten(1).abs().sum(1)
    torch.testing.assert_close(run.norms[run.success], l1[run.success])
    assert torch.equal(run.x_adv[~run.success], x[~run.success])


def test_same_configuration_same_result(batch, run):
    model, x, y = batch
    assert torch.equal(EAD(ThreatModel("l1", INF), **QUICK)(model, x, y).x_adv, run.x_adv)


def test_the_eps_cap_keeps_exactly_the_examples_within_it(batch, run):
    model, x, y = batch
    cap = run.norms[run.success].median().item()
    capped = EAD(ThreatModel("l1", cap), **QUICK)(model, x, y)
    assert torch.equal(capped.success, run.success & (run.norms <= cap))
    assert torch.equal(capped.x_adv[~capped.success], x[~capped.success])
    curve = [acc for _, acc in run.curve([0.0, cap / 2, cap, 2 * cap, INF])]
    assert curve == sorted(curve, reverse=True)
    assert curve[2] == pytest.approx(1 - capped.success_rate)


def test_targeted_ead_reaches_its_targets(batch):
    model, x, y = batch
    targets = (y + 3) % 10
    result = EAD(ThreatModel("l1", INF), **QUICK)(model, x, y, targets)
    assert result.success.float().mean() >= 0.9
    with torch.no_grad():
        assert torch.equal(result.success, model(result.x_adv).argmax(1) == targets)


def test_confidence_buys_a_margin_of_at_least_kappa(batch, run):
    model, x, y = batch
    kappa = 0.1  # the small models' logits are about 0.1 apart
    strong = EAD(ThreatModel("l1", INF), confidence=kappa, **QUICK)(model, x, y)
    with torch.no_grad():
        logits = model(strong.x_adv)
    own = logits.gather(1, y[:, None]).squeeze(1)
    margin = logits.scatter(1, y[:, None], -INF).amax(1) - own
    both = strong.success & run.success
    assert strong.success.float().mean() >= 0.9
    assert (margin[strong.success] >= kappa - 1e-4).all()
    assert (strong.norms[both] > run.norms[both]).all()


@pytest.mark.parametrize("fista", [True, False])
def test_passes_are_counted_and_fista_costs_one_forward_per_step(batch, fista):
    model, x, y = batch
    n, steps, search = x.shape[0], 6, 2
    result = EAD(ThreatModel("l1", INF), steps=steps, search_steps=search, fista=fista,
                 abort_early=False, initial_const=1e-3, search_tolerance=0.0)(model, x, y)
    assert result.backward_passes == steps * search * n
    judging = (steps - 1 if fista else 0) + 1  # extra forwards per run: iterates + the last
    assert result.forward_passes == result.backward_passes + judging * search * n + 2 * n


def test_ista_without_acceleration_also_finds_examples(batch):
    model, x, y = batch
    result = EAD(ThreatModel("l1", INF), fista=False, **QUICK)(model, x, y)
    assert result.success.float().mean() >= 0.9


def test_already_misclassified_images_are_returned_at_no_cost(batch):
    model, x, y = batch
    result = EAD(ThreatModel("l1", INF), **QUICK)(model, x, (y + 1) % 10)
    assert result.success.all() and (result.norms == 0).all()
    assert result.backward_passes == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"beta": -1e-3}, "beta must be"),
    ({"decision_rule": "l2"}, "unknown decision_rule"),
    ({"confidence": -1.0}, "confidence"),
    ({"steps": 0}, "steps must be"),
    ({"search_steps": 0}, "search_steps must be"),
    ({"learning_rate": 0.0}, "learning_rate must be"),
    ({"search_tolerance": 2.0}, "search_tolerance must be"),
    ({"initial_const": 0.0}, "initial_const must be"),
])
def test_bad_configurations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EAD(ThreatModel("l1", INF), **kwargs)


def test_ead_reports_l1_and_is_a_minimal_norm_attack():
    assert EAD.kind == "minimal" and EAD.norms == ("l1",)
    assert EAD.taxonomy.perturbation == "optimized"
    with pytest.raises(ValueError, match="supports norms"):
        EAD(ThreatModel("l2", 1.0))


# --- the real MNIST CNN ------------------------------------------------------------------

def test_ead_is_sparser_than_cw_l2_on_mnist(mnist_model, mnist_test):
    x, y = mnist_test[0][:50], mnist_test[1][:50]
    config = {"steps": 50, "search_steps": 5}
    ead = EAD(ThreatModel("l1", INF), **config)(mnist_model, x, y)
    cw = CarliniWagnerL2(ThreatModel("l2", INF), **config)(mnist_model, x, y)
    both = ead.success & cw.success
    # Over the 7 retrainings (conftest): EAD broke 100%, its median L1 0.62-0.71 of C&W's,
    # and it left 2.8-3.1 times as many pixels untouched.
    assert ead.success.float().mean() >= 0.98
    d_ead, d_cw = (ead.x_adv - x).flatten(1), (cw.x_adv - x).flatten(1)
    assert d_ead.abs().sum(1)[both].median() < d_cw.abs().sum(1)[both].median()
    assert (d_ead == 0).sum(1)[both].float().mean() > 2 * (d_cw == 0).sum(1)[both].float().mean()


@pytest.fixture(scope="module")
def abort_runs(mnist_model, mnist_test):
    """EAD on the first 50 test images with the paper's search over c: the shrinkage
    step alone once adversarial (the L1 rule's default) and the paper's pull towards x
    (``shrink_only_when_adversarial=False``), each with and without abort; and the
    defaults (the shrink-only step, c estimated, one run unless it fails)."""
    x, y = mnist_test[0][:50], mnist_test[1][:50]
    paper = {"initial_const": 1e-3, "search_tolerance": 0.0}
    runs = {"default": EAD(ThreatModel("l1", INF))(mnist_model, x, y)}
    for shrink, abort in ((True, True), (True, False), (False, True)):
        runs[shrink, abort] = EAD(ThreatModel("l1", INF), abort_early=abort,
                                  shrink_only_when_adversarial=shrink,
                                  **paper)(mnist_model, x, y)
    assert all(r.success.all() for r in runs.values())
    return runs


def test_one_run_from_the_estimated_c_is_as_good_as_the_papers_search(abort_runs):
    """Shrinking alone, the result hardly depends on c once a run has succeeded: the
    default search (c from the linearised model, stop at the first success) matches the
    paper's nine runs for a fraction of the passes. Measured on the test model: median L1
    10.45 against 10.27, mean 10.88 against 11.07, 21% of the gradient passes. Over the 7
    retrainings (conftest) the mean is the steady figure, 0.976-0.990 of the paper's; the
    median of 50 norms moves more, 0.91-1.05 of the paper's (1.046 would have broken the
    1.03 bound it had), and the passes were 21-22%."""
    default, paper = abort_runs["default"], abort_runs[True, True]
    assert default.norms.mean() <= 1.01 * paper.norms.mean()
    assert default.norms.median() <= 1.10 * paper.norms.median()
    assert default.backward_passes < 0.5 * paper.backward_passes


def test_shrinking_alone_once_adversarial_finds_smaller_l1(abort_runs):
    """Under the L1 decision rule, an adversarial iterate takes the shrinkage step alone
    (as ART's EAD does) instead of also the L2 term's proportional pull towards x, so it
    sheds whole coordinates rather than shortening all of them. Measured on the test model:
    median L1 10.27 against 12.17 (16% smaller; 11.94 for the pull without abort). Over the
    7 retrainings (conftest) the ratio of the medians ranged 0.79-0.90, too close to the
    0.92 bound it had; the ratio of the means, 0.81-0.85, is the steadier figure."""
    assert abort_runs[True, True].norms.mean() <= 0.9 * abort_runs[False, True].norms.mean()


def test_the_defaults_are_the_papers_for_the_elastic_net_rule():
    l1, en = EAD(ThreatModel("l1", INF)), EAD(ThreatModel("l1", INF), decision_rule="en")
    assert l1.shrink_only_when_adversarial and not en.shrink_only_when_adversarial
    assert (l1.initial_const, l1.search_tolerance) == (None, 1.0)
    assert (en.initial_const, en.search_tolerance) == (1e-3, 0.0)


def test_the_per_image_early_abort_stays_at_the_no_abort_median(abort_runs):
    """FISTA's loss is not monotone, so the paper's abort applied per image (stop at the
    first check whose loss is not below 0.9999 of an earlier one) ended runs that had
    succeeded and were still shrinking: with the paper's pull, median L1 9.1% above the
    no-abort run's on the test model (13.02 vs 11.94, measured); with three stalled checks
    in a row needed once a run has succeeded (the rule C&W L2 shares, tested there), 2.0%
    (12.17). Shrinking alone, the loss stops measuring progress once adversarial, so a run
    that has succeeded watches its best L1 instead: the same median as without abort
    (10.27), for 56% of the gradient passes. Over the 7 retrainings (conftest): the same
    median each time, for 55-56% of the passes."""
    aborted, full = abort_runs[True, True], abort_runs[True, False]
    assert aborted.backward_passes < 0.6 * full.backward_passes
    assert aborted.norms.median() <= 1.01 * full.norms.median()
