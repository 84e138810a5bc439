"""Models: the architecture zoo, checkpoints (safetensors + metadata) and loaders."""

from advkit.models.checkpoint import fingerprint, load_checkpoint, load_weights, read_metadata, save
from advkit.models.loaders import load, load_onnx, model_dir, trained_path
from advkit.models.normalize import Normalize
from advkit.models.zoo import ARCHITECTURES, create

__all__ = ["ARCHITECTURES", "Normalize", "create", "fingerprint", "load", "load_checkpoint",
           "load_onnx", "load_weights", "model_dir", "read_metadata", "save",
           "trained_path"]
