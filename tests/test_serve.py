"""``advkit serve``: the real server on loopback refuses bad requests with a 4xx status and
a message that says what to fix, keeps serving, and counts what it answered."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import TEST_CACHE
from toys import random_batch, toy_cnn
from typer.testing import CliRunner

from advkit.cli import app as cli
from advkit.serving import build_app, check_exposure, is_loopback, running

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 20_000  # bytes: a toy image (1x8x8) is about 1.3 kB as JSON


@pytest.fixture(scope="module")
def server():
    """The toy CNN served with a key, at most 8 images and 20 kB per request."""
    app = build_app(toy_cnn(), (1, 8, 8), api_key=KEY, max_batch=8, max_body_bytes=LIMIT)
    with running(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=10) as client:
        yield client, app.state.stats


def images(n: int) -> list:
    return random_batch(n)[0].tolist()


def post(client: httpx.Client, body: bytes | str, **kwargs) -> httpx.Response:
    content = body.encode() if isinstance(body, str) else body
    return client.post("/predict", content=content, **kwargs)


def still_serving(client: httpx.Client) -> None:
    answer = client.post("/predict", json={"inputs": images(2)})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["scores"]) == 2


def test_a_good_request_gets_probabilities_and_is_counted(server):
    client, stats = server
    before = stats.as_dict()
    x = random_batch(3)[0]
    answer = client.post("/predict", json={"inputs": x.tolist()})
    assert answer.status_code == 200
    with torch.no_grad():
        expected = toy_cnn()(x).softmax(1)
    assert torch.allclose(torch.tensor(answer.json()["scores"]), expected, atol=1e-6)
    after = client.get("/stats").json()
    assert after["images"] == before["images"] + 3
    assert after["requests"] == before["requests"] + 1


BAD_REQUESTS = {
    "malformed JSON": ('{"inputs": [[', 400, "not valid JSON"),
    "NaN": ('{"inputs": [[[[NaN]]]]}', 400, "NaN is not a valid input value"),
    "inf": (json.dumps({"inputs": images(1)}).replace("0.", "1e999", 1), 422, "NaN or inf"),
    "no inputs": ('{"images": []}', 422, "no 'inputs' in the body"),
    "not numbers": ('{"inputs": [["a"]]}', 422, "not an array of numbers"),
    "ragged": ('{"inputs": [[[[0.1, 0.2], [0.3]]]]}', 422, "not an array of numbers"),
    "wrong shape": (json.dumps({"inputs": torch.zeros(2, 1, 8, 7).tolist()}), 422,
                    r"has shape (2, 1, 8, 7); send"),
    "no image": ('{"inputs": []}', 422, "has shape (0,)"),
    "outside [0, 1]": (json.dumps({"inputs": (torch.ones(1, 1, 8, 8) * 1.5).tolist()}), 422,
                       "outside [0, 1] (min 1.5, max 1.5); scale images"),
    "too many images": (json.dumps({"inputs": torch.zeros(9, 1, 8, 8).tolist()}), 413,
                        "9 images, over the limit of 8 per request"),
    "oversized body": (json.dumps({"inputs": images(8), "pad": "x" * LIMIT}), 413,
                       f"over the limit of {LIMIT}; send fewer images"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_4xx_with_a_clear_message_and_the_server_keeps_serving(
        server, case):
    client, stats = server
    body, status, message = BAD_REQUESTS[case]
    refused = stats.refused
    answer = post(client, body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]
    assert stats.refused == refused + 1
    still_serving(client)


def test_a_body_sent_in_chunks_is_cut_off_at_the_limit(server):
    client, _ = server

    def chunks():
        for _ in range(100):  # 100 kB in all, 1 kB at a time, no Content-Length
            yield b" " * 1000

    answer = client.post("/predict", content=chunks())
    assert answer.status_code == 413
    assert f"passed the limit of {LIMIT} bytes" in answer.json()["detail"]
    still_serving(client)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": KEY}])
def test_every_endpoint_wants_the_key(server, headers):
    client, stats = server
    for method, path in (("GET", "/info"), ("GET", "/stats"), ("POST", "/predict")):
        kwargs = {"json": {"inputs": images(1)}} if method == "POST" else {}
        answer = httpx.request(method, f"{client.base_url}{path}", headers=headers, **kwargs)
        assert answer.status_code == 401, (path, answer.text)
        assert "Authorization: Bearer KEY" in answer.json()["detail"]
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    still_serving(client)


def test_label_and_top_k_modes_answer_no_more_than_they_serve():
    x = random_batch(4)[0]
    with torch.no_grad():
        logits = toy_cnn()(x)
    with running(build_app(toy_cnn(), (1, 8, 8), mode="label")) as url:
        answer = httpx.post(f"{url}/predict", json={"inputs": x.tolist()}).json()
        assert answer == {"labels": logits.argmax(1).tolist()}
    with running(build_app(toy_cnn(), (1, 8, 8), mode="top-k", top_k=2,
                           output="logits")) as url:
        info = httpx.get(f"{url}/info").json()
        answer = httpx.post(f"{url}/predict", json={"inputs": x.tolist()}).json()
    assert (info["serves"], info["top_k"], info["output"]) == ("top-k", 2, "logits")
    assert set(answer) == {"classes", "scores"}
    top = logits.topk(2, dim=1)
    assert answer["classes"] == top.indices.tolist()
    assert torch.allclose(torch.tensor(answer["scores"]), top.values)


@pytest.mark.parametrize("options, message", [
    ({"mode": "probabilities"}, "mode must be one of scores, top-k, label"),
    ({"mode": "top-k"}, "needs top_k"),
    ({"top_k": 3}, "top_k goes with mode 'top-k'"),
    ({"output": "log"}, "output must be one of probabilities, logits"),
])
def test_bad_server_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_app(toy_cnn(), (1, 8, 8), **options)


def test_a_model_that_does_not_take_the_input_shape_is_refused_at_start():
    with pytest.raises(ValueError, match="does not take images of shape"):
        build_app(toy_cnn(), (1, 28, 28))


def test_only_loopback_may_go_without_a_key():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "a key")
    with pytest.raises(ValueError, match="reachable from other machines: give it an API key"):
        check_exposure("0.0.0.0", None)


def test_the_command_refuses_a_public_address_without_a_key():
    env = {"COLUMNS": "250", "ADVKIT_API_KEY": ""}
    result = CliRunner().invoke(cli, ["serve", "small_cnn", "--host", "0.0.0.0"], env=env)
    assert result.exit_code == 2
    assert "reachable from other machines: give it an API key" in " ".join(result.output.split())


def test_the_command_lists_serve():
    result = CliRunner().invoke(cli, ["--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "serve" in result.output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_advkit_serve_serves_a_checkpoint_on_loopback(mnist_model):
    """The command itself, in its own process: starts, answers, counts, stops on SIGTERM."""
    port = free_port()
    checkpoint = TEST_CACHE / "small_cnn-mnist.safetensors"
    env = {**os.environ, "ADVKIT_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "advkit", "serve", str(checkpoint), "--port", str(port),
         "--mode", "label", "--json"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                info = httpx.get(f"{url}/info", headers=AUTH).json()
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read().decode()
                assert time.monotonic() < deadline, "advkit serve did not start in 60 s"
                time.sleep(0.2)
        assert info["serves"] == "label" and info["input_shape"] == [1, 28, 28]
        answer = httpx.post(f"{url}/predict", headers=AUTH,
                            json={"inputs": torch.zeros(2, 1, 28, 28).tolist()})
        assert answer.status_code == 200 and len(answer.json()["labels"]) == 2
        assert httpx.get(f"{url}/stats", headers=AUTH).json()["images"] == 2
        assert httpx.get(f"{url}/info").status_code == 401
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
    assert json.loads(output.splitlines()[0]) == {
        "url": url, "model": str(checkpoint), "serves": "label", "top_k": None, "output": None,
        "api_key": True, "page": f"{url}/"}
    assert "answered 2 images (2 in all)" in output
    assert "refused GET /info with 401" in output
