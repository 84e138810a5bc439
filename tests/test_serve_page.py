"""The page ``advkit serve`` shows at ``/``: a real headless Chromium opens it on the real
server, runs an attack from it, and the page shows what happened; the attack endpoint keeps
the server's rules (key, limits, clear 4xx) and counts its queries apart from /predict."""

from __future__ import annotations

import base64
import io
import threading
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import torch
from browser import chromium, run_chromium
from PIL import Image
from toys import toy_cnn

from advkit.serving import build_app, running
from advkit.serving_page import MAX_QUERIES, MAX_UPLOAD_BYTES

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Square on MNIST's test image 0 (a 7), Linf 0.3: it succeeded within 100 queries on every
# image tried; 500 leaves room for another training of the test model.
RUN = "?image=0&attack=square&budget=500&eps=0.3&run=1"


class _Shown(HTMLParser):
    """The text and the image sources of the elements with an id, from a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.src: dict[str, str] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "img" and found.get("id"):
            self.src[found["id"]] = found.get("src") or ""
        elif tag not in ("img", "input", "br", "meta"):
            self._open.append(found.get("id"))
            if found.get("id"):
                self.text[found["id"]] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("img", "input", "br", "meta") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element in self._open:
            if element:
                self.text[element] += data


def shown(dom: str) -> _Shown:
    parser = _Shown()
    parser.feed(dom)
    return parser


@pytest.fixture(scope="module")
def mnist_server(mnist_model):
    app = build_app(mnist_model, (1, 28, 28))
    with running(app) as url:
        yield url, app.state.stats


def open_in_chromium(url: str, tmp_path: Path, *arguments: str):
    # Virtual time stands still while a request is pending, so the dump waits for the run.
    return run_chromium(url, tmp_path / "profile", "--virtual-time-budget=60000", *arguments,
                        window=(1100, 900))


def test_the_page_runs_an_attack_and_shows_the_flip_and_the_servers_count(
        mnist_server, tmp_path):
    chromium()
    url, stats = mnist_server
    before = stats.as_dict()
    result = open_in_chromium(f"{url}/{RUN}", tmp_path, "--dump-dom")
    page = shown(result.stdout)
    after = stats.as_dict()
    assert page.text.get("error") == "", page.text.get("error")
    assert page.text["clean-label"] == "7"
    assert page.text["adversarial-label"] not in ("", "7")
    assert page.text["verdict"].startswith("the attack succeeded")
    assert after["page_runs"] == before["page_runs"] + 1
    assert int(page.text["server-queries"]) == after["page_images"] - before["page_images"]
    assert int(page.text["attack-queries"]) <= 500
    for image in ("clean-image", "perturbation-image", "adversarial-image"):
        assert page.src[image].startswith("data:image/png;base64,")
    assert page.src["clean-image"] != page.src["adversarial-image"]
    assert after["images"] == before["images"], "the page's queries count apart from /predict"


def test_the_page_screenshot_shows_the_result(mnist_server, tmp_path):
    chromium()
    url, _ = mnist_server
    screenshot = tmp_path / "page.png"
    result = open_in_chromium(f"{url}/{RUN}", tmp_path, f"--screenshot={screenshot}")
    assert screenshot.exists(), f"no screenshot; chromium said:\n{result.stderr[-2000:]}"
    picture = Image.open(screenshot).convert("L")
    assert picture.size == (1100, 900)
    low, high = picture.getextrema()
    assert high - low > 100, "the screenshot is blank"


def png(size: tuple[int, int], colour: tuple[int, int, int] = (200, 40, 90)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def toy_server():
    """The toy CNN (1x8x8, no bundled images) with a key."""
    app = build_app(toy_cnn(), (1, 8, 8), api_key=KEY)
    with running(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client, app.state.stats


def attack(client: httpx.Client, **changes) -> httpx.Response:
    return client.post("/try/attack", json={"image": png((40, 30)), "attack": "square",
                                            "budget": 200, "eps": 0.3, **changes})


def test_an_uploaded_png_is_converted_attacked_and_counted_exactly(toy_server):
    client, stats = toy_server
    before = stats.as_dict()
    answer = attack(client)
    assert answer.status_code == 200, answer.text
    run = answer.json()
    # One look at the clean image, the attack's own queries, one look at the result.
    assert run["server_queries"] == run["attack_queries"] + 2
    assert run["attack_queries"] <= 200
    after = stats.as_dict()
    assert after["page_images"] - before["page_images"] == run["server_queries"]
    assert after["images"] == before["images"]
    assert run["true_label"] is None and 0 <= run["clean"]["confidence"] <= 1


@pytest.mark.parametrize("changes, status, message", [
    ({"attack": "pgd"}, 422, "unknown attack 'pgd': this server (scores) offers square, "
                             "simba, hopskipjump"),
    ({"budget": MAX_QUERIES + 1}, 422, f"budget must be a whole number of queries from 10 to "
                                       f"{MAX_QUERIES}"),
    ({"budget": 0}, 422, "budget must be a whole number"),
    ({"eps": -1}, 422, "eps must be a number > 0"),
    ({"image": "data:image/png;base64,bm90IGFuIGltYWdl"}, 422, "not a PNG or JPEG"),
    ({"image": "data:image/png;base64,###"}, 422, "not valid base64"),
    ({"image": 3}, 422, "no sample is bundled: upload an image"),
    ({"image": "A" * (MAX_UPLOAD_BYTES * 2)}, 413, "upload a smaller one"),
])
def test_a_bad_run_gets_a_4xx_that_says_what_to_send(toy_server, changes, status, message):
    client, _ = toy_server
    answer = attack(client, **changes)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]
    assert attack(client).status_code == 200  # and the server goes on


def test_a_run_wants_the_key_but_the_page_does_not(toy_server):
    client, _ = toy_server
    url = str(client.base_url)
    assert httpx.post(f"{url}/try/attack", json={}).status_code == 401
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and 'id="key"' in page.text


def test_a_label_only_server_offers_only_the_decision_based_attack():
    with running(build_app(toy_cnn(), (1, 8, 8), mode="label")) as url:
        page = httpx.get(f"{url}/").text
        wrong = httpx.post(f"{url}/try/attack", json={"image": png((8, 8)), "attack": "square",
                                                      "budget": 50, "eps": 0.3})
        right = httpx.post(f"{url}/try/attack", timeout=60, json={
            "image": png((8, 8)), "attack": "hopskipjump", "budget": 50, "eps": 1.0})
    assert 'value="hopskipjump"' in page and 'value="square"' not in page
    assert wrong.status_code == 422 and "offers hopskipjump" in wrong.json()["detail"]
    assert right.status_code == 200 and right.json()["clean"]["confidence"] is None


def test_no_page_serves_no_page():
    with running(build_app(toy_cnn(), (1, 8, 8), page=False)) as url:
        assert httpx.get(f"{url}/").status_code == 404
        assert httpx.post(f"{url}/try/attack", json={}).status_code == 404


class _Gate(torch.nn.Module):
    """The toy CNN, whose first forward pass after ``arm()`` waits until ``release`` is set
    (so a page run can be held open while the test asks the server other things)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = toy_cnn()
        self.armed = False
        self.entered, self.release = threading.Event(), threading.Event()

    def arm(self) -> None:
        self.armed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(timeout=60)
        return self.net(x)


def test_a_second_run_while_one_runs_gets_429_and_predict_still_answers():
    gate = _Gate().eval()
    with running(build_app(gate, (1, 8, 8))) as url, httpx.Client(base_url=url,
                                                                   timeout=60) as client:
        first: dict[str, httpx.Response] = {}
        gate.arm()
        runner = threading.Thread(target=lambda: first.setdefault("answer", attack(client)))
        runner.start()
        try:
            assert gate.entered.wait(timeout=30), "the first run never reached the model"
            second = attack(client)
            assert second.status_code == 429, second.text
            assert "another attack from the page is running" in second.json()["detail"]
            # The held run blocks the page only: /predict goes on answering.
            predict = client.post("/predict", json={"inputs": torch.rand(2, 1, 8, 8).tolist()})
            assert predict.status_code == 200, predict.text
        finally:
            gate.release.set()
            runner.join(timeout=60)
        assert first["answer"].status_code == 200, first["answer"].text
        assert attack(client).status_code == 200  # the lock was given back
