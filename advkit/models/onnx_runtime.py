"""An ONNX model run by ONNX Runtime: a black box that gives scores, never a gradient.

``advkit.models.load("model.onnx")`` converts a model to a differentiable ``nn.Module``
(white box). :func:`onnx_session` is the other way in: the model as it would be deployed,
run by ONNX Runtime, with nothing to differentiate. Wrap it in
:func:`~advkit.models.scores_only` or :func:`~advkit.models.labels_only` to attack it.
An ONNX file is a protobuf graph: loading one runs no Python from the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class OnnxSession:
    """A :class:`~advkit.models.access.Scorer` over an ONNX Runtime inference session.

    Takes float32 images (N, C, H, W) in [0, 1] on any device and returns the model's first
    output (N, classes) as a float32 tensor on the same device. The model's first input
    must take the whole batch (a dynamic batch axis); a model exported for batches of one
    image is run one image at a time.
    """

    def __init__(self, path: str | Path, *, providers: list[str] | None = None) -> None:
        ort = _import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        try:
            self._session = ort.InferenceSession(
                str(self.path), providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{self.path} is not an ONNX model ONNX Runtime can run: "
                             f"{reason}") from err
        first = self._session.get_inputs()[0]
        self._input = first.name
        batch = first.shape[0] if first.shape else None
        self._one_at_a_time = batch == 1

    def __call__(self, x: Tensor) -> Tensor:
        images = x.detach().to("cpu", torch.float32).numpy()
        if self._one_at_a_time:
            outputs = [self._run(images[i:i + 1]) for i in range(images.shape[0])]
            scores = np.concatenate(outputs)
        else:
            scores = self._run(images)
        if scores.ndim != 2 or scores.shape[0] != x.shape[0]:
            raise ValueError(f"{self.path} must return scores of shape (N, classes) (got "
                             f"{scores.shape} for N={x.shape[0]})")
        return torch.from_numpy(scores.astype(np.float32, copy=False)).to(x.device)

    def _run(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._session.run(None, {self._input: images})[0])

    def __repr__(self) -> str:
        return f"OnnxSession({str(self.path)!r})"


def onnx_session(path: str | Path, *, providers: list[str] | None = None) -> OnnxSession:
    """The ONNX model at ``path`` run by ONNX Runtime, as a black box (scores, no gradient).

    ``providers``: ONNX Runtime execution providers, in order of preference (default the
    CPU). Use it as ``advkit.models.scores_only(onnx_session("model.onnx"), budget=...)``.
    """
    return OnnxSession(path, providers=providers)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("an ONNX Runtime session needs onnxruntime: pip install "
                          "onnxruntime (or advkit.models.load('model.onnx') for a white-box "
                          "torch module)") from err
    return onnxruntime
