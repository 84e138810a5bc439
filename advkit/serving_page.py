"""The page ``advkit serve`` shows at ``GET /``: try a black-box attack on the served model.

Pick a bundled MNIST test image (when the model takes 1x28x28 images) or upload a PNG or
JPEG, pick an attack, a query budget and eps, and see the clean and the adversarial image
side by side with the server's predictions, confidences and the queries spent: the
"panda to gibbon" picture, live, against this very endpoint.

The attack runs on the server (``POST /try/attack``, see :mod:`advkit.serving`) through the
access the endpoint itself serves: :func:`advkit.models.scores_only` (with its ``top_k``)
or, for ``--mode label``, :func:`advkit.models.labels_only`; so a label-only server offers
only the decision-based attack, and the queries shown are the ones a remote attacker would
pay. The model is reached through a counting door (:class:`_Counted`), the server's own
count, independent of the attack's: the page shows both, and they agree.

Bounded so that one visitor cannot hog the server: at most :data:`MAX_QUERIES` queries per
run, one image per run, one run at a time (the server answers 429 meanwhile), and an upload
of at most :data:`MAX_UPLOAD_BYTES` bytes and :data:`MAX_UPLOAD_PIXELS` pixels (checked
from the header, before Pillow decodes the pixels).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2
import torch
from PIL import Image
from torch import Tensor, nn

from advkit.attacks import HopSkipJump, SimBA, Square
from advkit.attacks.base import Attack
from advkit.models import labels_only, scores_only
from advkit.models.access import LABELS, SCORES, ModelAccess
from advkit.report.images import amplified_perturbation, png_data_uri
from advkit.threat import ThreatModel

#: Queries per run, at most: SimBA spends them in about 10 s on one CPU core for MNIST.
MAX_QUERIES = 5000
MIN_QUERIES = 10
#: An upload's encoded size and its pixels (width x height; Pillow reads them from the
#: header, so a decompression bomb is refused before it is decoded).
MAX_UPLOAD_BYTES = 2 * 2 ** 20
MAX_UPLOAD_PIXELS = 4096 * 4096
#: Bundled MNIST test images offered when the model takes MNIST's shape.
SAMPLES = 10
_MNIST_SHAPE = (1, 28, 28)


class TooLarge(ValueError):
    """An upload over the size limits (the server answers 413)."""


@dataclass(frozen=True)
class PageAttack:
    """An attack the page offers: its norm, default eps, the access it needs, and how to
    build it for a per-sample query budget (the access budget, which counts the attack's
    entry check and final success pass too)."""

    title: str
    norm: str
    eps: float
    access: str
    build: Callable[[ThreatModel, int], Attack]


ATTACKS = {
    # Square spends at most n_queries + 2 (the first look and the success pass).
    "square": PageAttack("Square (Linf, scores)", "linf", 0.3, SCORES,
                         lambda threat, budget: Square(threat, n_queries=budget - 2)),
    # SimBA and HopSkipJump count the first look in max_queries; the success pass is one more.
    "simba": PageAttack("SimBA-DCT (L2, scores)", "l2", 3.0, SCORES,
                        lambda threat, budget: SimBA(threat, max_queries=budget - 1)),
    "hopskipjump": PageAttack("HopSkipJump (L2, labels only)", "l2", 3.0, LABELS,
                              lambda threat, budget: HopSkipJump(threat,
                                                                 max_queries=budget - 1)),
}


class _Counted:
    """The served model as a scorer (no gradient), counting every image it answers."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device, self.images = model, device, 0

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            scores = self.model(x.to(self.device)).cpu()
        self.images += x.shape[0]
        return scores


class Page:
    """The page and its attack runs for one served model (see the module docstring)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], device: torch.device, *,
                 mode: str, top_k: int | None, output: str, api_key: bool) -> None:
        self.model, self.input_shape, self.device = model, input_shape, device
        self.mode, self.top_k, self.output = mode, top_k, output
        level = LABELS if mode == "label" else SCORES
        self.attacks = {name: attack for name, attack in ATTACKS.items()
                        if attack.access == LABELS or level == SCORES}
        self.samples: tuple[Tensor, Tensor] | None = None
        if tuple(input_shape) == _MNIST_SHAPE:
            from advkit import data

            self.samples = data.load("mnist", split="test", limit=SAMPLES)
        self.html = _render(self, api_key)

    def access(self, door: _Counted, budget: int) -> ModelAccess:
        """The endpoint's own access level, capped at ``budget`` queries per sample."""
        if self.mode == "label":
            return labels_only(door, budget=budget)
        return scores_only(door, top_k=self.top_k, budget=budget)

    def image(self, given: Any) -> tuple[Tensor, int | None]:
        """The image a request names: a bundled sample's index, or an uploaded PNG/JPEG as
        a data URL (or bare base64); with its true label where known."""
        if isinstance(given, int) and not isinstance(given, bool):
            if self.samples is None:
                raise ValueError(f"this model takes {_shape(self.input_shape)} images, not "
                                 "MNIST's, so no sample is bundled: upload an image")
            if not 0 <= given < len(self.samples[0]):
                raise ValueError(f"image must be a sample from 0 to "
                                 f"{len(self.samples[0]) - 1}, or an uploaded image (got "
                                 f"{given})")
            return self.samples[0][given:given + 1], int(self.samples[1][given])
        if isinstance(given, str):
            return decode_image(given, self.input_shape)[None], None
        raise ValueError("image must be a sample's index or a PNG/JPEG data URL (got "
                         f"{type(given).__name__})")

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one attack request (``image``, ``attack``, ``budget``, ``eps``) and answer
        what the page shows. Bad requests raise ValueError (TooLarge for uploads over
        the limits) with a message that says what to send."""
        name = request.get("attack")
        if name not in self.attacks:
            served = "labels only" if self.mode == "label" else "scores"
            raise ValueError(f"unknown attack {name!r}: this server ({served}) offers "
                             f"{', '.join(self.attacks)}")
        attack = self.attacks[name]
        budget = request.get("budget")
        if isinstance(budget, bool) or not isinstance(budget, int) or not (
                MIN_QUERIES <= budget <= MAX_QUERIES):
            raise ValueError(f"budget must be a whole number of queries from {MIN_QUERIES} "
                             f"to {MAX_QUERIES} (got {budget!r})")
        eps = request.get("eps")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not (
                math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a number > 0 (got {eps!r})")
        threat = ThreatModel(attack.norm, float(eps))  # its own errors name the bound
        x, truth = self.image(request.get("image"))

        start = time.perf_counter()
        door = _Counted(self.model, self.device)
        clean = self._look(door, x)
        result = attack.build(threat, budget)(self.access(door, budget), x,
                                              torch.tensor([clean[0]]))
        adversarial = self._look(door, result.x_adv)
        perturbation, peak = amplified_perturbation(x[0], result.x_adv[0])
        return {
            "attack": name, "title": attack.title, "norm": attack.norm, "eps": float(eps),
            "budget": budget, "true_label": truth,
            "clean": {"image": png_data_uri(x[0]), "label": clean[0], "confidence": clean[1]},
            "adversarial": {"image": png_data_uri(result.x_adv[0]), "label": adversarial[0],
                            "confidence": adversarial[1]},
            "perturbation": {"image": png_data_uri(perturbation), "peak": peak},
            "success": bool(result.success[0]), "distance": float(result.norms[0]),
            "attack_queries": int(result.queries[0]), "server_queries": door.images,
            "seconds": round(time.perf_counter() - start, 3),
        }

    def _look(self, door: _Counted, x: Tensor) -> tuple[int, float | None]:
        """The label and confidence the endpoint would answer for ``x``: one query."""
        scores = door(x)[0]
        label = int(scores.argmax())
        if self.mode == "label":
            return label, None
        shown = scores.softmax(0) if self.output == "probabilities" else scores
        return label, float(shown[label])


def decode_image(text: str, input_shape: tuple[int, ...]) -> Tensor:
    """An uploaded PNG or JPEG (a data URL or bare base64) as a (C, H, W) image in [0, 1],
    converted to the model's channels and resized to its height and width."""
    channels, height, width = input_shape
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels}-channel images; uploads work for "
                         "1 (grey) or 3 (RGB) channels only")
    encoded = text.partition(",")[2] if text.startswith("data:") else text
    if len(encoded) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise TooLarge(f"the image is over {MAX_UPLOAD_BYTES // 2 ** 20} MiB; upload a "
                       "smaller one")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image is not valid base64; send a PNG or JPEG as a data URL "
                         "(data:image/png;base64,...)") from None
    try:
        picture = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG"))
    except (OSError, Image.DecompressionBombError):
        raise ValueError("the image is not a PNG or JPEG that Pillow can read; upload a "
                         "PNG or JPEG") from None
    if picture.width * picture.height > MAX_UPLOAD_PIXELS:
        raise TooLarge(f"the image has {picture.width}x{picture.height} pixels, over "
                       f"{MAX_UPLOAD_PIXELS:,}; upload a smaller one")
    try:
        picture = picture.convert("L" if channels == 1 else "RGB")
        picture = picture.resize((width, height), Image.Resampling.BILINEAR)
    except (OSError, ValueError):  # a truncated or corrupt file fails when decoded
        raise ValueError("the image could not be decoded; upload a complete PNG or JPEG") \
            from None
    pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, channels).permute(2, 0, 1).float() / 255


def _shape(input_shape: tuple[int, ...]) -> str:
    return "x".join(map(str, input_shape))


def _render(page: Page, api_key: bool) -> str:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    samples = [] if page.samples is None else [
        {"index": i, "label": int(label), "image": png_data_uri(image)}
        for i, (image, label) in enumerate(zip(*page.samples, strict=True))]
    return environment.from_string(_TEMPLATE).render(
        attacks=page.attacks, samples=samples, api_key=api_key, shape=_shape(page.input_shape),
        max_queries=MAX_QUERIES, min_queries=MIN_QUERIES,
        max_upload_mib=MAX_UPLOAD_BYTES // 2 ** 20)


# Self-contained: no external script, style or font (the page must work offline).
_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>advkit serve: try an attack</title>
<style>
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 60em; }
fieldset { border: 1px solid #ccc; margin-bottom: 1em; }
.samples label { display: inline-block; text-align: center; margin: 0.2em; }
.samples img { width: 56px; display: block; }
img { image-rendering: pixelated; }
.pictures { display: flex; gap: 2em; align-items: flex-start; }
.pictures figure { margin: 0; text-align: center; }
.pictures img { width: 224px; height: 224px; border: 1px solid #aaa; }
.prediction { font-size: 1.4em; font-weight: bold; }
#error { color: #b00; font-weight: bold; }
.note { color: #555; font-size: 0.9em; }
</style></head>
<body>
<h1>Try a black-box attack on this model</h1>
<p class="note">The attack runs on the server, through the same access this endpoint
serves, so the queries shown are the ones a remote attacker would pay. At most
{{ max_queries }} queries a run, one run at a time.</p>
<form id="form">
<fieldset><legend>Image ({{ shape }})</legend>
{% if samples %}<div class="samples">{% for s in samples %}
<label><img src="{{ s.image }}" alt="MNIST test image {{ s.index }}">
<input type="radio" name="image" value="{{ s.index }}"{% if loop.first %} checked{% endif %}>
{{ s.label }}</label>{% endfor %}</div>{% endif %}
<label>or upload a PNG/JPEG (at most {{ max_upload_mib }} MiB):
<input type="file" id="upload" accept="image/png,image/jpeg"></label>
</fieldset>
<fieldset><legend>Attack</legend>
<label>attack <select id="attack">{% for name, a in attacks.items() %}
<option value="{{ name }}" data-eps="{{ a.eps }}">{{ a.title }}</option>{% endfor %}
</select></label>
<label>query budget <input id="budget" type="number" min="{{ min_queries }}"
max="{{ max_queries }}" value="1000"></label>
<label>eps <input id="eps" type="number" step="any" min="0" value="0.3"></label>
{% if api_key %}<label>API key <input id="key" type="password" autocomplete="off"></label>
{% endif %}<button type="submit" id="run">Run</button>
</fieldset></form>
<p id="status" class="note"></p><p id="error"></p>
<div id="result" hidden>
<div class="pictures">
<figure><img id="clean-image" alt="clean image"><figcaption>clean:
<span class="prediction" id="clean-label"></span> <span id="clean-confidence"></span>
<br><span id="true-label"></span></figcaption></figure>
<figure><img id="perturbation-image" alt="perturbation, amplified"><figcaption>perturbation
(amplified, largest change <span id="peak"></span>)</figcaption></figure>
<figure><img id="adversarial-image" alt="adversarial image"><figcaption>adversarial:
<span class="prediction" id="adversarial-label"></span>
<span id="adversarial-confidence"></span></figcaption></figure>
</div>
<p><span id="verdict"></span>; distance <span id="distance"></span>;
queries: <strong id="server-queries"></strong> answered by the server for this run
(the attack counted <span id="attack-queries"></span> of its budget of
<span id="budget-shown"></span>, plus one look at each image shown); <span id="seconds"></span> s.
</p></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const attack = $("attack");
attack.addEventListener("change", () => {
  $("eps").value = attack.selectedOptions[0].dataset.eps;
});
function readUpload(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("could not read " + file.name));
    reader.readAsDataURL(file);
  });
}
function confidence(value) {
  return value === null ? "(labels only)" : "(" + (100 * value).toFixed(1) + "%)";
}
async function run() {
  $("error").textContent = "";
  $("status").textContent = "running...";
  $("run").disabled = true;
  try {
    const upload = $("upload").files[0];
    const chosen = document.querySelector("input[name=image]:checked");
    const image = upload ? await readUpload(upload) : (chosen ? Number(chosen.value) : null);
    const headers = {"Content-Type": "application/json"};
    if ($("key") && $("key").value) headers["Authorization"] = "Bearer " + $("key").value;
    const answer = await fetch("try/attack", {method: "POST", headers: headers,
      body: JSON.stringify({image: image, attack: attack.value,
                            budget: Number($("budget").value), eps: Number($("eps").value)})});
    const body = await answer.json();
    if (!answer.ok) throw new Error(body.detail || answer.statusText);
    show(body);
    $("status").textContent = "";
  } catch (err) {
    $("status").textContent = "";
    $("error").textContent = err.message;
  } finally {
    $("run").disabled = false;
  }
}
function show(r) {
  for (const side of ["clean", "adversarial"]) {
    $(side + "-image").src = r[side].image;
    $(side + "-label").textContent = r[side].label;
    $(side + "-confidence").textContent = confidence(r[side].confidence);
  }
  $("perturbation-image").src = r.perturbation.image;
  $("peak").textContent = r.perturbation.peak.toFixed(3);
  $("true-label").textContent = r.true_label === null ? "" : "true label " + r.true_label;
  $("verdict").textContent = (r.success ? "the attack succeeded" : "the attack failed")
    + " (" + r.title + ", eps " + r.eps + ")";
  $("distance").textContent = r.norm + " " + r.distance.toFixed(3);
  $("server-queries").textContent = r.server_queries;
  $("attack-queries").textContent = r.attack_queries;
  $("budget-shown").textContent = r.budget;
  $("seconds").textContent = r.seconds;
  $("result").hidden = false;
}
$("form").addEventListener("submit", (event) => { event.preventDefault(); run(); });
// Choices in the address (?image=3&attack=square&budget=500&eps=0.3&run=1): a link to a
// run, and a way for a headless browser to press Run.
const wanted = new URLSearchParams(location.search);
if (wanted.has("attack")) {
  attack.value = wanted.get("attack");
  attack.dispatchEvent(new Event("change"));
}
for (const field of ["budget", "eps"]) if (wanted.has(field)) $(field).value = wanted.get(field);
if (wanted.has("image")) {
  const value = CSS.escape(wanted.get("image"));
  const radio = document.querySelector("input[name=image][value='" + value + "']");
  if (radio) radio.checked = true;
}
if (wanted.get("run") === "1") run();
</script>
</body></html>
"""
