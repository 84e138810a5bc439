"""A model behind an HTTP endpoint (``advkit serve``): the black box a security reviewer
attacks, with its own query counter.

:func:`build_app` makes the FastAPI application; :func:`serve` runs it with uvicorn, and
:func:`running` runs it in a background thread (tests, notebooks, the load benchmark).
The protocol is the one :func:`advkit.models.remote` speaks (see
:mod:`advkit.models.remote`): ``GET /info``, ``POST /predict``, plus ``GET /stats``, the
server's own count of the images it answered. It also serves a page to try an attack on the
model (``GET /``, ``POST /try/attack``; :mod:`advkit.serving_page`), unless ``page=False``.

Safe by default: the server binds to loopback; :func:`check_exposure` refuses any other
address without an API key. A request is refused with a 4xx status and a message that
says what to fix, and the server goes on serving: a body over the size limit (413, before
it is parsed), malformed JSON or NaN (400), a wrong shape, values outside [0, 1] or too
many images (422, 413), a missing or wrong key (401), a page run while another is running
(429).

Retried requests are answered once: a client may send an ``Idempotency-Key`` header (advkit's
client does, the same on every try of one request). A request whose key the server has
answered, or is answering now (the client gave up waiting and asked again), gets that first
answer, and its images are not counted again (``/stats``: ``replayed``); the server's count
of images then equals what the client was answered, even through timeouts.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from torch import Tensor, nn

from advkit._version import __version__
from advkit.models.device import device_of
from advkit.models.remote import OUTPUTS, SERVES, is_loopback

log = logging.getLogger("advkit.serve")

#: Request limits: images per request, and bytes per body (MNIST: about 16 kB per image
#: as JSON, CIFAR-10 about 60 kB, so the defaults allow a full batch of either).
MAX_BATCH = 256
MAX_BODY_BYTES = 16 * 2 ** 20
#: Answers kept for retries (by idempotency key), and the longest key accepted.
REPLAYS = 64
MAX_KEY_LENGTH = 128


@dataclass
class Stats:
    """What the server answered and refused since it started (thread-safe)."""

    images: int = 0
    requests: int = 0
    refused: int = 0
    # The page's runs are counted apart: ``images`` stays the count of /predict, which a
    # remote evaluation compares with its own, even while someone tries the page.
    page_runs: int = 0
    page_images: int = 0
    #: Retries answered with an earlier answer (their images not counted again).
    replayed: int = 0
    since: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def answered(self, n: int) -> int:
        with self._lock:
            self.images += n
            self.requests += 1
            return self.images

    def replay(self) -> None:
        with self._lock:
            self.replayed += 1

    def tried(self, n: int) -> None:
        with self._lock:
            self.page_runs += 1
            self.page_images += n

    def refuse(self) -> None:
        with self._lock:
            self.refused += 1

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"images": self.images, "requests": self.requests, "refused": self.refused,
                    "replayed": self.replayed, "page_runs": self.page_runs,
                    "page_images": self.page_images, "since": self.since}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def build_app(model: nn.Module, input_shape: tuple[int, ...], *, mode: str = "scores",
              top_k: int | None = None, output: str = "probabilities",
              api_key: str | None = None, max_batch: int = MAX_BATCH,
              max_body_bytes: int = MAX_BODY_BYTES, page: bool = True) -> FastAPI:
    """The FastAPI application that serves ``model``.

    Args:
        model: a classifier taking [0, 1] images (N, *input_shape), returning logits.
        input_shape: (C, H, W) of one image; requests of another shape are refused.
        mode: ``"scores"`` (every class), ``"top-k"`` (the ``top_k`` highest with their
            classes) or ``"label"`` (the top-1 label only).
        output: scores as ``"probabilities"`` (softmax, what deployed APIs show) or
            ``"logits"``.
        api_key: if given, every request must carry ``Authorization: Bearer KEY``.
        max_batch: images per request; max_body_bytes: bytes per request body.
        page: serve the page to try an attack (``GET /``, ``POST /try/attack``).

    The model runs where its parameters are (``advkit.models.load(..., map_location=)``).

    The application's ``state.stats`` is its :class:`Stats`, also at ``GET /stats``; the
    page's runs count in its ``page_runs`` and ``page_images``, not in ``images``.
    """
    if mode not in SERVES:
        raise ValueError(f"mode must be one of {', '.join(SERVES)} (got {mode!r})")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)} (got {output!r})")
    if (mode == "top-k") != (top_k is not None):
        raise ValueError("top_k goes with mode 'top-k', and mode 'top-k' needs top_k "
                         f"(got mode={mode!r}, top_k={top_k!r})")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k})")
    if max_batch < 1 or max_body_bytes < 1:
        raise ValueError(f"max_batch and max_body_bytes must be >= 1 (got {max_batch}, "
                         f"{max_body_bytes})")
    input_shape = tuple(input_shape)
    model = model.eval()
    device = device_of(model)
    try:
        with torch.no_grad():
            probe = model(torch.zeros(1, *input_shape, device=device))
    except Exception as err:  # the model's own error, whatever its type
        raise ValueError(f"the model does not take images of shape (N, "
                         f"{', '.join(map(str, input_shape))}): {err}; give the right "
                         "input shape") from err
    if probe.dim() != 2:
        raise ValueError(f"the model must return scores (N, classes) (got shape "
                         f"{tuple(probe.shape)})")
    classes = probe.shape[1]
    from advkit.models import fingerprint

    # The weights' fingerprint lets a client tell that the same model still answers (an
    # evaluation resumed against this endpoint checks it).
    info = {"advkit": __version__, "model_fingerprint": fingerprint(model),
            "serves": mode, "output": output if mode != "label" else None,
            "top_k": top_k, "classes": classes, "input_shape": list(input_shape),
            "max_batch": max_batch, "max_body_bytes": max_body_bytes}
    stats = Stats()
    expected = f"Bearer {api_key}".encode() if api_key else None

    app = FastAPI(title="advkit serve", version=__version__,
                  description="A classifier as a black box: POST /predict, GET /info, "
                              "GET /stats.")
    app.state.stats = stats

    @app.exception_handler(_Refused)
    async def refused(request: Request, err: _Refused) -> JSONResponse:
        stats.refuse()
        log.warning("refused %s %s with %d: %s", request.method, request.url.path,
                    err.status, err)
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse({"detail": str(err)}, status_code=err.status, headers=headers)

    def authorise(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        # compare_digest: the time taken does not say how much of the key was right.
        if expected is not None and not hmac.compare_digest(given, expected):
            raise _Refused(401, "missing or wrong API key: send the header "
                                "'Authorization: Bearer KEY'")

    @app.get("/info")
    async def get_info(request: Request) -> dict:
        authorise(request)
        return info

    @app.get("/stats")
    async def get_stats(request: Request) -> dict:
        authorise(request)
        return stats.as_dict()

    # Retries by idempotency key: the answers of the last REPLAYS requests, and the requests
    # being answered now (a retry of one waits for its first answer).
    answered: OrderedDict[str, dict] = OrderedDict()
    running: dict[str, asyncio.Future] = {}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        authorise(request)
        key = _idempotency_key(request)
        while key is not None and key in running:
            first = await asyncio.shield(running[key])
            if first is not None:  # else the first try failed: this one answers itself
                stats.replay()
                return first
        if key is not None and key in answered:
            stats.replay()
            return answered[key]
        if key is not None:
            running[key] = asyncio.get_running_loop().create_future()
        answer = None
        try:
            body = await _read_body(request, max_body_bytes)
            x = _parse_images(body, input_shape, max_batch)
            # In a worker thread: the event loop keeps reading other requests meanwhile.
            answer = await run_in_threadpool(_answer, model, x.to(device), mode, top_k, output)
            total = stats.answered(x.shape[0])
            log.info("answered %d images (%d in all)", x.shape[0], total)
            return answer
        finally:
            if key is not None:
                running.pop(key).set_result(answer)
                if answer is not None:
                    answered[key] = answer
                    while len(answered) > REPLAYS:
                        answered.popitem(last=False)

    if page:
        _add_page(app, model, input_shape, device, mode=mode, top_k=top_k, output=output,
                  api_key=api_key, authorise=authorise, max_body_bytes=max_body_bytes)
    return app


def _add_page(app: FastAPI, model: nn.Module, input_shape: tuple[int, ...],
              device: torch.device, *, mode: str, top_k: int | None, output: str,
              api_key: str | None, authorise: Callable[[Request], None],
              max_body_bytes: int) -> None:
    from fastapi.responses import HTMLResponse

    from advkit.serving_page import Page, TooLarge

    page = Page(model, input_shape, device, mode=mode, top_k=top_k, output=output,
                api_key=api_key is not None)
    stats: Stats = app.state.stats
    # One run at a time: a run may take seconds, and /predict must keep answering.
    one_run = threading.Lock()

    # The page itself is public (a browser cannot send a key when it opens a page); it holds
    # no answer of the model. Every run wants the key, typed into the page.
    @app.get("/", response_class=HTMLResponse)
    async def get_page() -> str:
        return page.html

    @app.post("/try/attack")
    async def try_attack(request: Request) -> dict:
        authorise(request)
        body = await _read_body(request, max_body_bytes)
        try:
            wanted = json.loads(body, parse_constant=_no_constants)
        except ValueError as err:
            raise _Refused(400, f"the body is not valid JSON ({err}); send {{\"image\": ..., "
                                "\"attack\": ..., \"budget\": ..., \"eps\": ...}") from None
        if not isinstance(wanted, dict):
            raise _Refused(422, "send a JSON object: {\"image\": ..., \"attack\": ..., "
                                "\"budget\": ..., \"eps\": ...}")
        if not one_run.acquire(blocking=False):
            raise _Refused(429, "another attack from the page is running; try again when it "
                                "has finished")
        try:
            answer = await run_in_threadpool(page.run, wanted)
        except TooLarge as err:
            raise _Refused(413, str(err)) from None
        except ValueError as err:
            raise _Refused(422, str(err)) from None
        finally:
            one_run.release()
        stats.tried(answer["server_queries"])
        log.info("page: %s on one image, %d queries", answer["attack"], answer["server_queries"])
        return answer


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
        raise _Refused(400, f"the Idempotency-Key header must be 1 to {MAX_KEY_LENGTH} "
                            "characters (one per request, the same on every try of it)")
    return key


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass ``limit`` bytes: from its
    declared length before reading, or while reading a body sent in chunks."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Refused(413, f"the body is {declared} bytes, over the limit of {limit}; send "
                            "fewer images per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Refused(413, f"the body passed the limit of {limit} bytes; send fewer "
                                "images per request")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a valid input value (images hold finite values in "
                     "[0, 1])")


def _parse_images(body: bytes, input_shape: tuple[int, ...], max_batch: int) -> Tensor:
    usage = ('send {"inputs": [...]}: images (N, ' + ", ".join(map(str, input_shape))
             + ") in [0, 1] as nested lists")
    try:
        payload = json.loads(body, parse_constant=_no_constants)
    except ValueError as err:  # JSONDecodeError, and NaN / Infinity
        raise _Refused(400, f"the body is not valid JSON ({err}); {usage}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise _Refused(422, f"no 'inputs' in the body; {usage}")
    try:
        x = torch.tensor(payload["inputs"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise _Refused(422, f"inputs is not an array of numbers ({err}); {usage}") from None
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape:
        raise _Refused(422, f"inputs has shape {tuple(x.shape)}; {usage}")
    if x.shape[0] == 0:
        raise _Refused(422, f"inputs holds no image; {usage}")
    if x.shape[0] > max_batch:
        raise _Refused(413, f"{x.shape[0]} images, over the limit of {max_batch} per request; "
                            "send them in several requests")
    if not torch.isfinite(x).all():
        raise _Refused(422, f"inputs holds {int((~torch.isfinite(x)).sum())} NaN or inf "
                            "values; images hold finite values in [0, 1]")
    if x.min() < 0 or x.max() > 1:
        raise _Refused(422, f"inputs has values outside [0, 1] (min {float(x.min()):.4g}, max "
                            f"{float(x.max()):.4g}); scale images to [0, 1]")
    return x


def _answer(model: nn.Module, x: Tensor, mode: str, top_k: int | None,
            output: str) -> dict[str, list]:
    with torch.no_grad():
        logits = model(x)
    if not torch.isfinite(logits).all():
        # A server fault, not the client's: answered as 500 by the framework.
        raise RuntimeError("the model returned NaN or inf scores")
    if mode == "label":
        return {"labels": logits.argmax(1).tolist()}
    # Softmax in float64: float32 flushes a probability below 1e-45 (a logit gap of 103, seen
    # on confident models) to 0, and a score-based attack reads log 0 = -inf, a flat margin.
    scores = logits.double().softmax(1) if output == "probabilities" else logits
    if mode == "scores":
        return {"scores": scores.tolist()}
    top = scores.topk(min(top_k, scores.shape[1]), dim=1)
    return {"classes": top.indices.tolist(), "scores": top.values.tolist()}


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"serving on {host} makes the model reachable from other machines: "
                         "give it an API key (--api-key, or the ADVKIT_API_KEY environment "
                         "variable), or serve on 127.0.0.1")


def _config(app: FastAPI, host: str, port: int, log_level: str):
    import uvicorn

    # access_log off: the server logs what it answered and refused itself.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=5)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted (``api_key``: the app's key, checked by
    :func:`check_exposure` for a host beyond loopback)."""
    import uvicorn

    check_exposure(host, api_key)
    uvicorn.Server(_config(app, host, port, log_level)).run()


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *,
            log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its URL
    (``http://host:port``; port 0 picks a free one) and stops the server on exit."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on connections whose listening socket says
    # IPPROTO_TCP; with proto 0, Nagle's algorithm and delayed ACKs add 40 ms per answer.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(_config(app, host, port, log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="advkit-serve")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.01)
    bound = sock.getsockname()[1]
    try:
        yield f"http://[{host}]:{bound}" if family == socket.AF_INET6 else f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
