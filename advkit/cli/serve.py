"""``advkit serve MODEL``: a model behind an HTTP endpoint, as the black box to attack
(see :mod:`advkit.serving`; attack it with ``advkit.models.remote(URL)``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from advkit.cli._common import (
    DeviceOpt,
    JsonOpt,
    TrustOpt,
    console,
    fail,
    resolve_device,
)


def serve(
    model: Annotated[str, typer.Argument(
        help="advkit checkpoint, .onnx, TorchScript, module:factory, or zoo name")],
    host: Annotated[str, typer.Option(
        help="address to listen on; anything but loopback needs an API key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    mode: Annotated[str, typer.Option(
        help="what a query gets: scores (every class), top-k, or label")] = "scores",
    top_k: Annotated[int | None, typer.Option(help="with --mode top-k: scores shown")] = None,
    output: Annotated[str, typer.Option(
        help="scores as probabilities (softmax) or logits")] = "probabilities",
    api_key: Annotated[str | None, typer.Option(
        envvar="ADVKIT_API_KEY", show_envvar=True,
        help="require 'Authorization: Bearer KEY' on every request (prefer the environment "
             "variable: a command line is visible to other users)")] = None,
    max_batch: Annotated[int, typer.Option(help="images per request")] = 256,
    max_body_bytes: Annotated[int, typer.Option(
        help="bytes per request body; larger bodies get 413")] = 16 * 2 ** 20,
    input_shape: Annotated[str | None, typer.Option(
        help="C,H,W of one image (default: from an advkit checkpoint or zoo name)")] = None,
    page: Annotated[bool, typer.Option(
        help="serve the page to try an attack at / (pick an image, an attack, a budget)")
    ] = True,
    trust: TrustOpt = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Serve a model over HTTP on loopback: POST /predict, GET /info, GET /stats (the
    server's own query count), and a page at / to try an attack on it in a browser. Attack
    it with advkit.models.remote("http://HOST:PORT")."""
    from advkit import models
    from advkit.serving import build_app, check_exposure
    from advkit.serving import serve as run_server

    check_exposure(host, api_key)  # before loading anything
    device = resolve_device(device)
    net = models.load(model, trust=trust, map_location=device)
    shape = _input_shape(model, input_shape)
    app = build_app(net, shape, mode=mode, top_k=top_k, output=output, api_key=api_key,
                    max_batch=max_batch, max_body_bytes=max_body_bytes, page=page)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = f"http://{host}:{port}"
    if as_json:  # one line a script can read before the server takes over the terminal
        print(json.dumps({"url": url, "model": model, "serves": mode, "top_k": top_k,
                          "output": None if mode == "label" else output,
                          "api_key": bool(api_key), "page": f"{url}/" if page else None}),
              flush=True)
    what = f"{mode} {top_k}" if mode == "top-k" else mode
    console.print(f"serving {model} ({what}{'' if mode == 'label' else ', ' + output}) on "
                  f"{url}: POST /predict, GET /info, GET /stats"
                  f"{'; API key required' if api_key else ''}")
    if page:
        console.print(f"try an attack in a browser: {url}/")
    run_server(app, host, port, api_key=api_key)


def _input_shape(model: str, given: str | None) -> tuple[int, ...]:
    """``--input-shape``, or the architecture's input shape for an advkit checkpoint or a
    zoo name (other formats do not record it)."""
    from advkit.models import ARCHITECTURES, read_metadata

    if given is not None:
        try:
            shape = tuple(int(part) for part in given.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise fail(f"--input-shape must be C,H,W, three sizes >= 1 (got {given!r})")
        return shape
    path = Path(model)
    arch = model.partition("-")[0]
    if path.suffix == ".safetensors" and path.is_file():
        arch = read_metadata(path).get("architecture", "")
    if arch in ARCHITECTURES:
        return tuple(ARCHITECTURES[arch].input_shape)
    raise fail(f"cannot tell the input shape of {model}: pass --input-shape C,H,W "
               "(1,28,28 for MNIST, 3,32,32 for CIFAR-10)")
