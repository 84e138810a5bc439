"""``advkit.models.remote``: an endpoint served by ``advkit serve`` (the real server, on
loopback) is a black box like a local one. Queries are counted exactly, as the server
counts them, through timeouts, 5xx and garbage answers; budgets hold; a label endpoint
never shows a score; a dead endpoint is a clear error."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import torch
from fastapi import FastAPI
from toys import random_batch, toy_cnn

from advkit import ThreatModel, data, models
from advkit.attacks import Square
from advkit.models.access import AccessError, Oracle, QueryBudgetExceeded
from advkit.serving import build_app, running

MNIST = (1, 28, 28)
SQUARE = Square(ThreatModel("linf", 0.3), n_queries=200, seed=0)


@pytest.fixture(scope="module")
def five(mnist_model) -> tuple[torch.Tensor, torch.Tensor]:
    """Five MNIST test images the model classifies correctly."""
    x, y = data.load("mnist", split="test", limit=20)
    with torch.no_grad():
        right = mnist_model(x).argmax(1) == y
    return x[right][:5], y[right][:5]


def stats(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/stats").json()


def test_square_through_the_endpoint_is_square_on_the_model_and_the_server_counts_alike(
        mnist_model, five):
    x, y = five
    with running(build_app(mnist_model, MNIST, output="logits")) as url:
        box = models.remote(url)
        result = SQUARE(box, x, y)
        served = stats(url)
    local = SQUARE(models.scores_only(mnist_model), x, y)
    # Logits travel as exact decimal copies of float32: the same queries, the same answers.
    assert torch.equal(result.x_adv, local.x_adv)
    assert torch.equal(result.queries, local.queries)
    assert served["images"] == int(result.queries.sum()) == box.queries == box.model.answered
    assert box.model.sent == box.model.answered and box.model.failed_tries == 0
    assert result.success.all() and len(set(result.queries.tolist())) > 1


def test_a_probability_endpoint_is_attacked_through_log_probabilities(mnist_model, five):
    x, y = five
    with running(build_app(mnist_model, MNIST)) as url:
        box = models.remote(url, budget=202)
        scores = box.scores(x)
        result = SQUARE(box, x, y)
        served = stats(url)
    with torch.no_grad():
        expected = mnist_model(x).log_softmax(1)
    # Every probability reaches the client as a finite log (float64 on both sides).
    assert torch.isfinite(scores).all()
    assert torch.allclose(scores, expected, atol=1e-4)
    assert served["images"] == int(result.queries.sum()) + 5
    assert int(result.queries.max()) <= 202


def test_a_confident_model_keeps_a_finite_margin_through_probabilities(five):
    """A logit gap of 400 makes float32 probabilities 0 (log 0 = -inf: a flat margin that
    stalls Square); served and read in float64 they stay finite and rank as the logits."""
    x, _ = five
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    with torch.no_grad():
        net[1].weight.mul_(1e-3)
        net[1].bias.copy_(torch.linspace(0, 400, 10))
    with running(build_app(net, MNIST)) as url:
        scores = models.remote(url).scores(x)
    with torch.no_grad():
        expected = net(x).double().log_softmax(1)
    assert float(expected.min()) < -150  # probabilities float32 would flush to 0
    assert torch.isfinite(scores).all()
    assert torch.allclose(scores.double(), expected, rtol=1e-5, atol=1e-3)


def test_the_budget_is_never_exceeded_and_the_server_saw_no_more(mnist_model, five):
    x, y = five
    with running(build_app(mnist_model, MNIST)) as url:
        box = models.remote(url, budget=20)
        with pytest.raises(QueryBudgetExceeded, match="budget of 20 queries per sample"):
            SQUARE(box, x, y)
        served = stats(url)
    assert served["images"] == box.queries <= 20 * 5


def test_a_label_endpoint_never_shows_a_score(mnist_model, five):
    x, y = five
    with running(build_app(mnist_model, MNIST, mode="label")) as url:
        box = models.remote(url)
        assert box.level == "labels"
        with pytest.raises(AccessError, match="scores"):
            Oracle(box, 5).logits(x)
        with pytest.raises(AccessError, match="labels access only"):
            SQUARE(box, x, y)
        assert stats(url)["images"] == 0  # refused before any query
        with torch.no_grad():
            assert torch.equal(box.labels(x), mnist_model(x).argmax(1))
        with pytest.raises(AccessError, match="serves labels only"):
            models.remote(url, mode="scores")


def test_gradients_cannot_be_asked_of_an_endpoint(mnist_model):
    with running(build_app(mnist_model, MNIST)) as url:
        with pytest.raises(AccessError, match="gradient access through a remote endpoint"):
            models.remote(url, mode="gradients")
        box = models.remote(url)
        with pytest.raises(AccessError, match="answers scores only"):
            models.gradients(box.model)
        assert models.remote(url, mode="labels").level == "labels"


def test_a_top_k_endpoint_shows_k_scores_per_image(mnist_model, five):
    x, y = five
    with running(build_app(mnist_model, MNIST, mode="top-k", top_k=3)) as url:
        box = models.remote(url)
        assert (box.level, box.top_k) == ("scores", 3)
        scores = box.scores(x)
        result = SQUARE(box, x, y)
        served = stats(url)
    with torch.no_grad():
        top = mnist_model(x).log_softmax(1).topk(3, dim=1)
    assert torch.isfinite(scores).sum(1).tolist() == [3] * 5
    assert torch.allclose(scores.gather(1, top.indices), top.values, atol=1e-4)
    assert served["images"] == int(result.queries.sum()) + 5


def test_queries_go_in_batches_that_fit_the_endpoint():
    """At most batch_size images per request, and bodies halved to fit the size limit."""
    x, _ = random_batch(12)
    app = build_app(toy_cnn(), (1, 8, 8), max_body_bytes=4_000)  # about 3 toy images
    with running(app) as url:
        box = models.remote(url, batch_size=5)
        scores = box.scores(x)
    with torch.no_grad():
        assert torch.allclose(scores, toy_cnn()(x).log_softmax(1), atol=1e-5)
    # 5 + 5 + 2 images, the fives halved to 2 + 3, and 3 halved again where it did not fit.
    assert app.state.stats.images == 12 and app.state.stats.requests >= 5
    assert box.model.answered == 12


# -- faults ------------------------------------------------------------------------------

class Faulty:
    """advkit's app behind a wrapper that fails chosen requests to /predict on purpose:
    ``fault(i)`` for the i-th request (from 1) names the fault or None. A failed request
    never reaches the app, so the app's counter is the log of the answered requests."""

    def __init__(self, app: FastAPI, fault: Callable[[int], str | None], hang: float = 0) -> None:
        self.app, self.fault, self.hang = app, fault, hang
        self.requests = 0
        self.faults: Counter[str] = Counter()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        self.requests += 1
        fault = self.fault(self.requests)
        if fault is None:
            return await self.app(scope, receive, send)
        self.faults[fault] += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        n = len(json.loads(body)["inputs"])
        status, answer = 200, None
        if fault == "hang":  # longer than the client waits
            await asyncio.sleep(self.hang)
            status, answer = 504, b"too late"
        elif fault == "500":
            status, answer = 500, b"Internal Server Error"
        elif fault == "nan":
            answer = json.dumps({"scores": [[math.nan] * 10] * n}).encode()
        elif fault == "shape":
            answer = json.dumps({"scores": [[0.1] * 10] * (n + 1)}).encode()
        elif fault == "not json":
            answer = b"<html>maintenance</html>"
        elif fault == "sum":
            answer = json.dumps({"scores": [[0.5] * 10] * n}).encode()
        elif fault == "label out of range":
            answer = json.dumps({"labels": [10] * n}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


SCHEDULE = {3: "500", 5: "nan", 8: "hang", 12: "shape", 13: "500", 17: "not json", 21: "hang",
            26: "nan"}


def test_through_timeouts_5xx_and_garbage_the_attack_finishes_and_counts_equal_the_servers(
        mnist_model, five):
    x, y = five
    inner = build_app(mnist_model, MNIST, output="logits")
    faulty = Faulty(inner, SCHEDULE.get, hang=2.0)
    with running(faulty) as url:
        box = models.remote(url, timeout=1.0, retries=3, backoff=0.01)
        result = SQUARE(box, x, y)
    local = SQUARE(models.scores_only(mnist_model), x, y)
    assert sum(faulty.faults.values()) == len(SCHEDULE)  # every fault happened
    assert box.model.failed_tries >= len(SCHEDULE)
    # Retried queries count once: the attack's counts are the answered requests' images.
    assert inner.state.stats.images == int(result.queries.sum()) == box.queries
    assert torch.equal(result.queries, local.queries)
    assert torch.equal(result.x_adv, local.x_adv)
    assert box.model.sent > box.model.answered


def test_an_endpoint_that_stops_answering_is_an_error_naming_the_unanswered_queries():
    x, y = random_batch(6)
    inner = build_app(toy_cnn(), (1, 8, 8))
    with running(Faulty(inner, lambda i: "500" if i > 3 else None)) as url:
        box = models.remote(url, retries=2, backoff=0.01, batch_size=2)
        box.scores(x[:2])
        with pytest.raises(models.RemoteError, match=r"2 of 6 queries went unanswered \(4 "
                                                     r"answered, counted in Endpoint.answered\)"
                                                     r".*failed 2 images 3 times.*answered 500"):
            box.scores(x)
    # The server answered 2 + 4 images; the failed call delivered none of its scores.
    assert inner.state.stats.images == box.model.answered == 6 and box.queries == 2


@pytest.mark.parametrize("fault, serves, message", [
    ("nan", "scores", "probabilities outside"),
    ("shape", "scores", r"scores has shape \(3, 10\), not \(2, 10\)"),
    ("not json", "scores", "answered garbage: Expecting value"),
    ("sum", "scores", "probabilities that do not sum to 1 \\(row 0 sums to 5\\)"),
    ("label out of range", "label", "labels out of range for 10 classes"),
])
def test_garbage_answers_are_named(fault, serves, message):
    x, _ = random_batch(2)
    inner = build_app(toy_cnn(), (1, 8, 8), mode=serves)
    with running(Faulty(inner, lambda i: fault)) as url:
        box = models.remote(url, retries=1, backoff=0)
        with pytest.raises(models.RemoteError, match=message):
            box.labels(x)
    assert box.queries == 0


def test_a_4xx_is_not_tried_again():
    with running(build_app(toy_cnn(), (1, 8, 8), api_key="k")) as url:
        started = time.monotonic()
        with pytest.raises(models.RemoteError, match="refused GET /info with 401.*api_key="):
            models.remote(url, api_key="wrong", backoff=5)
        assert time.monotonic() - started < 2  # no backoff: a 4xx is never retried
        assert models.remote(url, api_key="k").model.classes == 10


def test_an_endpoint_that_does_not_answer_is_a_clear_error_and_a_fast_one():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(models.RemoteError, match=r"failed GET /info 4 times \(could not reach "
                                                 r"it.*check that it is up"):
        models.remote(f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 5  # three backoffs: 0.25 + 0.5 + 1 s


def test_a_server_that_is_not_an_advkit_endpoint_is_named_so():
    app = FastAPI()

    @app.get("/info")
    def info() -> dict:
        return {"model": "resnet"}

    with running(app) as url, pytest.raises(models.RemoteError,
                                            match="not an advkit endpoint's description"):
        models.remote(url, retries=0)


def test_a_key_sent_in_clear_beyond_this_machine_is_warned_about():
    with pytest.warns(UserWarning, match="API key goes to 10.0.0.1 in clear text"), \
            pytest.raises(ValueError, match="retries"):
        models.remote("http://10.0.0.1:8000", api_key="k", retries=-1)


@pytest.mark.parametrize("options, message", [
    ({"url": "127.0.0.1:8000"}, "url must start with http"),
    ({"mode": "top-k"}, "mode must be None"),
    ({"timeout": 0}, "timeout must be > 0"),
    ({"retries": -1}, "retries must be an integer >= 0"),
    ({"budget": 0}, "budget must be a number of queries per sample >= 1"),
])
def test_bad_client_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        models.remote(**{"url": "http://127.0.0.1:9", **options})


class _SlowOnce(torch.nn.Module):
    """The toy CNN, whose first forward pass after ``arm()`` takes ``delay`` seconds (longer
    than the client waits): the server answers a request the client has given up on."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.net, self.delay, self.calls = toy_cnn(), delay, None

    def arm(self) -> None:
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls is not None:
            self.calls += 1
            if self.calls == 1:
                time.sleep(self.delay)
        return self.net(x)


def test_a_try_the_client_gave_up_on_is_answered_once_and_counted_once():
    x, _ = random_batch(4)
    slow = _SlowOnce(delay=1.5).eval()
    app = build_app(slow, (1, 8, 8))
    with running(app) as url:
        box = models.remote(url, timeout=0.5, retries=4, backoff=0.05)
        slow.arm()
        scores = box.scores(x)
        served = stats(url)
    with torch.no_grad():
        assert torch.allclose(scores, toy_cnn()(x).log_softmax(1), atol=1e-5)
    assert box.model.failed_tries >= 1 and box.model.sent > box.model.answered
    # The retries waited for the first try's answer: the model ran once, the server counted
    # the images once, and says how many retries it answered with that answer.
    assert slow.calls == 1
    assert served["images"] == box.model.answered == 4
    assert served["replayed"] >= 1


def test_a_bad_idempotency_key_is_refused():
    with running(build_app(toy_cnn(), (1, 8, 8))) as url:
        answer = httpx.post(f"{url}/predict", json={"inputs": random_batch(1)[0].tolist()},
                            headers={"Idempotency-Key": "k" * 200})
    assert answer.status_code == 400 and "Idempotency-Key" in answer.json()["detail"]
