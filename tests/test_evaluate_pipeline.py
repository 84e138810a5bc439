"""Evaluating protected pipelines: the adaptive suite is composed from the pipeline's
components, a non-adaptive suite is flagged, and rejections are counted as
:func:`advkit.defenses.protection_metrics` counts them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor
from toys import random_batch, toy_cnn

import advkit
from advkit.defenses import REJECT, BitDepth, Protected, TotalVariation
from advkit.evaluation import get_suite
from advkit.threat import ThreatModel

LINF = ThreatModel("linf", 0.1)


class LowMargin:
    """Flags an image the model classifies with a logit margin (top minus runner-up) below
    ``margin``. An attack that stops as soon as the label flips leaves its images near the
    boundary, where this flags them; an adaptive attack pushes on past it."""

    def __init__(self, model, margin: float = 0.01) -> None:
        self.model, self.threshold = model, -margin

    def fit(self, *args, **kwargs):
        return self

    def attack_score(self, x: Tensor) -> Tensor:
        top2 = self.model(x).topk(2, dim=1).values
        return top2[:, 1] - top2[:, 0]

    def flag(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.attack_score(x) > self.threshold


def pipeline_and_data() -> tuple[Protected, Tensor, Tensor]:
    model = toy_cnn()
    x, _ = random_batch(40)
    # Labels the model gives, so that only the detector makes clean images fail.
    with torch.no_grad():
        y = model(x).argmax(1)
    return Protected(model, detectors=[LowMargin(model)]), x, y


def test_the_adaptive_suite_reads_the_pipeline():
    plain = get_suite("adaptive", toy_cnn())
    assert [s.name for s in plain.stages] == ["apgd-ce", "apgd-dlr"]
    pipe, _, _ = pipeline_and_data()
    guarded = get_suite("adaptive", pipe)
    assert any(s.attack_class.evades_detectors for s in guarded.stages)
    assert {s.eot for s in guarded.stages} == {1}
    random = Protected(toy_cnn(), transforms=[TotalVariation(keep=0.5)])
    assert {s.eot for s in get_suite("adaptive", random).stages} == {20}
    quantised = get_suite("adaptive", Protected(toy_cnn(), transforms=[BitDepth(3)]))
    assert {s.eot for s in quantised.stages} == {1}
    # Transforms get a gradient-free stage last (BPDA's gradients can understate them).
    assert [s.name for s in quantised.stages] == ["apgd-ce", "apgd-dlr", "square"]
    assert "square" not in [s.name for s in guarded.stages]


def test_a_non_adaptive_suite_on_a_pipeline_is_flagged_and_unreliable(tmp_path):
    pipe, x, y = pipeline_and_data()
    with pytest.warns(UserWarning, match="not adaptive to this pipeline"):
        report = advkit.evaluate(pipe, x, y, LINF, "fast", checks=False, progress=False,
                                 store=tmp_path / "runs.db")
    adaptive = [c for c in report.checks if c.name == "adaptive"]
    assert [c.status for c in adaptive] == ["fail"]
    assert "LowMargin" in adaptive[0].message
    assert not report.reliable
    # The same pipeline with the adaptive suite passes that check.
    report = advkit.evaluate(pipe, x, y, LINF, "adaptive", checks=False, progress=False)
    assert [c.status for c in report.checks if c.name == "adaptive"] == ["pass"]


def test_rejections_are_counted_as_protection_metrics_counts_them():
    pipe, x, y = pipeline_and_data()
    report = advkit.evaluate(pipe, x, y, LINF, "adaptive", checks=False, progress=False)
    rejected = pipe.rejected(x)
    assert 0 < int(rejected.sum()) < len(x)  # the detector rejects some clean images
    assert report.rejection["false_rejection"] == pytest.approx(rejected.float().mean().item())
    assert report.clean_accuracy == pytest.approx((pipe.predict(x) == y).float().mean().item())
    clean = [r["clean_pred"] for r in report.per_sample]
    assert clean == torch.where(rejected, REJECT, y).tolist()
    parts = report.rejection["detected"] + report.rejection["correct_accepted"]
    assert parts == pytest.approx(report.robust_accuracy)
    # Rejected clean images are clean errors: never attacked, never robust.
    for r, rej in zip(report.per_sample, rejected.tolist(), strict=True):
        if rej:
            assert r["status"] == "broken" and r["broken_by"] == "clean"
    assert report.summary()["rejection"] == report.rejection


def test_an_attack_that_ignores_the_detector_gets_rejected_and_the_adaptive_one_does_not():
    pipe, x, y = pipeline_and_data()
    keep = ~pipe.rejected(x)
    x, y = x[keep], y[keep]
    threat = ThreatModel("linf", 0.1)
    with pytest.warns(UserWarning, match="not adaptive"):
        naive = advkit.evaluate(pipe, x, y, threat, "pgd:steps=20", checks=False,
                                progress=False)
    adaptive = advkit.evaluate(pipe, x, y, threat, "adaptive", checks=False, progress=False)
    # Measured on these 36 images: PGD's images are rejected at 0.67 (robust 0.86 in all);
    # the adaptive suite's at 0.06 (robust 0.14). Here the detector's score is minus the
    # classifier's margin, so the orthogonal step has nothing left and the selective and
    # combined-loss stages do the work: the reason the suite runs every variant.
    assert naive.rejection["detected"] > 0.5
    assert adaptive.rejection["detected"] < 0.2
    assert adaptive.robust_accuracy < naive.robust_accuracy - 0.5


def test_the_run_report_of_a_pipeline_splits_robust_accuracy(tmp_path):
    from advkit.report.evaluation import write_run_report

    pipe, x, y = pipeline_and_data()
    store = tmp_path / "runs.db"
    report = advkit.evaluate(pipe, x, y, LINF, "adaptive", checks=False, progress=False,
                             store=store)
    _, json_path = write_run_report(store, report.run_id, tmp_path / "report.html")
    text = json_path.read_text()
    facts = json.loads(text)
    flat = json.dumps(facts)
    assert "false_rejection_rate" in flat and "detected_rate" in flat
    assert "rejected clean image counts as a clean error" in (tmp_path / "report.html").read_text()
