"""`advkit demo`: the main job, its report, and what a person sees in a browser."""

from __future__ import annotations

import json

import pytest
from browser import run_chromium
from PIL import Image

from advkit.demo import DEMO_EPS, run_demo


@pytest.fixture(scope="module")
def demo_run(mnist_model, tmp_path_factory, monkeypatch_module):
    from conftest import TEST_CACHE

    monkeypatch_module.setenv("ADVKIT_MODEL_DIR", str(TEST_CACHE))
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, limit=200, progress=False, log=lambda _: None), out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_demo_reports_every_attack_and_eps(demo_run):
    summary, _ = demo_run
    rows = summary["results"]
    assert {(r["attack"], r["eps"]) for r in rows} == {(a, e) for a in ("FGSM", "PGD")
                                                       for e in DEMO_EPS}
    # clean 99.5-100%; PGD 93.5-95%, 60.5-70%, 8.5-19.5%, 0-1.5%, 0%, 0% over the 7 retrainings
    # of the test model (conftest)
    assert summary["clean_accuracy"] >= 0.97
    pgd = [r["robust_acc"] for r in rows if r["attack"] == "PGD"]
    assert pgd[-1] <= 0.05 and pgd == sorted(pgd, reverse=True)


def test_demo_writes_a_json_twin(demo_run):
    summary, out = demo_run
    report = json.loads((out / "report.json").read_text())
    assert len(report["summary"]) == len(summary["results"])
    assert report["gallery"], "the gallery must show at least one adversarial example"


def test_demo_report_renders_in_chromium(demo_run, tmp_path):
    summary, out = demo_run
    page = out / "report.html"
    shot = tmp_path / "demo.png"
    run_chromium(page, tmp_path / "profile", f"--screenshot={shot}", window=(1280, 2400))
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2400)
    assert len(set(image.get_flattened_data())) > 100  # plot, table, digits: not blank
    dom = run_chromium(page, tmp_path / "profile2", "--dump-dom").stdout
    assert "advkit demo" in dom
    assert "Robust accuracy" in dom or "robust accuracy" in dom
    assert dom.count("<img") >= 3 * len(json.loads((out / "report.json").read_text())["gallery"])
    assert f"{summary['clean_accuracy']:.2%}" in dom
