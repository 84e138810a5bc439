"""Models: the architecture zoo, checkpoints (safetensors + metadata), loaders, and the
access an attack is given to a model (gradients, scores only, labels only)."""

from advkit.models.access import (
    AccessError,
    ModelAccess,
    QueryBudgetExceeded,
    gradients,
    labels_only,
    scores_only,
)
from advkit.models.checkpoint import fingerprint, load_checkpoint, load_weights, read_metadata, save
from advkit.models.loaders import load, load_onnx, model_dir, trained_path
from advkit.models.normalize import Normalize
from advkit.models.zoo import ARCHITECTURES, create

__all__ = ["ARCHITECTURES", "AccessError", "ModelAccess", "Normalize", "QueryBudgetExceeded",
           "create", "fingerprint", "gradients", "labels_only", "load", "load_checkpoint",
           "load_onnx", "load_weights", "model_dir", "read_metadata", "save", "scores_only",
           "trained_path"]
