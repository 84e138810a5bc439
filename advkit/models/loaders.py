"""``advkit.models.load``: one entry point for every way a model arrives.

Accepted, in the order they are recognised:

* an advkit checkpoint (``.safetensors`` with advkit metadata);
* an ONNX file (``.onnx``), converted to an ``nn.Module`` by onnx2torch so that
  white-box attacks get gradients;
* a TorchScript archive (``torch.jit.save``); TorchScript's loader builds only
  TorchScript objects, it runs no arbitrary Python;
* ``package.module:factory`` plus ``weights=`` (safetensors, or a torch file read
  with ``weights_only=True``);
* a zoo name (``small_cnn``, or ``small_cnn-fashion-mnist``): the trained checkpoint
  ``<arch>-<dataset>.safetensors`` in the model directory (``ADVKIT_MODEL_DIR``, else
  ``~/.cache/advkit/models``), as written by ``advkit train`` and ``advkit demo``;
* a whole pickled module (``torch.save(model)``) only with ``trust=True``: loading
  it runs whatever code the file's author put in it.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import types
import zipfile
from pathlib import Path

import torch
from torch import nn

from advkit.models import checkpoint, zoo

#: ``package.module:factory``. Told apart by shape, not by ``Path.suffix``: the dots of a
#: dotted module name would read as a file extension.
_FACTORY_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def model_dir() -> Path:
    """Where trained zoo models live: ``ADVKIT_MODEL_DIR`` or ``~/.cache/advkit/models``."""
    return Path(os.environ.get("ADVKIT_MODEL_DIR", Path.home() / ".cache" / "advkit" / "models"))


def trained_path(name: str) -> Path:
    """Where ``advkit train`` installs ``arch`` (or ``arch-dataset``): the model directory.

    A bare architecture name means its default data set (MNIST for 1-channel
    architectures, CIFAR-10 for 3-channel ones).
    """
    arch, _, dataset = name.partition("-")
    if not dataset:
        dataset = "mnist" if zoo.ARCHITECTURES[arch].input_shape[0] == 1 else "cifar10"
    return model_dir() / f"{arch}-{dataset}.safetensors"


def load(spec: str | Path, *, weights: str | Path | None = None, trust: bool = False,
         map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a classifier (an ``nn.Module`` taking [0, 1] images, returning logits), in eval mode.

    Args:
        spec: a file path, ``package.module:factory``, or a zoo name (see module docs).
        weights: weights for a ``module:factory`` model.
        trust: allow unpickling arbitrary Python objects (only for files you trust).
        map_location: device to load onto.
    """
    path = Path(spec)
    is_factory = not path.is_file() and _FACTORY_SPEC.fullmatch(str(spec)) is not None
    if path.is_file():
        model = _load_file(path, trust, map_location)
    elif is_factory:
        model = _load_factory(str(spec), weights, trust, map_location)
    elif str(spec).partition("-")[0] in zoo.ARCHITECTURES:
        trained = trained_path(str(spec))
        if not trained.is_file():
            arch, _, dataset = str(spec).partition("-")
            raise FileNotFoundError(
                f"no trained {spec} at {trained}: train one with `advkit train --arch {arch}"
                f"{' --dataset ' + dataset if dataset else ''}` (or `advkit demo` for "
                f"small_cnn); for an untrained model use advkit.models.create({arch!r})"
            )
        model = checkpoint.load_checkpoint(trained, map_location)
    else:
        raise FileNotFoundError(
            f"{spec!r} is neither a file, a 'package.module:factory', nor a zoo name "
            f"({', '.join(zoo.ARCHITECTURES)})"
        )
    if weights is not None and not is_factory:
        checkpoint.load_weights(model, weights, map_location, trust)
    arch = getattr(model, "advkit_metadata", {}).get("architecture")
    if arch in zoo.ARCHITECTURES and zoo.ARCHITECTURES[arch].kind != "classifier":
        raise ValueError(
            f"{spec} holds a {arch} {zoo.ARCHITECTURES[arch].kind}, not a classifier: use it "
            "as a pipeline's reformer (kind = \"reformer\" with autoencoder = its path in a "
            "pipeline file, or advkit.defenses.Reformer(advkit.defenses.magnet."
            "load_autoencoder(path))) and load a classifier here")
    return model.to(map_location).eval()


def _load_file(path: Path, trust: bool, map_location: str | torch.device) -> nn.Module:
    if path.suffix == ".safetensors":
        return checkpoint.load_checkpoint(path, map_location)
    if path.suffix == ".onnx":
        return load_onnx(path)
    if _is_torchscript(path):
        return torch.jit.load(str(path), map_location=map_location)
    obj = checkpoint._torch_load(path, map_location, trust)
    if isinstance(obj, nn.Module):
        return obj
    raise ValueError(
        f"{path} holds weights but no architecture; load it with "
        "advkit.models.load('package.module:factory', weights=path)"
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def _load_factory(spec: str, weights: str | Path | None, trust: bool,
                  map_location: str | torch.device) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import {module_name!r} for {spec!r}: {err}") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no callable {attr!r} (for {spec!r}); name a "
                         "function or class that builds the model: package.module:factory")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        checkpoint.load_weights(model, weights, map_location, trust)
    return model


def load_onnx(path: str | Path) -> nn.Module:
    """Convert an ONNX classifier to an ``nn.Module`` with onnx2torch.

    onnx2torch declares torchvision as a requirement for two detection operators
    (NonMaxSuppression, RoiAlign) that classifiers do not use; advkit installs it
    without that requirement, and when torchvision is absent a placeholder stands
    in during import that raises if one of those operators is ever used.
    """
    try:
        import onnx
    except ImportError as err:
        raise ImportError("ONNX models need the onnx package: pip install onnx") from err
    onnx2torch = _import_onnx2torch()
    try:
        graph = onnx.load(str(path))
        onnx.checker.check_model(graph)
        return onnx2torch.convert(graph).eval()
    except Exception as err:  # protobuf, onnx and onnx2torch raise their own types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not an ONNX model advkit can read: {reason}") from err


def _import_onnx2torch() -> types.ModuleType:
    try:
        import onnx2torch
        return onnx2torch
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            raise ImportError("ONNX models need onnx2torch: pip install --no-deps "
                              "onnx2torch==1.5.15") from err
    placeholder = types.ModuleType("torchvision")
    placeholder.ops = types.ModuleType("torchvision.ops")

    def missing(name: str):
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"torchvision.ops.{name} is needed by this ONNX model and "
                               "torchvision is not installed")
        return fail

    placeholder.ops.__getattr__ = missing  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = placeholder, placeholder.ops
    try:
        for name in [m for m in sys.modules if m.startswith("onnx2torch")]:
            del sys.modules[name]
        import onnx2torch
        return onnx2torch
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.ops"]
