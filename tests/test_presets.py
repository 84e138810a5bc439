"""Shipped training presets: every preset builds every one of its recipes, explicit
options win over the preset, and `advkit train --preset` trains what the preset says."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from advkit.cli import app
from advkit.models import create, read_metadata
from advkit.training import PRESETS, TRAIN_DEFAULTS, TrainConfig, build_recipe, get_preset, resolve
from advkit.training.trainer import split


@pytest.mark.parametrize(("preset", "defense"), [
    (p, d) for p, preset in PRESETS.items() for d in preset.defenses])
def test_every_preset_recipe_is_a_valid_configuration(preset, defense):
    fields, threat, options = split(resolve(defense, preset, {}))
    config = TrainConfig(**fields)  # refuses unknown architectures, bad epochs, ...
    teacher = create(config.arch) if defense == "distillation" else None
    recipe = build_recipe(defense, threat, teacher=teacher, **options)  # refuses stray options
    assert recipe.name == defense
    assert config.dataset == get_preset(preset).dataset
    assert threat.eps == get_preset(preset).eps


def test_explicit_options_win_over_the_preset_which_wins_over_the_defaults():
    settings = resolve("pgd", "mnist", {"epochs": 1, "steps": None, "seed": 3})
    preset = get_preset("mnist").settings("pgd")
    assert settings["epochs"] == 1  # explicit
    assert settings["steps"] == preset["steps"]  # None means "not given"
    assert settings["arch"] == preset["arch"] != TRAIN_DEFAULTS["arch"]
    assert settings["seed"] == 3
    assert resolve("standard", None, {})["arch"] == TRAIN_DEFAULTS["arch"]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: resolve("pgd", "cifar", {}), "unknown preset 'cifar'"),
    (lambda: resolve("pgd", "mnist", {"dataset": "fashion-mnist"}), "drop --dataset"),
    (lambda: resolve("temperature", "mnist", {}), "no 'temperature' recipe"),
])
def test_bad_preset_requests_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_fashion_mnist_is_accepted_with_either_spelling():
    assert get_preset("fashion_mnist") is get_preset("fashion-mnist")
    assert resolve("pgd", "fashion_mnist", {"dataset": "fashion_mnist"})["eps"] == 0.1


def test_cli_train_with_a_preset_records_the_preset_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVKIT_MODEL_DIR", str(tmp_path / "models"))
    result = CliRunner().invoke(app, [
        "train", "--defense", "pgd", "--preset", "mnist", "--epochs", "1", "--train-limit",
        "256", "--attack-steps", "1", "--no-card", "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    config = read_metadata(summary["checkpoint"])["config"]
    preset = get_preset("mnist").settings("pgd")
    assert config["arch"] == preset["arch"] and config["epochs"] == 1
    assert config["recipe_params"]["steps"] == 1
    assert config["recipe_params"]["warmup_epochs"] == preset["warmup_epochs"]
    assert summary["installed"].endswith(f"{preset['arch']}-mnist-pgd.safetensors")


def test_cli_train_refuses_an_unknown_preset_and_trains_nothing(tmp_path):
    result = CliRunner().invoke(app, ["train", "--preset", "imagenet", "--out",
                                      str(tmp_path / "run"), "--json"])
    assert result.exit_code != 0
    assert "unknown preset" in result.output
    assert not (tmp_path / "run").exists()
