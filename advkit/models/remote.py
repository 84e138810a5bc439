"""A remote prediction endpoint as a black box: an HTTP client that counts exactly.

:func:`remote` asks the endpoint what it serves (``GET /info``) and returns the access
object that matches: :class:`~advkit.models.access.ScoresOnly` for all scores or the top
k, :class:`~advkit.models.access.LabelsOnly` for a label. Attacks use it as they use a
local model; the Oracle counts and budgets its queries the same way. Gradients cannot be
read through HTTP: asking for them is an :class:`~advkit.models.access.AccessError`.

The protocol (what ``advkit serve`` speaks):

- ``GET /info``: ``{"serves": "scores" | "top-k" | "label", "output": "probabilities" |
  "logits", "top_k": k or null, "classes": C, "input_shape": [C, H, W], "max_batch": B,
  "max_body_bytes": M}``.
- ``POST /predict`` with ``{"inputs": [...]}``, images (N, C, H, W) in [0, 1] as nested
  lists, N <= B, the body at most M bytes. The answer: ``{"scores": (N, C)}`` for scores;
  ``{"classes": (N, k), "scores": (N, k)}`` for the top k; ``{"labels": (N,)}`` for labels.
- An API key, if the endpoint has one, goes in ``Authorization: Bearer KEY``.

Reliability: each request has a timeout; a request that times out, cannot connect, gets a
5xx answer or an answer that is garbage (wrong shape, NaN, probabilities that do not sum
to 1, classes or labels out of range) is tried again after an exponential backoff; a 4xx
answer is not (the request itself is wrong) and raises at once with the server's message.
A query counts once when answered, however many tries it took; a query left unanswered
after the last try raises :class:`RemoteError`, which says how many were unanswered.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
import uuid
import warnings
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor

from advkit.models.access import AccessError, LabelsOnly, ScoresOnly, check_budget

#: What an endpoint may serve, and how it may give scores.
SERVES = ("scores", "top-k", "label")
OUTPUTS = ("probabilities", "logits")
#: How far a row of probabilities may sum from 1 (float32 softmax rounding, decimal JSON).
SUM_TOLERANCE = 1e-3


class RemoteError(OSError):
    """A remote endpoint did not answer, refused a request, or answered garbage."""


class _Garbage(ValueError):
    """An answer that cannot be what the endpoint promised (retried, then reported)."""


class Endpoint:
    """An HTTP prediction endpoint as a :class:`~advkit.models.access.Scorer`.

    Called with images (N, C, H, W), it sends them in batches of at most ``batch_size``
    (and the endpoint's own limits), checks every answer against what ``GET /info``
    promised, and returns scores (N, classes) on the images' device: logits, or the
    logarithms of probabilities; ``-inf`` where a score is hidden (outside the top k, a
    probability of 0; for a label endpoint, every class but the label, which scores 0).

    ``answered`` counts the images answered (each once); ``sent`` the images sent, tries
    again included; ``failed_tries`` the HTTP tries that failed or answered garbage.
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.25, batch_size: int | None = None) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https:// (got {url!r})")
        host = urlsplit(url).hostname or ""
        if api_key and url.startswith("http://") and not is_loopback(host):
            warnings.warn(f"the API key goes to {host} in clear text over http://: anyone on "
                          "the way can read it; use https://", stacklevel=3)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds (got {timeout})")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0 (got {retries!r})")
        if not backoff >= 0:
            raise ValueError(f"backoff must be >= 0 seconds (got {backoff})")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 images per request (got {batch_size})")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=self.timeout, headers=headers)
        self.answered = self.sent = self.failed_tries = 0
        try:
            info = self._try(lambda: self._http.get(f"{self.url}/info"), self._read_info,
                             "GET /info")
        except BaseException:
            self._http.close()
            raise
        self.serves: str = info["serves"]
        #: What the server says of its weights (advkit serve sends it; None if not sent).
        self.model_fingerprint: str | None = info.get("model_fingerprint")
        self.output: str | None = info.get("output")
        self.top_k: int | None = info.get("top_k")
        self.classes: int = info["classes"]
        self.input_shape: tuple[int, ...] = tuple(info["input_shape"])
        self.max_body_bytes: int = info["max_body_bytes"]
        self.batch_size: int = min(batch_size or info["max_batch"], info["max_batch"])

    # -- the scorer ----------------------------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise ValueError(f"{self.url} takes images of shape (N, {shape}) (got "
                             f"{tuple(x.shape)})")
        images = x.detach().to("cpu", torch.float32)
        done = 0
        parts = []
        try:
            for start in range(0, images.shape[0], self.batch_size):
                for batch in self._bodies(images[start:start + self.batch_size]):
                    parts.append(self._predict(*batch))
                    done += batch[1]
        except RemoteError as err:
            missing = images.shape[0] - done
            raise RemoteError(f"{missing} of {images.shape[0]} queries went unanswered "
                              f"({done} answered, counted in Endpoint.answered): {err}") from err
        return torch.cat(parts).to(x.device)

    def _bodies(self, images: Tensor) -> list[tuple[bytes, int]]:
        """The request bodies for ``images``: halved until each fits the endpoint's limit."""
        body = json.dumps({"inputs": images.tolist()}).encode()
        if len(body) <= self.max_body_bytes:
            return [(body, images.shape[0])]
        if images.shape[0] == 1:
            raise ValueError(f"one image is {len(body)} bytes as JSON, over the endpoint's "
                             f"limit of {self.max_body_bytes} bytes per request")
        half = images.shape[0] // 2
        return self._bodies(images[:half]) + self._bodies(images[half:])

    def _predict(self, body: bytes, n: int) -> Tensor:
        # One key for every try of this request: a server that answered a try the client
        # gave up on answers the retry with that answer and counts its images once.
        headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
        scores = self._try(lambda: self._http.post(f"{self.url}/predict", content=body,
                                                   headers=headers),
                           lambda answer: self._read_scores(answer, n), f"{n} images", n)
        self.answered += n
        return scores

    # -- tries, backoff, errors ----------------------------------------------------------
    def _try(self, send, read, what: str, n: int = 0) -> Any:
        """``read(send().json())``, tried up to ``retries + 1`` times; a timeout, a failed
        connection, a 5xx or garbage is tried again, a 4xx raises at once."""
        import httpx

        failures = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.sent += n
            try:
                response = send()
            except httpx.TimeoutException:
                failures.append(f"timed out after {self.timeout:g} s")
            except httpx.TransportError as err:
                failures.append(f"could not reach it ({type(err).__name__}: {err})")
            else:
                if 400 <= response.status_code < 500:
                    raise RemoteError(f"{self.url} refused {what} with {response.status_code}: "
                                      f"{_detail(response)}{_HINTS.get(response.status_code, '')}")
                if response.status_code >= 500:
                    failures.append(f"answered {response.status_code}: {_detail(response)}")
                elif response.status_code != 200:
                    failures.append(f"answered {response.status_code}, not 200")
                else:
                    try:
                        return read(response.json())
                    except ValueError as err:  # _Garbage, or a body that is not JSON
                        failures.append(f"answered garbage: {err}")
            self.failed_tries += 1
        raise RemoteError(f"{self.url} failed {what} {len(failures)} times "
                          f"({'; '.join(failures)}); check that it is up, or give it a longer "
                          "timeout= or more retries=")

    # -- what an answer must be ----------------------------------------------------------
    @staticmethod
    def _read_info(info: Any) -> dict:
        def bad(why: str) -> _Garbage:
            return _Garbage(f"GET /info is not an advkit endpoint's description: {why}")

        if not isinstance(info, dict):
            raise bad("not a JSON object")
        if info.get("serves") not in SERVES:
            raise bad(f"serves must be one of {', '.join(SERVES)} (got {info.get('serves')!r})")
        if info["serves"] != "label" and info.get("output") not in OUTPUTS:
            raise bad(f"output must be one of {', '.join(OUTPUTS)} (got {info.get('output')!r})")
        if info["serves"] == "top-k" and not _positive_int(info.get("top_k")):
            raise bad(f"a top-k endpoint must say its top_k (got {info.get('top_k')!r})")
        for key in ("classes", "max_batch", "max_body_bytes"):
            if not _positive_int(info.get(key)):
                raise bad(f"{key} must be an integer >= 1 (got {info.get(key)!r})")
        shape = info.get("input_shape")
        if not (isinstance(shape, list) and shape and all(_positive_int(s) for s in shape)):
            raise bad(f"input_shape must be a list of sizes (got {shape!r})")
        return info

    def _read_scores(self, answer: Any, n: int) -> Tensor:
        """The answer as scores (n, classes), or :class:`_Garbage` saying why it is not."""
        if not isinstance(answer, dict):
            raise _Garbage("the answer is not a JSON object")
        if self.serves == "label":
            labels = self._array(answer, "labels", (n,), torch.int64)
            self._check_classes(labels, "labels")
            return torch.full((n, self.classes), -math.inf).scatter(
                1, labels[:, None], 0.0)
        if self.serves == "scores":
            scores = self._array(answer, "scores", (n, self.classes), torch.float64)
            return self._as_log_scores(scores, partial=False)
        k = min(self.top_k, self.classes)
        classes = self._array(answer, "classes", (n, k), torch.int64)
        self._check_classes(classes, "classes")
        if (classes.sort(1).values.diff(1) == 0).any():
            raise _Garbage("a row of classes names one class twice")
        scores = self._as_log_scores(self._array(answer, "scores", (n, k), torch.float64),
                                     partial=k < self.classes)
        return torch.full((n, self.classes), -math.inf).scatter(1, classes, scores)

    def _as_log_scores(self, scores: Tensor, partial: bool) -> Tensor:
        if self.output == "logits":
            if not torch.isfinite(scores).all():
                raise _Garbage("logits with NaN or inf values")
            return scores.float()
        if scores.isnan().any() or (scores < 0).any() or (scores > 1 + SUM_TOLERANCE).any():
            raise _Garbage("probabilities outside [0, 1] (or NaN)")
        sums = scores.double().sum(1)
        wrong = (sums > 1 + SUM_TOLERANCE) if partial else ((sums - 1).abs() > SUM_TOLERANCE)
        if wrong.any():
            row = int(wrong.nonzero()[0])
            raise _Garbage(f"probabilities that do not sum to 1 (row {row} sums to "
                           f"{float(sums[row]):.4g})")
        # log p ranks the classes as the logits do and differs from them by a constant per
        # image, so an attack's margin or cross-entropy is the same as on the logits. The log
        # is taken in float64: a probability of 1e-300 (a logit gap of 690) is a finite score,
        # where float32 would have flushed it to 0 and the margin to inf, a flat objective.
        return scores.clamp_max(1).log().float()

    @staticmethod
    def _array(answer: dict, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if key not in answer:
            raise _Garbage(f"no {key!r} in the answer (keys: {', '.join(map(str, answer))})")
        try:
            values = torch.tensor(answer[key], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise _Garbage(f"{key} is not an array of numbers ({err})") from None
        if tuple(values.shape) != shape:
            raise _Garbage(f"{key} has shape {tuple(values.shape)}, not {shape}")
        if dtype == torch.int64:
            if not torch.isfinite(values).all() or (values != values.round()).any():
                raise _Garbage(f"{key} holds values that are not class indices")
        return values.to(dtype)

    def _check_classes(self, classes: Tensor, key: str) -> None:
        if classes.numel() and (classes.min() < 0 or classes.max() >= self.classes):
            raise _Garbage(f"{key} out of range for {self.classes} classes (min "
                           f"{int(classes.min())}, max {int(classes.max())})")

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    def __repr__(self) -> str:
        k = f" {self.top_k}" if self.serves == "top-k" else ""
        return f"Endpoint({self.url!r}, serves={self.serves}{k})"


_HINTS = {401: " (pass the endpoint's key: api_key=)",
          413: " (send fewer images per request: batch_size=)"}


def _detail(response: Any) -> str:
    """The server's message: FastAPI's ``detail``, or the start of the body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = detail if isinstance(detail, str) else response.text
    return " ".join(str(text).split())[:300] or "(empty body)"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def remote(url: str, api_key: str | None = None, budget: int | None = None, *,
           mode: str | None = None, timeout: float = 10.0, retries: int = 3,
           backoff: float = 0.25, batch_size: int | None = None) -> ScoresOnly | LabelsOnly:
    """A remote prediction endpoint (``advkit serve``, or one speaking its protocol) as a
    black box, at the access level it serves.

    Args:
        url: the endpoint, ``http://host:port``.
        api_key: its key, if it has one (sent as ``Authorization: Bearer``).
        budget: queries per sample of one attack call (as for ``scores_only``).
        mode: the access wanted: None for what the endpoint serves (scores, the top k, or
            labels), ``"labels"`` for labels only from an endpoint that serves more,
            ``"scores"`` to insist on scores. Gradients cannot be read through HTTP.
        timeout: seconds a request may take before it is tried again.
        retries: tries after the first, for a request that timed out, could not connect,
            got a 5xx or a garbage answer; the n-th waits ``backoff * 2**(n-1)`` seconds.
        batch_size: images per request (default and maximum: what the endpoint accepts).

    Raises :class:`RemoteError` when the endpoint does not answer ``GET /info`` (after the
    retries) and :class:`~advkit.models.access.AccessError` when it serves less than
    ``mode`` asks for.
    """
    if mode not in (None, "scores", "labels"):
        if mode == "gradients":
            raise AccessError("gradient access through a remote endpoint is impossible: it "
                              "answers scores or labels over HTTP; use a black-box attack")
        raise ValueError(f"mode must be None (what the endpoint serves), 'scores' or 'labels' "
                         f"(got {mode!r})")
    check_budget(budget)  # before any request
    endpoint = Endpoint(url, api_key=api_key, timeout=timeout, retries=retries,
                        backoff=backoff, batch_size=batch_size)
    if endpoint.serves == "label" and mode == "scores":
        endpoint.close()
        raise AccessError(f"{url} serves labels only: no scores can be read from it; use a "
                          "decision-based attack, or mode='labels'")
    if endpoint.serves == "label" or mode == "labels":
        return LabelsOnly(endpoint, budget=budget)
    return ScoresOnly(endpoint, budget=budget,
                      top_k=endpoint.top_k if endpoint.serves == "top-k" else None)
