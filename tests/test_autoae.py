"""AutoAE (Liu, Peng & Tang 2023): the greedy ensemble of candidate attacks, built on data."""

from __future__ import annotations

import pytest
import torch
from toys import random_batch, toy_cnn

import advkit
from advkit import ThreatModel
from advkit.evaluation.autoae import build_suite, greedy
from advkit.evaluation.suites import Stage


def mask(n: int, *broken: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[list(broken)] = True
    return out


STAGES = [Stage("cheap", "fgsm"), Stage("strong", "pgd"), Stage("costly", "apgd"),
          Stage("useless", "bim")]


def test_the_greedy_takes_the_best_gain_per_pass_and_stops_when_nothing_is_gained():
    measured = {"cheap": (mask(10, 0, 1), 1.0),           # 2 images for 1 pass
                "strong": (mask(10, 0, 1, 2, 3, 4), 10.0),  # 5 for 10
                "costly": (mask(10, 5), 100.0),             # the only one breaking image 5
                "useless": (mask(10, 0), 1.0)}              # nothing the others miss
    picks = greedy(measured, STAGES, n_attacked=10)
    assert [p.stage.name for p in picks] == ["cheap", "strong", "costly"]
    assert [p.gain for p in picks] == [2, 3, 1]
    assert [p.left_after for p in picks] == [8, 5, 4]


def test_the_cost_cap_leaves_out_what_would_pass_it():
    measured = {"cheap": (mask(10, 0, 1), 1.0), "strong": (mask(10, 0, 1, 2, 3, 4), 10.0),
                "costly": (mask(10, 5), 100.0), "useless": (mask(10, 0), 1.0)}
    picks = greedy(measured, STAGES, n_attacked=10, max_cost=20.0)
    assert [p.stage.name for p in picks] == ["cheap", "strong"]


def test_a_suite_is_built_on_a_real_model_and_its_picks_cover_every_image_any_candidate_broke():
    model = toy_cnn()
    x, _ = random_batch(40)
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = ThreatModel("linf", 0.03)
    candidates = [Stage("fgsm", "fgsm"), Stage("pgd-10", "pgd", {"steps": 10}),
                  Stage("apgd-20", "apgd", {"steps": 20})]
    suite, picks = build_suite(model, x, y, threat, candidates)
    assert [s.name for s in suite.stages] == [p.stage.name for p in picks]
    anyone = torch.zeros(len(x), dtype=torch.bool)
    for c in candidates:
        anyone |= c.build(threat, 0)(model, x, y).success
    # The greedy stops only when no candidate adds an image: the picks cover them all.
    assert sum(p.gain for p in picks) == int(anyone.sum()) > 0
    report = advkit.evaluate(model, x, y, threat, suite, progress=False, checks=False)
    broken = round((1 - report.robust_accuracy) * len(x))
    # The first pick runs on every image as it did when measured.
    assert broken >= picks[0].gain


def test_no_candidate_and_a_hopeless_calibration_are_clear_errors():
    model = toy_cnn()
    x, y = random_batch(8)
    with pytest.raises(ValueError, match="at least one candidate"):
        build_suite(model, x, y, ThreatModel("linf", 0.1), [])
    with torch.no_grad():
        y = model(x).argmax(1)
    with pytest.raises(ValueError, match="no candidate broke"):
        build_suite(model, x, y, ThreatModel("linf", 1e-6), [Stage("fgsm", "fgsm")])
