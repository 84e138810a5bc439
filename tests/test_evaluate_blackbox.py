"""The evaluation engine on black boxes: score-only, label-only and remote models go through
the suite, the store and resume with every query accounted for."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from toys import toy_cnn

import advkit
from advkit.evaluation import Stage, Store, Suite
from advkit.evaluation.engine import GALLERY_PER_CHUNK
from advkit.models import labels_only, remote, scores_only
from advkit.serving import build_app, running
from advkit.threat import ThreatModel

THREAT = ThreatModel("linf", 0.3)
#: Square with a small budget: the standard MNIST model falls within a few hundred queries.
SQUARE = Suite("square-300", (Stage("square", "square", {"n_queries": 300}),))


def _data(mnist_test, n=24):
    x, y = mnist_test
    return x[:n], y[:n]


def _queries(report) -> int:
    """What the report says the black box answered: one probe, the clean pass, the stages."""
    return 1 + len(report.per_sample) + sum(s["forward_passes"] for s in report.stages)


def test_a_score_black_box_is_evaluated_with_every_query_counted(mnist_model, mnist_test):
    x, y = _data(mnist_test)
    box = scores_only(mnist_model)
    report = advkit.evaluate(box, x, y, THREAT, suite=SQUARE, batch_size=8, progress=False)
    # Square's result is the same through the access as on the module: it reads scores only.
    direct = advkit.evaluate(mnist_model, x, y, THREAT, suite=SQUARE, batch_size=8,
                             checks=False, progress=False)
    assert report.robust_accuracy == direct.robust_accuracy
    assert report.robust_accuracy < 0.5 < report.clean_accuracy
    assert box.queries == _queries(report)
    # The stage's forward passes are the attacks' per-sample queries plus one per gallery
    # image (the confidence shown beside it).
    gallery = sum(1 for r in report.per_sample if r["broken_by"] == "square")
    extra = sum(s["forward_passes"] for s in report.stages) - sum(
        r["passes"] for r in report.per_sample)
    assert 0 < extra <= min(gallery, 2 * GALLERY_PER_CHUNK)
    assert {c.name: c.status for c in report.checks}["gradients"] == "skip"
    assert report.config["access"] == "scores"


def test_a_white_box_suite_is_refused_for_a_black_box_before_any_query(mnist_model,
                                                                        mnist_test):
    x, y = _data(mnist_test)
    box = scores_only(mnist_model)
    with pytest.raises(ValueError, match="scores access cannot run: apgd-ce.*suite='blackbox'"):
        advkit.evaluate(box, x, y, THREAT, suite="standard", progress=False)
    with pytest.raises(ValueError, match="per-sample query budget"):
        advkit.evaluate(scores_only(mnist_model, budget=100), x, y, THREAT, suite="blackbox",
                        progress=False)
    assert box.queries == 0


def test_the_blackbox_suite_fits_the_access():
    from advkit.evaluation import get_suite

    model = torch.nn.Linear(4, 2)
    assert [s.attack for s in get_suite("blackbox", scores_only(model)).stages] == ["square"]
    assert [s.attack for s in get_suite("blackbox", labels_only(model)).stages] == [
        "hopskipjump"]


# -- a stage as configured: NES's label-only setting -------------------------------------
def _nes(**options) -> Suite:
    return Suite("nes", (Stage("nes", "nes", {"max_queries": 100, "samples": 10, **options}),))


@pytest.mark.parametrize("label_only", [None, True])
def test_a_label_only_nes_stage_passes_the_access_check_and_is_refused_as_targeted(
        label_only, batch):
    """The configured NES makes do with labels, so a label-only model passes the access
    check; its label-only setting is targeted, and the engine attacks without targets."""
    x, y = batch
    box = labels_only(toy_cnn())
    with pytest.raises(ValueError, match=r"stage 'nes' \(nes\) cannot run in an evaluation, "
                                         r"which attacks without targets=: label-only NES is "
                                         r"targeted.*HopSkipJump or Boundary"):
        advkit.evaluate(box, x, y, ThreatModel("linf", 0.1), suite=_nes(label_only=label_only),
                        progress=False)
    assert box.queries == 0


@pytest.mark.parametrize("view", [scores_only, lambda model: model])
def test_a_nes_stage_with_label_only_true_is_refused_on_any_model(view, batch):
    x, y = batch
    with pytest.raises(ValueError, match="label-only NES is targeted"):
        advkit.evaluate(view(toy_cnn()), x, y, ThreatModel("linf", 0.1),
                        suite=_nes(label_only=True), progress=False)


def test_nes_without_the_label_only_setting_is_refused_a_label_only_model(batch):
    x, y = batch
    box = labels_only(toy_cnn())
    with pytest.raises(ValueError, match=r"labels access cannot run: nes \(NES needs scores\)"):
        advkit.evaluate(box, x, y, ThreatModel("linf", 0.1), suite=_nes(label_only=False),
                        progress=False)
    assert box.queries == 0


def test_a_default_nes_stage_runs_on_a_score_black_box_with_every_query_counted(batch):
    x, y = batch
    box = scores_only(toy_cnn())
    report = advkit.evaluate(box, x, y, ThreatModel("linf", 0.1), suite=_nes(),
                             batch_size=8, progress=False)
    assert report.finished and report.clean_accuracy == 1.0
    assert box.queries == _queries(report)


def test_a_label_black_box_runs_hopskipjump_with_one_hot_answers(mnist_model, mnist_test):
    x, y = _data(mnist_test, 8)
    box = labels_only(mnist_model)
    suite = Suite("hsj", (Stage("hsj", "hopskipjump", {"max_queries": 300}),))
    report = advkit.evaluate(box, x, y, THREAT, suite=suite, progress=False)
    assert box.queries == _queries(report)
    assert all(r["clean_conf"] == 1.0 for r in report.per_sample)
    assert report.robust_accuracy < report.clean_accuracy


def test_an_interrupted_black_box_run_resumes_with_its_counts(mnist_model, mnist_test,
                                                              tmp_path):
    x, y = _data(mnist_test)
    full = advkit.evaluate(scores_only(mnist_model), x, y, THREAT, suite=SQUARE, batch_size=8,
                           progress=False)

    class Endpoint(torch.nn.Module):
        """The model behind a connection that dies partway through the second chunk."""

        def __init__(self, fail_after: int | None) -> None:
            super().__init__()
            self.model, self.fail_after, self.calls = mnist_model, fail_after, 0

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise ConnectionError("the endpoint went away")
            return self.model(images)

    store = tmp_path / "runs.sqlite"
    with pytest.raises(ConnectionError):
        advkit.evaluate(scores_only(Endpoint(60)), x, y, THREAT, suite=SQUARE, batch_size=8,
                        store=store, progress=False)
    with Store(store) as db:
        (run,) = db.runs()
        done = db.chunks(run["id"])
    assert 0 < len([c for c in done if c.stage == 1]) < 3  # some chunks, not all
    box = scores_only(Endpoint(None))
    resumed = advkit.evaluate(box, x, y, THREAT, suite=SQUARE, batch_size=8, store=store,
                              resume=run["id"], progress=False)
    # Same chunks, same seeds: the resumed run is the uninterrupted one, counts included.
    assert [(r["status"], r["passes"]) for r in resumed.per_sample] == [
        (r["status"], r["passes"]) for r in full.per_sample]
    # This process answered only what was left: the probe and the unfinished chunks.
    finished = sum(c.forward for c in done if c.stage == 1)
    assert box.queries == 1 + sum(s["forward_passes"] for s in resumed.stages) - finished


def test_a_remote_endpoints_counter_equals_the_reports(mnist_model, mnist_test):
    x, y = _data(mnist_test, 16)
    with running(build_app(mnist_model, (1, 28, 28), output="logits")) as url:
        box = remote(url)
        report = advkit.evaluate(box, x, y, THREAT, suite=SQUARE, batch_size=8,
                                 progress=False)
        answered = httpx.get(f"{url}/stats").json()
    local = advkit.evaluate(scores_only(mnist_model), x, y, THREAT, suite=SQUARE,
                            batch_size=8, progress=False)
    assert report.robust_accuracy == local.robust_accuracy
    assert answered["images"] == _queries(report) == box.queries


def test_the_cli_evaluates_a_remote_endpoint_and_a_local_black_box(mnist_model, tmp_path):
    from conftest import TEST_CACHE
    from typer.testing import CliRunner

    from advkit.cli import app

    runner = CliRunner()
    checkpoint = str(TEST_CACHE / "small_cnn-mnist.safetensors")
    common = ["--suite", "square:n_queries=200", "--limit", "16", "--batch-size", "8",
              "--json"]
    with running(build_app(mnist_model, (1, 28, 28), output="logits")) as url:
        done = runner.invoke(app, ["evaluate", "--remote", url, "--store",
                                   str(tmp_path / "r.sqlite"), *common])
        assert done.exit_code == 0, done.output
        served = httpx.get(f"{url}/stats").json()["images"]
    remote_run = json.loads(done.output)
    local = runner.invoke(app, ["evaluate", "--model", checkpoint, "--access", "scores",
                                "--store", str(tmp_path / "l.sqlite"), *common])
    assert local.exit_code == 0, local.output
    local_run = json.loads(local.output)
    assert remote_run["robust_accuracy"] == local_run["robust_accuracy"]
    assert served == 1 + 16 + sum(s["forward_passes"] for s in remote_run["stages"])
    with Store(tmp_path / "r.sqlite") as db:
        (run,) = db.runs()
    assert run["config"]["model"] == {"spec": url, "access": "scores", "remote": url}
    # A white-box suite on a black box is an error line, before any query.
    refused = runner.invoke(app, ["evaluate", "--model", checkpoint, "--access", "labels",
                                  "--suite", "standard", "--limit", "4"])
    assert refused.exit_code != 0 and "suite='blackbox'" in refused.output
    alone = runner.invoke(app, ["evaluate", "--model", checkpoint, "--access", "labels"])
    assert alone.exit_code != 0 and "--suite blackbox" in alone.output
