"""Inference-time defenses: input transforms, detectors and protected pipelines
(transform -> classify -> detect), coming.

Training-time defenses (adversarial training, TRADES, MART, distillation, noise
augmentation) are recipes of the trainer: see :mod:`advkit.training`.
"""
