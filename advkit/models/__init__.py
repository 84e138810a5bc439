"""Models: the architecture zoo, checkpoints (safetensors + metadata), loaders, and the
access an attack is given to a model (gradients, scores only, labels only), local or
remote: an ONNX Runtime session or an HTTP endpoint is a black box too."""

from advkit.models.access import (
    AccessError,
    ModelAccess,
    QueryBudgetExceeded,
    Scorer,
    gradients,
    labels_only,
    scores_only,
)
from advkit.models.checkpoint import fingerprint, load_checkpoint, load_weights, read_metadata, save
from advkit.models.loaders import load, load_onnx, model_dir, trained_path
from advkit.models.normalize import Normalize
from advkit.models.onnx_runtime import onnx_session
from advkit.models.remote import RemoteError, remote
from advkit.models.zoo import ARCHITECTURES, create

__all__ = ["ARCHITECTURES", "AccessError", "ModelAccess", "Normalize", "QueryBudgetExceeded",
           "RemoteError", "Scorer", "create", "fingerprint", "gradients", "labels_only", "load",
           "load_checkpoint", "load_onnx", "load_weights", "model_dir", "onnx_session",
           "read_metadata", "remote", "save", "scores_only", "trained_path"]
