"""advkit checkpoints: one safetensors file holding the weights and JSON metadata.

The metadata (architecture and its arguments, dataset, normalisation, recipe,
metrics, fingerprint) sits in the safetensors header under the key ``advkit``,
so a checkpoint is a single self-describing file that loads without unpickling.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from advkit._files import atomic_path
from advkit.models import zoo

FORMAT = "advkit-checkpoint/1"


def fingerprint(model: nn.Module) -> str:
    """A short, stable hash of a model's parameters and buffers (names, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) has no byte view
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def save(model: nn.Module, path: str | Path, *, architecture: str,
         arch_kwargs: dict[str, Any] | None = None, **metadata: Any) -> Path:
    """Write ``model`` to ``path`` (.safetensors) with its metadata, atomically.

    ``architecture`` is a zoo name, so :func:`load` can rebuild the model;
    ``metadata`` may hold anything JSON-serialisable (dataset, recipe, metrics...).
    """
    if architecture not in zoo.ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: use one of "
                         f"{', '.join(zoo.ARCHITECTURES)}")
    path = Path(path)
    meta = {"format": FORMAT, "architecture": architecture, "arch_kwargs": arch_kwargs or {},
            "fingerprint": fingerprint(model), **metadata}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"advkit": json.dumps(meta)})
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The advkit metadata of a checkpoint (raises if the file is not an advkit checkpoint)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("advkit")
    except Exception as err:  # safetensors raises several types for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    if raw is None:
        raise ValueError(f"{path} is a safetensors file without advkit metadata; load it with "
                         "advkit.models.load('package.module:factory', weights=path)")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its advkit metadata is not valid JSON ({err})") from err


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of an advkit checkpoint, weights loaded, in eval mode.

    ``model.advkit_metadata`` holds the checkpoint's metadata. The stored
    fingerprint is checked against the loaded weights.
    """
    meta = read_metadata(path)
    model = zoo.create(meta["architecture"], **meta.get("arch_kwargs", {}))
    load_weights(model, path, map_location)
    if "fingerprint" not in meta:
        warnings.warn(f"{path} records no fingerprint: its weights cannot be checked against "
                      "damage; save it again with advkit.models.save", stacklevel=2)
    elif fingerprint(model) != meta["fingerprint"]:
        raise ValueError(f"{path}: the weights do not match the fingerprint in the metadata "
                         "(the file was altered or damaged)")
    model.advkit_metadata = meta
    return model.eval()


def load_weights(model: nn.Module, path: str | Path,
                 map_location: str | torch.device = "cpu", trust: bool = False) -> nn.Module:
    """Load a state dict into ``model`` from .safetensors, or a torch file without unpickling.

    Torch files (.pt/.pth/.bin) are read with ``weights_only=True``, which refuses
    arbitrary objects; ``trust=True`` lifts that, for files you made yourself.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path), device=str(map_location))
        except Exception as err:  # safetensors raises its own types for damaged files
            raise ValueError(f"{path} is not a readable safetensors file; it may be truncated "
                             f"or damaged ({err})") from err
    else:
        state = _torch_load(path, map_location, trust)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes
        raise ValueError(f"{path} does not fit the model: {err}") from err
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def _torch_load(path: Path, map_location: str | torch.device, trust: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as err:  # torch raises several types for damaged and refused files
        # Only the weights-only unpickler's refusal means "Python objects inside"; anything
        # else is a damaged or foreign file, and trusting it would not help.
        if not trust and "Weights only load failed" in str(err):
            raise ValueError(
                f"refused to load {path}: it holds Python objects beyond tensors, and "
                "unpickling them could run arbitrary code. If you made this file yourself or "
                "trust its author, pass trust=True (CLI: --trust).") from err
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable torch file; it may be truncated or "
                         f"damaged ({reason})") from err
