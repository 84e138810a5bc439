"""Inference-time defenses: input transforms (:mod:`advkit.defenses.transforms`), detectors
(:mod:`advkit.defenses.detectors`, :mod:`advkit.defenses.binary_detector`), MagNet's
autoencoder reformer and detector (:mod:`advkit.defenses.magnet`), and protected pipelines
that combine them with a model (:class:`Protected`: transform -> classify -> reject what a
detector flags).

Every transform declares in ``adaptive`` how an adaptive attack gets through it, and
:func:`bpda` builds the module such an attack differentiates.

Training-time defenses (adversarial training, TRADES, MART, distillation, noise
augmentation) are recipes of the trainer: see :mod:`advkit.training`.
"""

from advkit.defenses.binary_detector import BinaryDetector
from advkit.defenses.detectors import LID, Detector, FeatureSqueezing, Mahalanobis
from advkit.defenses.magnet import MagNetDetector, Reformer
from advkit.defenses.pipeline import REJECT, Protected, ProtectionMetrics, protection_metrics
from advkit.defenses.transforms import (
    JPEG,
    Adaptive,
    BitDepth,
    MedianSmoothing,
    TotalVariation,
    Transform,
    bpda,
    total_variation,
)

__all__ = [
    "JPEG", "Adaptive", "BitDepth", "MedianSmoothing", "TotalVariation", "Transform",
    "bpda", "total_variation",
    "Detector", "FeatureSqueezing", "LID", "Mahalanobis",
    "BinaryDetector", "MagNetDetector", "Reformer",
    "REJECT", "Protected", "ProtectionMetrics", "protection_metrics",
]
