"""The sandwich (issue 18): certified radii beside attacks' smallest perturbations in the
evaluation engine, the report and ``advkit certify``; an unsound certifier is caught."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advkit
from advkit.evaluation.certification import certified_radii
from advkit.threat import ThreatModel
from advkit.verify import METHODS, certify


@pytest.fixture(scope="module")
def mlp_mnist():
    """A 784-64-10 ReLU MLP trained on 6,000 MNIST images (2 epochs, seed 0; about 93%
    on the first test images), and 40 test images."""
    from advkit import data

    torch.manual_seed(0)
    x, y = data.load("mnist", split="train", limit=6000)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(2):
        for i in range(0, len(x), 100):
            optimiser.zero_grad()
            F.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            optimiser.step()
    xt, yt = data.load("mnist", split="test", limit=40)
    return model.eval(), xt, yt


def test_the_sandwich_holds_at_every_eps_and_per_image(mlp_mnist, tmp_path):
    model, x, y = mlp_mnist
    threat = ThreatModel("linf", 0.05)
    store = tmp_path / "runs.sqlite"
    report = advkit.evaluate(model, x, y, threat, "fast", store=store, checks=False,
                             certify="crown", certify_steps=6, progress=False)
    check = next(c for c in report.checks if c.name == "certification")
    assert check.status == "pass" and report.reliable
    details = check.details
    radius = torch.tensor(details["radius"])
    assert 0 < details["verified_accuracy"] < report.clean_accuracy  # both sides exercised
    # Per image: the certified radius never passes the perturbation an attack found.
    for r, row in zip(radius.tolist(), report.per_sample, strict=True):
        if row["norm"] is not None and row["clean_pred"] == row["label"]:
            assert r < row["norm"]
    # The curves: verified <= robust <= clean at every eps.
    curves = details["curves"]
    clean, robust, verified = (curves["clean"], curves["robust (attacks)"],
                               curves["verified (crown)"])
    for (e, c), (_, r), (_, v) in zip(clean, robust, verified, strict=True):
        assert v <= r + 1e-12 and r <= c + 1e-12, e
    assert verified[-1][1] == pytest.approx(details["verified_accuracy"])
    assert robust[-1][1] == pytest.approx(report.robust_accuracy)
    # The certificate at eps agrees with certify() itself.
    cert = certify(model, x, y, threat, "crown")
    correct = model(x).argmax(1) == y
    assert details["verified"] == (cert.verified & correct).tolist()
    # The HTML/JSON report carries the three curves.
    from advkit.report.evaluation import write_run_report
    html, js = write_run_report(store, report.run_id, tmp_path / "report.html")
    curves_out = json.loads(js.read_text())["curves"]
    assert any(name.startswith("verified (crown)") for name in curves_out)
    assert "certification" in html.read_text()


def test_certified_radii_are_certified_and_tight_to_the_bisection(mlp_mnist):
    model, x, y = mlp_mnist
    threat = ThreatModel("linf", 0.08)
    radii, at_eps = certified_radii(model, x, y, threat, "ibp", steps=7)
    correct = model(x).argmax(1) == y
    assert (radii[~correct] == 0).all() and (radii[at_eps] == 0.08).all()
    inner = correct & (radii > 0) & ~at_eps
    assert inner.any()
    for i in inner.nonzero().squeeze(1).tolist():
        ok = certify(model, x[i:i + 1], y[i:i + 1], ThreatModel("linf", radii[i].item()), "ibp")
        assert ok.verified.item()
        step = 0.08 / 2 ** 7
        beyond = ThreatModel("linf", radii[i].item() + step * 1.01)
        assert not certify(model, x[i:i + 1], y[i:i + 1], beyond, "ibp").verified.item()


def test_an_unsound_certifier_fails_the_run_loudly(mlp_mnist, monkeypatch):
    """A deliberately unsound bound (every margin "proved" positive) certifies images the
    attacks break: the check must fail and the run be unreliable."""
    model, x, y = mlp_mnist

    def unsound(net, region, spec, **_):
        return torch.ones(spec.shape[:2], dtype=spec.dtype)

    monkeypatch.setitem(METHODS, "unsound", unsound)
    logs: list[str] = []
    report = advkit.evaluate(model, x, y, ThreatModel("linf", 0.1), "fast", checks=False,
                             certify="unsound", progress=False, log=logs.append)
    check = next(c for c in report.checks if c.name == "certification")
    assert check.status == "fail" and "UNSOUND" in check.message
    assert not report.reliable
    broken = [i for i, r in enumerate(report.per_sample)
              if r["clean_pred"] == r["label"] and r["norm"] is not None]
    assert broken and set(broken) <= set(check.details["crossed"])
    assert any("UNSOUND" in line for line in logs)


def test_certification_refuses_what_it_cannot_do(mlp_mnist):
    model, x, y = mlp_mnist
    threat = ThreatModel("linf", 0.05)
    with pytest.raises(ValueError, match="unknown certification method 'lp'"):
        advkit.evaluate(model, x, y, threat, "fast", certify="lp", progress=False)
    with pytest.raises(ValueError, match="black box"):
        advkit.evaluate(advkit.models.scores_only(model), x, y, threat, "blackbox",
                        certify="crown", progress=False)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Tanh()).eval()
    with pytest.raises(ValueError, match="Tanh"):
        advkit.evaluate(tanh, x, y, threat, "fast", certify="ibp", progress=False)
    with pytest.raises(ValueError, match="certify_steps"):
        advkit.evaluate(model, x, y, threat, "fast", certify="ibp", certify_steps=-1,
                        progress=False)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        certified_radii(model, x, y, threat, "ibp", steps=-1)


def test_cli_certify_prints_verified_accuracy(tmp_path, monkeypatch, mlp_mnist):
    from typer.testing import CliRunner

    from advkit.cli import app

    model, x, y = mlp_mnist
    torch.save(model, tmp_path / "mlp.pt")  # a whole pickled module: needs --trust
    runner = CliRunner()
    result = runner.invoke(app, ["certify", "--model", str(tmp_path / "mlp.pt"), "--trust",
                                 "--eps", "0.05", "--limit", "40", "--method", "ibp",
                                 "--radius", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    cert = certify(model, x, y, ThreatModel("linf", 0.05), "ibp")
    correct = model(x).argmax(1) == y
    assert out["verified_acc"] == pytest.approx((cert.verified & correct).float().mean().item())
    assert len(out["radius"]) == 40 and not math.isnan(out["mean_radius"])
    bad = runner.invoke(app, ["certify", "--model", str(tmp_path / "mlp.pt"), "--trust",
                              "--method", "milp", "--norm", "l2", "--limit", "5"])
    assert bad.exit_code != 0 and "quadratic" in bad.output
