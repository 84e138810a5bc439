"""``advkit evaluate --pipeline FILE``: a model behind a pipeline file's transforms and
detectors, fitted on training images, evaluated adaptively (or flagged when it is not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TEST_CACHE
from typer.testing import CliRunner

from advkit.cli import app

runner = CliRunner()
PIPELINE = """
fpr = 0.05
fit_images = 300

[[transform]]
kind = "bit_depth"
bits = 5

[[detector]]
kind = "feature_squeezing"
"""


@pytest.fixture
def files(tmp_path: Path, mnist_model) -> tuple[Path, Path]:
    spec = tmp_path / "pipeline.toml"
    spec.write_text(PIPELINE)
    return spec, TEST_CACHE / "small_cnn-mnist.safetensors"


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "250"})


def test_an_adaptive_suite_run_on_a_pipeline(files, tmp_path):
    spec, model = files
    result = invoke("evaluate", "--model", str(model), "--pipeline", str(spec), "--suite",
                    "adaptive", "--eps", "0.3", "--limit", "20", "--no-checks", "--store",
                    str(tmp_path / "runs.db"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [c["status"] for c in summary["checks"] if c["name"] == "adaptive"] == ["pass"]
    assert any(s["stage"].startswith("opgd") for s in summary["stages"])
    rejection = summary["rejection"]
    assert rejection["detected"] + rejection["correct_accepted"] == pytest.approx(
        summary["robust_accuracy"])
    # Feature squeezing does not stop an adaptive attack at eps 0.3 (tests/test_adaptive.py).
    assert summary["robust_accuracy"] <= 0.2


def test_a_non_adaptive_run_on_a_pipeline_is_unreliable(files, tmp_path):
    spec, model = files
    result = invoke("evaluate", "--model", str(model), "--pipeline", str(spec), "--suite",
                    "pgd:steps=10", "--eps", "0.3", "--limit", "20", "--no-checks",
                    "--store", str(tmp_path / "runs.db"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert not summary["reliable"]
    (check,) = [c for c in summary["checks"] if c["name"] == "adaptive"]
    assert check["status"] == "fail" and "FeatureSqueezing" in check["message"]


def test_single_attacks_on_a_pipeline_warn_unless_one_evades_the_detectors(files):
    spec, model = files
    base = ["evaluate", "--model", str(model), "--pipeline", str(spec), "--eps", "0.3",
            "--limit", "20"]
    naive = invoke(*base, "--attack", "pgd", "--steps", "10")
    assert naive.exit_code == 0, naive.output
    assert "no attack evades the pipeline's detectors" in naive.output
    adaptive = invoke(*base, "--attack", "orthogonalpgd", "--steps", "50")
    assert adaptive.exit_code == 0, adaptive.output
    assert "no attack evades" not in adaptive.output


@pytest.mark.parametrize(("text", "message"), [
    ("[[detector]]\nkind = 'lie_detector'\n", "kind must be one of"),
    ("fpr = 1.5\n[[detector]]\nkind = 'lid'\n", "fpr must be a false-positive rate"),
    ("[[transform]]\nkind = 'jpeg'\nquality = 75\nsharpness = 2\n", "unknown option 'sharpness'"),
    ("fpr = 0.05\n", "at least one"),
    ("[[transform]]\nkind = 'jpeg'\nquality = 0\n", "transform 1 (jpeg)"),
])
def test_a_bad_pipeline_file_is_refused_with_a_reason(files, tmp_path, text, message):
    _, model = files
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    result = invoke("evaluate", "--model", str(model), "--pipeline", str(spec), "--limit", "5")
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_defend_measures_a_pipeline_non_adaptively_and_adaptively(files):
    spec, model = files
    result = invoke("defend", "--pipeline", str(spec), "--model", str(model), "--limit", "40",
                    "--attack", "pgd", "--attack", "adaptive", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    roles = [(c["component"], c["role"]) for c in summary["components"]]
    assert roles == [("BitDepth", "transform"), ("FeatureSqueezing", "detector")]
    rows = {r["attack"]: r for r in summary["results"]}
    assert set(rows) == {"pgd", "adaptive"}
    # Measured on these 40 images: PGD crafted on the bare model is detected at 0.925 (AUROC
    # 0.995, TPR 0.95); the adaptive suite leaves robust accuracy at 0 (TPR 0).
    assert rows["pgd"]["detected"] > 0.6
    assert rows["adaptive"]["robust_accuracy"] <= 0.1
    assert rows["adaptive"]["tpr"] < 0.2
    assert rows["pgd"]["clean_accuracy"] == rows["adaptive"]["clean_accuracy"]


def test_defend_help_and_bad_attack(files):
    spec, model = files
    assert "adaptive suite" in invoke("defend", "--help").output
    result = invoke("defend", "--pipeline", str(spec), "--model", str(model), "--attack",
                    "telepathy")
    assert result.exit_code == 2 and "unknown --attack 'telepathy'" in result.output
