"""Black boxes that are not torch modules, and scores shown only in part: a top-k view, a
scoring function, an ONNX Runtime session. (Remote endpoints: test_remote.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from toys import random_batch, toy_cnn

from advkit import ThreatModel, models
from advkit.attacks import PGD, Square
from advkit.models.access import AccessError, Oracle


def test_top_k_shows_the_k_highest_scores_and_hides_the_rest_as_minus_inf():
    model = toy_cnn()
    x, _ = random_batch(6)
    shown = models.scores_only(model, top_k=3).scores(x)
    with torch.no_grad():
        logits = model(x)
    top = logits.topk(3, dim=1)
    assert torch.isfinite(shown).sum(1).tolist() == [3] * 6
    assert torch.equal(shown.gather(1, top.indices), top.values)
    assert (shown.isinf() == (shown == -math.inf)).all()  # hidden means -inf, never +inf
    assert torch.equal(shown.argmax(1), logits.argmax(1))


def test_top_k_as_large_as_the_classes_shows_every_score():
    model = toy_cnn()
    x, _ = random_batch(4)
    with torch.no_grad():
        assert torch.equal(models.scores_only(model, top_k=10).scores(x), model(x))


def test_square_on_a_top_2_view_is_square_on_every_score():
    model = toy_cnn()
    x, y = random_batch(16)
    square = Square(ThreatModel("linf", 0.1), n_queries=40)
    partial = square(models.scores_only(model, top_k=2, budget=42), x, y)
    full = square(models.scores_only(model), x, y)
    assert int(partial.queries.max()) <= 42
    assert int(partial.queries.sum()) == partial.forward_passes
    # The margin needs the true class and the best other one: while the true class is on
    # top (the only time Square queries), they are the top two.
    assert torch.equal(partial.x_adv, full.x_adv)
    assert torch.equal(partial.queries, full.queries)


def test_a_label_only_view_of_a_top_k_model_still_refuses_scores():
    oracle = Oracle(models.labels_only(toy_cnn()), 4)
    x, _ = random_batch(4)
    with pytest.raises(AccessError, match="scores"):
        oracle.logits(x)


@pytest.mark.parametrize("top_k", [0, -1, 1.5, True])
def test_a_bad_top_k_is_refused(top_k):
    with pytest.raises(ValueError, match="top_k must be"):
        models.scores_only(toy_cnn(), top_k=top_k)


def test_a_scoring_function_is_a_black_box_with_scores_and_no_gradient():
    model = toy_cnn()
    x, y = random_batch(8)

    def score(images: torch.Tensor) -> torch.Tensor:
        return model(images)

    box = models.scores_only(score)
    assert box.module is None
    result = Square(ThreatModel("linf", 0.1), n_queries=20)(box, x, y)
    assert torch.equal(result.x_adv, Square(ThreatModel("linf", 0.1), n_queries=20)(
        models.scores_only(model), x, y).x_adv)
    with pytest.raises(AccessError, match="gradients access"):
        PGD(ThreatModel("linf", 0.1), steps=2)(box, x, y)
    with pytest.raises(AccessError, match="answers scores only"):
        models.gradients(score)


def test_a_scorer_is_not_taken_for_a_white_box_model():
    with pytest.raises(TypeError, match="wrap a black box"):
        PGD(ThreatModel("linf", 0.1))(lambda images: images, *random_batch(2))


@pytest.fixture
def onnx_file(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = toy_cnn()
    path = tmp_path / "toy.onnx"
    torch.onnx.export(model, (random_batch(1)[0],), str(path), dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    return model, path


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_an_onnx_runtime_session_gives_the_models_scores_and_nothing_more(onnx_file):
    model, path = onnx_file
    session = models.onnx_session(path)
    x, y = random_batch(8)
    with torch.no_grad():
        assert torch.allclose(session(x), model(x), atol=1e-5)
    result = Square(ThreatModel("linf", 0.1), n_queries=20)(
        models.scores_only(session, budget=22), x, y)
    assert int(result.queries.max()) <= 22 and result.backward_passes == 0
    assert models.labels_only(session).labels(x).tolist() == model(x).argmax(1).tolist()
    with pytest.raises(AccessError, match="answers scores only"):
        models.gradients(session)


def test_a_file_that_is_not_onnx_is_refused_clearly(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="not an ONNX model ONNX Runtime can run"):
        models.onnx_session(path)
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        models.onnx_session(tmp_path / "missing.onnx")
