"""Training recipes: each adversarial recipe buys robustness that standard training lacks;
distillation only masks gradients; the recipes refuse bad settings."""

from __future__ import annotations

import copy

import pytest
import torch

from advkit import ThreatModel, data, evaluate
from advkit.attacks import PGD
from advkit.evaluation import Stage, Suite, accuracy
from advkit.models import create, load
from advkit.training import (
    MART,
    TRADES,
    Distillation,
    FastAdversarialTraining,
    GaussianAugmentation,
    PGDTraining,
    Recipe,
    StopTraining,
    TemperatureTraining,
    TrainConfig,
    train,
)

THREAT = ThreatModel("linf", 0.2)
BASE = {"arch": "small_cnn", "epochs": 2, "train_limit": 3000, "val_limit": 300, "lr": 2e-3}


def fit(tmp_path_factory, recipe: Recipe, **overrides):
    config = TrainConfig(recipe=recipe.name, **{**BASE, **overrides})
    out = tmp_path_factory.mktemp(recipe.name)
    return train(config, out, recipe=recipe, progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def heldout():
    return data.load("mnist", split="test", limit=300)


def robust(model, heldout, loss="ce"):
    x, y = heldout
    return PGD(THREAT, steps=20, loss=loss)(model, x, y).robust_accuracy


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    return fit(tmp_path_factory, Recipe()).model


@pytest.mark.parametrize(("recipe", "epochs"), [
    (PGDTraining(THREAT, steps=5), 2), (FastAdversarialTraining(THREAT), 2),
    (TRADES(THREAT, steps=5), 2),
    # MART learns slower: after 2 epochs it gained exactly 20.0% with one torch thread
    (MART(THREAT, steps=5), 3)], ids=["pgd", "fgsm_rs", "trades", "mart"])
# Gains over training seeds 0-3 (seed 0 also with 2 threads; measured at 6dc894d): PGD
# 0.30-0.37, FGSM-RS 0.32-0.33, TRADES 0.42-0.48, MART (3 epochs) 0.41-0.48.
def test_adversarial_recipes_beat_standard_training_under_pgd(recipe, epochs, standard, heldout,
                                                              tmp_path_factory):
    result = fit(tmp_path_factory, recipe, epochs=epochs)
    gained = robust(result.model, heldout) - robust(standard, heldout)
    assert gained >= 0.2, f"{recipe.name} gained only {gained:.1%} robust accuracy"
    assert "robust_acc" in result.history[-1]  # measured every epoch


def test_distillation_masks_gradients_and_a_margin_attack_sees_through_it(
        standard, heldout, tmp_path_factory):
    # A short run: lr 5e-3 lets the teacher's logits grow to the temperature's scale.
    teacher = fit(tmp_path_factory, TemperatureTraining(50.0), lr=5e-3).model
    student = fit(tmp_path_factory, Distillation(teacher, 50.0), lr=5e-3).model
    x, y = heldout
    # Over training seeds 0-3 (seed 0 also with 2 threads): student accuracy 0.81-0.83,
    # zero gradients on 44-55% of the images, PGD-CE 0.46-0.52 above the standard model's
    # robust accuracy and 0.48-0.53 above PGD-margin's; the gradients check failed each time.
    assert accuracy(student, x, y) >= 0.75
    # The mechanism: at T = 1 the softmax saturates in float32 and input gradients of the
    # cross-entropy are exactly zero on many images.
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(student(xg), y, reduction="sum"), xg)
    assert (grad.flatten(1).abs().amax(dim=1) == 0).float().mean() >= 0.3
    # Softmax saturates at T = 1: cross-entropy gradients vanish, so PGD-CE looks weak...
    masked = robust(student, heldout, "ce")
    assert masked >= robust(standard, heldout) + 0.2
    # ...while the logit margin still has a gradient and breaks the "defense".
    assert robust(student, heldout, "margin") <= masked - 0.2
    # The evaluation's checks flag it: a cross-entropy evaluation of it is unreliable.
    probe = Suite("ce", (Stage("apgd-ce", "apgd", {"steps": 10, "loss": "ce"}),))
    report = evaluate(student, x[:100], y[:100], THREAT, probe, progress=False,
                      check_samples=40)
    assert {c.name: c.status for c in report.checks}["gradients"] == "fail"
    assert not report.reliable


def test_noise_augmentation_makes_the_model_accurate_on_noisy_inputs(standard, heldout,
                                                                     tmp_path_factory):
    """Trained with sigma 0.5, tested at sigma 1.0, where the standard model falls apart.
    At the training sigma the gain depends on how noise-tolerant the standard model happens
    to be: 0.08-0.24 over training seeds 0-5 (two below the bound of 0.1 this test had); at
    sigma 1.0 it is 0.26-0.40 (augmented 0.65-0.70, standard 0.27-0.39)."""
    noisy_model = fit(tmp_path_factory, GaussianAugmentation(0.5)).model
    x, y = heldout
    noisy = x + 1.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert accuracy(noisy_model, noisy, y) >= accuracy(standard, noisy, y) + 0.15


def test_lipschitz_layers_have_unit_spectral_norm_after_training(tmp_path_factory):
    result = fit(tmp_path_factory, Recipe(), lipschitz=True, epochs=1, train_limit=2000)
    reloaded = load(result.checkpoint)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(reloaded(x), result.model(x))
    linear = [m for m in reloaded.modules() if isinstance(m, torch.nn.Linear)]
    for layer in linear:
        assert torch.linalg.matrix_norm(layer.weight, ord=2) <= 1.0 + 1e-3


def test_catastrophic_overfitting_restores_the_best_weights_and_stops(heldout):
    x, y = heldout
    model = create("small_cnn")  # untrained: PGD robust accuracy ~0
    best = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.data.add_(1.0)
    recipe = FastAdversarialTraining(THREAT, eval_batch=100)
    recipe._best = (0.9, best)  # an earlier epoch was robust
    with pytest.raises(StopTraining, match="catastrophic overfitting"):
        recipe.end_epoch(model, 3, x, y)
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)


def test_no_collapse_is_declared_while_eps_is_still_warming_up(heldout):
    x, y = heldout
    model = create("small_cnn")  # untrained: PGD robust accuracy at the full eps ~0
    recipe = FastAdversarialTraining(THREAT, eval_batch=100, warmup_epochs=3)
    recipe._best = (0.9, copy.deepcopy(model.state_dict()))
    for epoch in (0, 1):  # eps at 1/3 and 2/3 of its final value: no verdict
        assert "robust_acc" in recipe.end_epoch(model, epoch, x, y)
    with pytest.raises(StopTraining, match="catastrophic overfitting"):
        recipe.end_epoch(model, 2, x, y)  # the first epoch at the full eps


def test_trainer_records_the_stop_and_does_not_resume_past_it(tmp_path):
    class StopsAfterOne(Recipe):
        def end_epoch(self, model, epoch, x_val, y_val):
            raise StopTraining("stop here")

    config = TrainConfig(**{**BASE, "epochs": 3, "train_limit": 256})
    first = train(config, tmp_path, recipe=StopsAfterOne(), progress=False, log=lambda _: None)
    assert len(first.history) == 1
    again = train(config, tmp_path, recipe=StopsAfterOne(), progress=False, log=lambda _: None)
    assert len(again.history) == 1


def test_resuming_with_other_recipe_parameters_is_refused(tmp_path):
    config = TrainConfig(**{**BASE, "recipe": "noise", "epochs": 1, "train_limit": 256})
    train(config, tmp_path, recipe=GaussianAugmentation(0.25), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="another configuration"):
        train(config, tmp_path, recipe=GaussianAugmentation(0.5), progress=False,
              log=lambda _: None)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: ThreatModel("linf", -0.1), "eps must be >= 0"),
    (lambda: PGDTraining(ThreatModel("linf", 0.0)), "eps > 0"),
    (lambda: PGDTraining(THREAT, steps=0), "steps must be >= 1"),
    (lambda: TRADES(THREAT, beta=-1.0), "beta must be >= 0"),
    (lambda: MART(THREAT, lam=-1.0), "lam must be >= 0"),
    (lambda: TemperatureTraining(0.0), "temperature must be > 0"),
    (lambda: Distillation(create("small_cnn"), -1.0), "temperature must be > 0"),
    (lambda: GaussianAugmentation(0.0), "sigma must be > 0"),
    (lambda: FastAdversarialTraining(THREAT, co_drop=1.5), "co_drop"),
])
def test_bad_settings_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_recipe_must_match_the_config(tmp_path):
    with pytest.raises(ValueError, match="config.recipe"):
        train(TrainConfig(**BASE), tmp_path, recipe=TRADES(THREAT), progress=False)
