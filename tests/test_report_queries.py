"""Specification of the report's query-efficiency figure: median norm (and robust accuracy
at eps) versus queries per image, for attacks that record their norms per query budget.

The browser test renders the page in headless Chromium (scripts/install_chromium.sh); it
skips without it, except under CI=true, where it must run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import run_chromium
from detection import one_thread
from PIL import Image
from toys import toy_cnn

from advkit import ThreatModel, models
from advkit.attacks import FGSM, HopSkipJump
from advkit.report import QueryEfficiency, write_html_report, write_json_report

WINDOW = (1280, 1400)
CHECKPOINTS = (20, 50, 100, 200)


@pytest.fixture(scope="module")
def result():
    """HopSkipJump on a toy CNN: 16 images, norms recorded at CHECKPOINTS queries."""
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    net = toy_cnn()
    with torch.no_grad(), one_thread():
        y = net(x).argmax(1)
        torch.manual_seed(0)
        return HopSkipJump(ThreatModel("l2", math.inf), max_queries=200,
                           checkpoints=CHECKPOINTS)(models.labels_only(net), x, y)


def _write(path: Path, efficiency: QueryEfficiency | None, writer=write_html_report) -> Path:
    return writer(path, title="query efficiency", summary=[], curves={}, gallery=[],
                  environment={}, query_efficiency=efficiency)


def test_plotted_medians_equal_the_medians_of_norms_at_each_checkpoint(result) -> None:
    efficiency = QueryEfficiency.from_results([result])
    assert efficiency.norm == "l2"
    assert efficiency.median_norm == {"HopSkipJump": [
        (q, result.norms_at(q).median().item()) for q in CHECKPOINTS]}


def test_robust_accuracy_at_eps_equals_the_result_curve_after_each_budget(result) -> None:
    efficiency = QueryEfficiency.from_results([result], eps=1.0)
    assert efficiency.eps == 1.0
    assert efficiency.robust_acc["HopSkipJump"] == [
        (q, result.curve([1.0], queries=q)[0][1]) for q in CHECKPOINTS]


def test_results_without_checkpoints_give_no_figure(tmp_path: Path) -> None:
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    net = toy_cnn()
    with one_thread():
        fgsm = FGSM(ThreatModel("linf", 0.1))(net, x, net(x).argmax(1).detach())
    assert QueryEfficiency.from_results([fgsm]) is None
    assert 'id="queries"' not in _write(tmp_path / "r.html", None).read_text("utf-8")


def test_an_infinite_median_is_a_gap_in_the_line_and_null_in_json(tmp_path: Path) -> None:
    efficiency = QueryEfficiency({"Boundary": [(100, math.inf), (1000, 3.5), (10_000, 1.9)]},
                                 "l2")
    html = _write(tmp_path / "r.html", efficiency).read_text("utf-8")
    assert 'id="queries"' in html and ">Boundary</text>" in html
    assert "counts as infinitely far" in html
    document = json.loads(_write(tmp_path / "r.json", efficiency, write_json_report).read_text())
    assert document["query_efficiency"]["median_norm"]["Boundary"][0] == [100, None]


@pytest.mark.parametrize(("arguments", "message"), [
    (({"A": [(0, 1.0)]}, "l2"), "queries must be an integer >= 1"),
    (({"A": [(10, -1.0)]}, "l2"), "values must be numbers >= 0"),
    (({"A": [(10, 1.0)]}, "l2", {"A": [(10, 50.0)]}, 0.3), "divide percentages by 100"),
    (({"A": [(10, 1.0)]}, "l2", {"A": [(10, 0.5)]}), "needs the eps"),
    (({}, "l2"), "at least one attack"),
])
def test_query_efficiency_rejects_bad_input_naming_it(arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        QueryEfficiency(*arguments)


def test_chromium_shows_the_query_efficiency_figure(result, tmp_path: Path) -> None:
    efficiency = QueryEfficiency.from_results([result], eps=1.0)
    report = _write(tmp_path / "report.html", efficiency)
    dom = run_chromium(report, tmp_path / "profile", "--dump-dom", window=WINDOW)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert ">Query efficiency</h2>" in dom.stdout and dom.stdout.count("<svg") == 1
    assert ">queries per image</text>" in dom.stdout and ">HopSkipJump</text>" in dom.stdout
    screenshot = tmp_path / "report.png"
    shot = run_chromium(report, tmp_path / "profile", f"--screenshot={screenshot}",
                        window=WINDOW)
    assert screenshot.exists(), f"no screenshot; chromium said:\n{shot.stderr[-2000:]}"
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    # The only plot on the page is this one: the line's colour (#0072B2) is on screen.
    assert (np.abs(pixels - (0, 114, 178)).max(axis=2) < 8).sum() > 200
