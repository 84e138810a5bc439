"""Specification of certified training (advkit.training.certified): IBP (Gowal et al. 2018)
and CROWN-IBP (Zhang et al. 2020) losses against margins computed by hand, the papers'
schedules, the trainer's per-step hook, a real (seeded, short) run that makes a model
IBP-verifiable, recorded parameters, and clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

import advkit
from advkit.cli import app
from advkit.threat import ThreatModel
from advkit.training import (
    CROWNIBPTraining,
    IBPTraining,
    Recipe,
    TrainConfig,
    build_recipe,
    get_preset,
    resolve,
    train,
)
from advkit.training.certified import margin_lower_bounds
from advkit.training.trainer import split
from advkit.verify import certify
from advkit.verify.bounds import InputSet, interval_bounds, network


def tiny() -> nn.Module:
    """2 inputs -> 2 ReLUs -> 3 classes, weights chosen so the bounds are easy by hand:
    h1 = x1 + x2, h2 = x1 - x2 - 0.3, z = (h1, h2' + 0.2, -h1 + h2') with h2' = relu(h2)
    (z0 depends on h1 only)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, -0.3]))
        model[2].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]))
        model[2].bias.copy_(torch.tensor([0.0, 0.2, 0.0]))
    return model.train()


#: x = (0.5, 0.25) and Linf eps 0.1: x1 in [0.4, 0.6], x2 in [0.15, 0.35], so
#: h1 in [0.55, 0.95] (stable) and h2 in [-0.25, 0.15] (unstable: relu in [0, 0.15]).
X, Y = torch.tensor([[0.5, 0.25]]), torch.tensor([0])
#: IBP: z0 - z1 = h1 - h2' - 0.2 >= 0.55 - 0.15 - 0.2; z0 - z2 = 2 h1 - h2' >= 1.1 - 0.15.
IBP_MARGINS = [0.0, 0.2, 0.95]
#: CROWN-IBP: h2' <= 0.15 (h2 + 0.25) / 0.4 (the chord), a negative coefficient on h2' in
#: both margins; minimised over the box: z0 - z1 >= 0.625 x1 + 1.375 x2 + 0.01875 - 0.2
#: -> 0.275 and z0 - z2 >= 1.625 x1 + 2.375 x2 + 0.01875 -> 1.025.
CROWN_IBP_MARGINS = [0.0, 0.275, 1.025]


def expected(margins: list[float]) -> float:
    """CE on the worst-case logits -m for label 0, written out."""
    return -math.log(1.0 / sum(math.exp(-m) for m in margins))


def test_at_kappa_one_the_loss_is_plain_cross_entropy():
    torch.manual_seed(0)
    model, x, y = tiny(), torch.rand(8, 2), torch.randint(0, 3, (8,))
    recipe = IBPTraining(ThreatModel("linf", 0.3), kappa=1.0)
    recipe.start_step(0, 1)
    loss, logits = recipe.loss(model, x, y)
    assert torch.equal(logits, model(x))
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-7)


def test_at_eps_zero_the_verified_term_is_the_clean_cross_entropy():
    torch.manual_seed(0)
    model, x, y = tiny(), torch.rand(8, 2), torch.randint(0, 3, (8,))
    recipe = IBPTraining(ThreatModel("linf", 0.3), eps_train=0.0, kappa=0.0)
    recipe.start_step(0, 1)
    loss, _ = recipe.loss(model, x, y)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-6)


def test_ibp_margins_equal_the_hand_computed_ones():
    margins = margin_lower_bounds(tiny(), X, Y, ThreatModel("linf", 0.1))
    assert margins[0].tolist() == pytest.approx(IBP_MARGINS, abs=1e-6)


def test_crown_ibp_margins_equal_the_hand_computed_ones_and_beta_mixes_them():
    threat = ThreatModel("linf", 0.1)
    crown = margin_lower_bounds(tiny(), X, Y, threat, beta=1.0)
    assert crown[0].tolist() == pytest.approx(CROWN_IBP_MARGINS, abs=1e-6)
    half = margin_lower_bounds(tiny(), X, Y, threat, beta=0.5)
    mix = [(a + b) / 2 for a, b in zip(IBP_MARGINS, CROWN_IBP_MARGINS, strict=True)]
    assert half[0].tolist() == pytest.approx(mix, abs=1e-6)


def test_the_ibp_loss_is_cross_entropy_on_the_hand_computed_worst_case_logits():
    recipe = IBPTraining(ThreatModel("linf", 0.1), kappa=0.0)
    recipe.start_step(0, 1)
    loss, _ = recipe.loss(tiny(), X, Y)
    assert loss.item() == pytest.approx(expected(IBP_MARGINS), abs=1e-6)


def test_the_loss_mixes_clean_and_verified_terms_by_kappa():
    model = tiny()
    recipe = IBPTraining(ThreatModel("linf", 0.1), kappa=0.25)
    recipe.start_step(0, 1)
    loss, _ = recipe.loss(model, X, Y)
    clean = F.cross_entropy(model(X), Y).item()
    assert loss.item() == pytest.approx(0.25 * clean + 0.75 * expected(IBP_MARGINS), abs=1e-6)


def test_the_crown_ibp_loss_at_beta_one_uses_the_crown_ibp_margins():
    recipe = CROWNIBPTraining(ThreatModel("linf", 0.1), beta_start=1.0, beta_end=1.0)
    recipe.start_step(0, 1)
    loss, _ = recipe.loss(tiny(), X, Y)
    assert loss.item() == pytest.approx(expected(CROWN_IBP_MARGINS), abs=1e-6)


def test_gradients_of_the_bounds_reach_every_parameter_batch_norm_included():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 3)).eval()
    x, y = torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
    for beta in (0.0, 1.0):
        model.zero_grad()
        margins = margin_lower_bounds(model, x, y, ThreatModel("linf", 0.2), beta=beta)
        F.cross_entropy(-margins, y).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (beta, name)


def test_gradients_reach_spectrally_normalised_weights():
    torch.manual_seed(0)
    model = advkit.models.zoo.create("mlp", lipschitz=True, hidden=(8,))
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    margins = margin_lower_bounds(model, x, y, ThreatModel("linf", 0.05))
    F.cross_entropy(-margins, y).backward()
    originals = [p for n, p in model.named_parameters() if n.endswith("original")]
    assert originals and all(p.grad is not None and p.grad.abs().sum() > 0 for p in originals)


def test_the_network_read_keeps_the_graph_and_certify_runs_without_one():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 2)).eval()
    net = network(model, X)
    assert any(getattr(op, "scale", torch.zeros(())).requires_grad for op in net.ops)
    lower, upper = interval_bounds(net, InputSet.from_threat(X, ThreatModel("linf", 0.1)))[-1]
    assert lower.requires_grad
    cert = certify(model, X, Y % 2, ThreatModel("linf", 0.1), "crown")
    assert not cert.lower_bounds.requires_grad


def test_ibp_schedule_follows_gowal_warmup_then_linear_ramp():
    recipe = IBPTraining(ThreatModel("linf", 0.3), eps_train=0.4, kappa=0.5,
                         warmup_epochs=2, ramp_epochs=4)
    at = lambda step: recipe.schedule(step, steps_per_epoch=10)  # noqa: E731
    assert at(0) == {"eps": 0.0, "kappa": 1.0, "beta": 0.0}
    assert at(19) == {"eps": 0.0, "kappa": 1.0, "beta": 0.0}  # still warming up
    assert at(20)["eps"] == 0.0 and at(20)["kappa"] == 1.0  # the ramp starts at 0
    assert at(30)["eps"] == pytest.approx(0.1) and at(30)["kappa"] == pytest.approx(0.875)
    assert at(45)["eps"] == pytest.approx(0.25) and at(45)["kappa"] == pytest.approx(0.6875)
    assert at(60) == pytest.approx({"eps": 0.4, "kappa": 0.5, "beta": 0.0})
    assert at(10_000) == pytest.approx({"eps": 0.4, "kappa": 0.5, "beta": 0.0})


def test_crown_ibp_schedule_ramps_kappa_one_to_zero_and_beta_one_to_zero():
    recipe = CROWNIBPTraining(ThreatModel("linf", 0.3), eps_train=0.4, warmup_epochs=1,
                              ramp_epochs=2)
    at = lambda step: recipe.schedule(step, steps_per_epoch=100)  # noqa: E731
    assert at(50) == {"eps": 0.0, "kappa": 1.0, "beta": 1.0}
    assert at(150) == pytest.approx({"eps": 0.1, "kappa": 0.75, "beta": 0.75})
    assert at(200) == pytest.approx({"eps": 0.2, "kappa": 0.5, "beta": 0.5})
    assert at(250) == pytest.approx({"eps": 0.3, "kappa": 0.25, "beta": 0.25})
    assert at(300) == pytest.approx({"eps": 0.4, "kappa": 0.0, "beta": 0.0})


def test_no_ramp_jumps_to_the_final_values_after_the_warmup():
    recipe = IBPTraining(ThreatModel("linf", 0.1), kappa=0.5, warmup_epochs=1.5)
    assert recipe.schedule(14, 10)["eps"] == 0.0
    assert recipe.schedule(15, 10) == {"eps": 0.1, "kappa": 0.5, "beta": 0.0}


class Steps(Recipe):
    """Records the trainer's per-step calls."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        self.steps.append((step, steps_per_epoch))


def test_the_trainer_calls_start_step_before_every_batch_counting_over_epochs(tmp_path):
    recipe = Steps()
    config = TrainConfig(arch="mlp", epochs=2, batch_size=32, train_limit=64, val_limit=32,
                         arch_kwargs={"hidden": [8]})
    train(config, tmp_path, recipe=recipe, progress=False, log=lambda _: None)
    assert recipe.steps == [(0, 2), (1, 2), (2, 2), (3, 2)]


#: A short, seeded IBP run on 512 training images (Linf 0.05, kappa 0, eps ramped over the
#: first of 4 epochs), against the same run with standard training.
SHORT = TrainConfig(arch="mlp", epochs=4, batch_size=64, train_limit=512, val_limit=200,
                    lr=3e-3, schedule="constant", arch_kwargs={"hidden": [64]})


def test_a_short_ibp_run_makes_its_training_data_ibp_verifiable(tmp_path):
    threat = ThreatModel("linf", 0.05)
    x, y = advkit.data.load("mnist", "train", SHORT.train_limit)
    recipe = IBPTraining(threat, kappa=0.0, ramp_epochs=1, eval_batch=200)
    certified = train(TrainConfig(**{**SHORT.__dict__, "recipe": "ibp"}), tmp_path / "ibp",
                      recipe=recipe, progress=False, log=lambda _: None)
    plain = train(SHORT, tmp_path / "plain", progress=False, log=lambda _: None)
    verified = certify(certified.model, x, y, threat, "ibp").verified_accuracy
    baseline = certify(plain.model, x, y, threat, "ibp").verified_accuracy
    assert verified > 0.5 and verified > baseline + 0.3, (verified, baseline)
    # The held-out IBP-verified accuracy is in the history, measured at the test eps.
    assert certified.history[-1]["ibp_verified"] > 0.3
    assert "crown_verified" not in certified.history[-1]  # eval_crown is off by default


def test_the_recipe_params_are_recorded_and_a_resume_with_other_params_is_refused(tmp_path):
    config = TrainConfig(**{**SHORT.__dict__, "epochs": 1, "train_limit": 64,
                            "recipe": "crown_ibp"})
    recipe = CROWNIBPTraining(ThreatModel("linf", 0.1), eps_train=0.2, ramp_epochs=1,
                              eval_batch=16, eval_crown=True)
    result = train(config, tmp_path, recipe=recipe, progress=False, log=lambda _: None)
    recorded = advkit.models.read_metadata(result.checkpoint)["config"]["recipe_params"]
    assert recorded == recipe.params()
    assert recorded["eps_train"] == 0.2 and recorded["beta_start"] == 1.0
    assert 0 <= result.history[-1]["crown_verified"] <= 1
    other = CROWNIBPTraining(ThreatModel("linf", 0.1), eps_train=0.3, ramp_epochs=1,
                             eval_batch=16, eval_crown=True)
    with pytest.raises(ValueError, match="eps_train"):
        train(config, tmp_path, recipe=other, progress=False, log=lambda _: None)


@pytest.mark.parametrize(("preset", "defense", "eps", "eps_train"), [
    ("mnist", "ibp", 0.3, 0.4), ("mnist", "crown_ibp", 0.3, 0.4),
    ("mnist-0.1", "ibp", 0.1, 0.2), ("mnist-0.1", "crown_ibp", 0.1, 0.2)])
def test_the_presets_train_above_the_test_eps_as_the_papers_do(preset, defense, eps,
                                                                eps_train):
    fields, threat, options = split(resolve(defense, preset, {}))
    recipe = build_recipe(defense, threat, **options)
    assert get_preset(preset).eps == threat.eps == eps
    assert recipe.eps_train == eps_train
    assert recipe.kappa == (0.5 if defense == "ibp" else 0.0)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: IBPTraining(ThreatModel("linf", 0.1), eps_train=-0.1), "eps_train must be"),
    (lambda: IBPTraining(ThreatModel("linf", 0.1), kappa=1.5), r"kappa must lie in \[0, 1\]"),
    (lambda: IBPTraining(ThreatModel("linf", 0.1), kappa=-0.1), "got -0.1"),
    (lambda: IBPTraining(ThreatModel("linf", 0.1), warmup_epochs=-1), "warmup_epochs"),
    (lambda: CROWNIBPTraining(ThreatModel("linf", 0.1), beta_start=2), "beta_start"),
    (lambda: IBPTraining(ThreatModel("linf", math.inf)), "finite eps"),
    (lambda: build_recipe("ibp", ThreatModel("linf", 0.1), kappa=2.0), "kappa"),
    (lambda: build_recipe("crown_ibp", ThreatModel("linf", 0.1), beta=0.5), "no option beta"),
])
def test_bad_settings_are_refused_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_model_bounds_cannot_read_is_refused_with_the_layer_named():
    class Own(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x

    recipe = IBPTraining(ThreatModel("linf", 0.1), kappa=0.0)
    recipe.start_step(0, 1)
    with pytest.raises(ValueError, match="nn.Sequential"):
        recipe.loss(Own(), X, Y)


def test_cli_trains_ibp_from_the_mnist_01_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVKIT_MODEL_DIR", str(tmp_path / "models"))
    result = CliRunner().invoke(app, [
        "train", "--defense", "ibp", "--preset", "mnist-0.1", "--epochs", "1",
        "--train-limit", "256", "--no-card", "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    config = advkit.models.read_metadata(summary["checkpoint"])["config"]
    assert config["recipe"] == "ibp" and config["arch"] == "stride_cnn"
    assert config["recipe_params"]["eps"] == 0.1 and config["recipe_params"]["eps_train"] == 0.2
    assert 0 <= summary["history"][0]["ibp_verified"] <= 1
