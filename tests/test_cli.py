"""Specification of the ``advkit`` command line: ``attacks``, ``train``, ``attack`` and
``evaluate`` print honest JSON, and bad input ends with exit code 2 and a one-line reason,
never a traceback. (``advkit demo`` is specified elsewhere.)"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from advkit import models
from advkit.cli import app

REPO = Path(__file__).resolve().parents[1]
TAXONOMY = {
    "falsification": {"false negative", "false positive"},
    "knowledge": {"white box", "gray box", "black box (scores)",
                  "black box (decisions)"},
    "specificity": {"untargeted", "targeted", "untargeted+targeted"},
    "frequency": {"one-time", "iterative"},
    "scope": {"individual", "universal"},
    "perturbation": {"constrained", "optimized"},
}

runner = CliRunner()


def invoke(*args: str) -> Result:
    """Run ``advkit ARGS`` in-process, on a console wide enough not to wrap messages."""
    return runner.invoke(app, list(args), env={"COLUMNS": "250"})


def as_json(result: Result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-dir")


@pytest.fixture(autouse=True)
def _model_dir(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed models go to a folder of this module's, never the user's cache."""
    monkeypatch.setenv("ADVKIT_MODEL_DIR", str(model_dir))


@pytest.fixture(scope="module")
def trained(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``advkit train`` of small_cnn for one epoch on 1,000 images (the JSON summary)."""
    out = tmp_path_factory.mktemp("run")
    result = runner.invoke(app, ["train", "--arch", "small_cnn", "--epochs", "1",
                                 "--train-limit", "1000", "--out", str(out), "--json",
                                 "--card-limit", "60", "--store", str(out / "runs.sqlite")],
                           env={"ADVKIT_MODEL_DIR": str(model_dir)})
    summary = as_json(result)
    summary["out"] = out
    return summary


# ---------------------------------------------------------------- entry point and listing


def test_the_module_entry_point_prints_help():
    proc = subprocess.run([sys.executable, "-m", "advkit.cli", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "attack", "evaluate", "attacks", "demo"):
        assert command in proc.stdout


def test_attacks_json_lists_every_attack_with_its_taxonomy_norms_and_paper():
    rows = {row["attack"]: row for row in as_json(invoke("attacks", "--json"))}
    assert {"FGSM", "BIM", "ILLC", "PGD", "MIFGSM"} <= set(rows)
    for row in rows.values():
        for axis, allowed in TAXONOMY.items():
            assert row[axis] in allowed, (row["attack"], axis, row[axis])
        assert row["norms"] and row["kind"] in {"budgeted", "minimal"}
        assert len(row["paper"]) > 10
    assert rows["FGSM"]["frequency"] == "one-time"
    assert rows["PGD"]["frequency"] == "iterative"
    assert rows["PGD"]["access"] == "gradients" and rows["Square"]["access"] == "scores"
    assert {row["access"] for row in rows.values()} <= {"gradients", "scores", "labels"}
    assert "Madry" in rows["PGD"]["paper"]
    assert "Goodfellow" in rows["FGSM"]["paper"]


def test_attacks_without_json_prints_a_table_of_them():
    result = invoke("attacks")
    assert result.exit_code == 0, result.output
    for text in ("FGSM", "BIM", "ILLC", "PGD", "MIFGSM", "access", "gradients", "scores",
                 "falsification", "knowledge", "white box", "Madry"):
        assert text in result.stdout


# ---------------------------------------------------------------- train, attack, evaluate


def test_train_writes_a_checkpoint_and_installs_it_under_the_zoo_name(trained, model_dir):
    checkpoint = Path(trained["checkpoint"])
    installed = Path(trained["installed"])
    assert checkpoint == trained["out"] / "model.safetensors"
    assert installed == model_dir / "small_cnn-mnist.safetensors"
    assert installed.read_bytes() == checkpoint.read_bytes()
    assert [h["epoch"] for h in trained["history"]] == [1]
    assert models.read_metadata(installed)["config"]["train_limit"] == 1000


def test_training_again_over_a_damaged_checkpoint_installs_the_good_model(trained, model_dir,
                                                                          tmp_path):
    installed = Path(trained["installed"])
    run_dir = tmp_path / "run"
    shutil.copytree(trained["out"], run_dir)
    checkpoint = run_dir / "model.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    result = runner.invoke(app, ["train", "--arch", "small_cnn", "--epochs", "1",
                                 "--train-limit", "1000", "--out", str(run_dir), "--no-card"],
                           env={"ADVKIT_MODEL_DIR": str(model_dir)})
    assert result.exit_code == 0, result.output
    assert "writing it again" in result.output
    # The checkpoint was rebuilt from the run's state: the same weights, installed intact.
    assert models.load_checkpoint(installed).advkit_metadata["fingerprint"] == \
        models.read_metadata(trained["checkpoint"])["fingerprint"]
    assert models.fingerprint(models.load_checkpoint(installed)) == \
        models.fingerprint(models.load_checkpoint(trained["checkpoint"]))


def test_attack_on_the_installed_zoo_model_reports_consistent_numbers(trained):
    row = as_json(invoke("attack", "--model", "small_cnn", "--attack", "fgsm", "--eps", "0.3",
                         "--limit", "100", "--json"))
    assert (row["attack"], row["norm"], row["eps"], row["n"]) == ("FGSM", "linf", 0.3, 100)
    assert 0 <= row["robust_acc"] <= row["clean_acc"] <= 1
    assert 0 <= row["success_rate"] <= 1
    # untargeted success means misclassified: the two rates partition the images
    assert math.isclose(row["robust_acc"] + row["success_rate"], 1, abs_tol=1e-6)
    assert 0 <= row["median_norm"] <= 0.3 + 1e-6
    assert row["backward_passes"] == 100


def test_evaluate_runs_every_attack_at_every_eps(trained):
    report = as_json(invoke("evaluate", "--model", trained["checkpoint"], "--attack", "fgsm",
                            "--attack", "pgd", "--eps", "0.1", "--eps", "0.3", "--steps", "5",
                            "--limit", "50", "--json"))
    rows = {(r["attack"], r["eps"]): r for r in report["results"]}
    assert len(report["results"]) == 4
    assert set(rows) == {("FGSM", 0.1), ("FGSM", 0.3), ("PGD", 0.1), ("PGD", 0.3)}
    assert report["n"] == 50
    assert all(r["robust_acc"] <= report["clean_accuracy"] for r in rows.values())
    # 0-10% against 16-42% for this one-epoch model over training seeds 0-5 (10 points or more)
    assert rows["PGD", 0.3]["robust_acc"] <= rows["PGD", 0.1]["robust_acc"]
    assert rows["PGD", 0.3]["backward_passes"] <= 5 * 50  # --steps reached PGD


def test_attack_save_writes_adversarial_images_in_the_box_and_the_ball(trained, tmp_path):
    path = tmp_path / "out.npz"
    row = as_json(invoke("attack", "--model", trained["checkpoint"], "--attack", "pgd",
                         "--eps", "0.2", "--steps", "5", "--limit", "20", "--save", str(path),
                         "--json"))
    assert row["saved"] == str(path)
    with np.load(path) as saved:
        x_adv, y, success, norms = (saved[k] for k in ("x_adv", "y", "success", "norms"))
    assert x_adv.shape == (20, 1, 28, 28)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert y.shape == success.shape == norms.shape == (20,)
    assert norms.max() <= 0.2 + 1e-6
    assert math.isclose(success.mean(), row["success_rate"], abs_tol=1e-6)


# ---------------------------------------------------------------- bad input


def check_refused(result: Result, *expected: str) -> None:
    """Exit code 2, a readable ``error:`` line naming the problem, no traceback, no JSON."""
    message = one_line(result.stderr)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert message.startswith("error:"), message
    assert "Traceback" not in result.output
    assert result.stdout == ""
    for text in expected:
        assert text in message, message


@pytest.mark.parametrize(("args", "expected"), [
    (["attack", "--attack", "nope"], ["unknown attack 'nope'", "fgsm"]),
    (["attack", "--attack", "fgsm", "--eps", "-0.1"], ["eps must be >= 0 (got -0.1)"]),
    (["attack", "--attack", "fgsm", "--norm", "l1"], ["FGSM supports norms linf, l2", "'l1'"]),
    (["attack", "--attack", "fgsm", "--restarts", "2"], ["FGSM takes no option --restarts"]),
    (["evaluate", "--attack", "fgsm", "--attack", "bim", "--restarts", "2"],
     ["FGSM, BIM take no option --restarts"]),
    (["evaluate", "--attack", "pgd", "--eps", "0.1", "--eps", "-1"], ["eps must be >= 0"]),
    (["train", "--epochs", "0"], ["epochs must be >= 1 (got 0)"]),
    (["train", "--optimizer", "rmsprop"], ["unknown optimizer 'rmsprop'"]),
], ids=["unknown-attack", "negative-eps", "unsupported-norm", "option-fgsm-lacks",
        "option-no-attack-takes", "negative-eps-evaluate", "zero-epochs", "unknown-optimizer"])
def test_bad_input_is_refused_with_exit_code_2_and_a_reason(args, expected):
    check_refused(invoke(*args, "--json"), *expected)


@pytest.mark.parametrize(("args", "expected"), [
    (["--model", "nosuchmod:factory"], ["cannot import 'nosuchmod'"]),
    (["--model", "os:nosuch"], ["os has no callable 'nosuch'"]),
    (["--device", "foo"], ["unknown device 'foo'"]),
    (["--device", "cuda:7"], ["no such CUDA device", "--device cpu"]),
    (["--eps", "2"], ["use eps <= 1.0"]),
    (["--save", "/proc/advkit-no-such-dir/x.npz"], ["cannot write the output file"]),
], ids=["missing-module", "missing-factory", "unknown-device", "absent-gpu", "eps-hint",
        "unwritable-save"])
def test_mistakes_found_by_a_new_user_are_an_error_line_not_a_traceback(args, expected):
    check_refused(invoke("attack", "--attack", "pgd", "--limit", "5", *args, "--json"),
                  *expected)


def test_an_unwritable_save_path_fails_before_the_attack_runs(monkeypatch):
    from advkit.cli import attack as attack_cli
    ran: list[object] = []
    monkeypatch.setattr(attack_cli, "run_attack", lambda *a, **k: ran.append(a))
    check_refused(invoke("attack", "--attack", "fgsm", "--limit", "5", "--save",
                         "/proc/advkit-no-such-dir/x.npz"), "cannot write")
    assert ran == []


def test_train_refuses_an_unwritable_run_folder_before_training():
    check_refused(invoke("train", "--epochs", "1", "--out", "/proc/advkit-no-such-dir"),
                  "cannot write the run folder")


@pytest.mark.parametrize("command", ["attack", "evaluate"])
def test_a_missing_model_file_is_refused_naming_it(command, tmp_path):
    missing = tmp_path / "missing.safetensors"
    result = invoke(command, "--model", str(missing), "--attack", "fgsm", "--limit", "10",
                    "--json")
    check_refused(result)
    assert str(missing) in "".join(result.stderr.split())


def test_an_untrained_zoo_name_is_refused_with_how_to_train_it():
    check_refused(invoke("attack", "--model", "lenet5", "--attack", "fgsm", "--json"),
                  "advkit train --arch lenet5")


def test_a_pickled_model_file_is_refused_with_a_hint_to_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), path)
    check_refused(invoke("attack", "--model", str(path), "--attack", "fgsm", "--json"),
                  "--trust")


def test_train_writes_a_model_card_and_the_report_shows_it(trained, tmp_path):
    from advkit.card import card_path, read_card
    installed = Path(trained["installed"])
    card = read_card(card_path(installed))
    assert card == read_card(card_path(trained["checkpoint"])) == trained["card"]
    assert card["model"]["fingerprint"] == models.read_metadata(installed)["fingerprint"]
    assert card["training"]["recipe"] == "standard" and card["training"]["seed"] == 0
    assert card["training"]["wall_seconds"] > 0 and card["training"]["device"] == "cpu"
    ev = card["evaluation"]
    assert ev["suite"] == "fast" and ev["images"] == 60 and ev["eps"] == 0.3
    # one epoch on 1,000 images: well above chance, not yet good
    assert 0.3 <= ev["clean_accuracy"] <= 1 and 0 <= ev["robust_accuracy"] < ev["clean_accuracy"]
    assert set(ev["checks"]) >= {"gradients", "unbounded"} and ev["reliable"] in (True, False)
    page = tmp_path / "card.html"
    made = runner.invoke(app, ["report", str(ev["run"]), "--store", ev["store"], "--out",
                               str(page)])
    assert made.exit_code == 0, made.output
    html = page.read_text()
    assert "Model card" in html and card["model"]["fingerprint"] in html


def test_train_with_a_defense_installs_the_model_beside_the_standard_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVKIT_MODEL_DIR", str(tmp_path / "models"))
    result = runner.invoke(app, ["train", "--defense", "fgsm_rs", "--eps", "0.1", "--epochs", "1",
                                 "--train-limit", "256", "--out", str(tmp_path / "run"),
                                 "--json", "--no-card"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["installed"].endswith("small_cnn-mnist-fgsm_rs.safetensors")
    assert "robust_acc" in summary["history"][0]
    meta = models.read_metadata(summary["installed"])
    assert meta["recipe"] == "fgsm_rs" and meta["config"]["recipe_params"]["eps"] == 0.1


@pytest.mark.parametrize("args", [["--defense", "nonsense"], ["--defense", "trades", "--sigma",
                                                               "0.1"]])
def test_train_refuses_a_bad_defense(args, tmp_path):
    result = runner.invoke(app, ["train", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "error:" in result.stderr
