"""Defenses. Training recipes (all run by the one trainer, ``advkit.train``):
standard, PGD and fast (FGSM-RS) adversarial training, TRADES, MART, defensive
distillation (teacher temperature training + student), Gaussian augmentation.
Lipschitz-bounded layers are an architecture option (``lipschitz=True``).
"""

from advkit.defenses.adversarial_training import FastAdversarialTraining, PGDTraining
from advkit.defenses.distillation import Distillation, TemperatureTraining
from advkit.defenses.mart import MART
from advkit.defenses.noise import GaussianAugmentation
from advkit.defenses.recipe import Recipe, StopTraining
from advkit.defenses.trades import TRADES

__all__ = ["Distillation", "FastAdversarialTraining", "GaussianAugmentation", "MART",
           "PGDTraining", "Recipe", "StopTraining", "TRADES", "TemperatureTraining"]
