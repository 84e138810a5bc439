"""Training: one trainer and the recipes it runs.

The trainer (:func:`train`, configured by :class:`TrainConfig`) seeds, checkpoints,
resumes and runs data parallel under ``torchrun``; a recipe turns a batch into a
loss: standard training, PGD and fast (FGSM-RS) adversarial training, TRADES, MART,
IBP and CROWN-IBP certified training, defensive distillation (teacher temperature
training + student), Gaussian augmentation, and the denoising autoencoder of MagNet's
reformer and detector (``denoising``: a recipe that reconstructs instead of
classifying), and NaturalGAN's generator, critic and inverter (``natural_gan``, with
:func:`train_gan`: a recipe of several parts, each with an optimizer of its own).
Lipschitz-bounded layers are an architecture option (``lipschitz=True``).
Presets are the shipped settings behind the defense figures in ``benchmarks/RESULTS.md``;
:func:`train_defense` trains a defense from its settings.
"""

from advkit.training.adversarial_training import FastAdversarialTraining, PGDTraining
from advkit.training.certified import CROWNIBPTraining, IBPTraining
from advkit.training.denoising import DenoisingAutoencoder
from advkit.training.distillation import Distillation, TemperatureTraining
from advkit.training.mart import MART
from advkit.training.natural_gan import NaturalGANTraining, train_gan
from advkit.training.noise import GaussianAugmentation
from advkit.training.presets import PRESETS, TRAIN_DEFAULTS, Preset, get_preset, resolve
from advkit.training.recipe import Recipe, StopTraining
from advkit.training.registry import RECIPES, build_recipe
from advkit.training.trades import TRADES
from advkit.training.trainer import (
    TrainConfig,
    TrainResult,
    config_record,
    train,
    train_defense,
)

__all__ = ["MART", "PRESETS", "RECIPES", "TRADES", "TRAIN_DEFAULTS", "CROWNIBPTraining",
           "DenoisingAutoencoder", "IBPTraining", "NaturalGANTraining", "train_gan",
           "Distillation", "FastAdversarialTraining", "GaussianAugmentation", "PGDTraining",
           "Preset", "Recipe", "StopTraining", "TemperatureTraining", "TrainConfig",
           "TrainResult", "build_recipe", "config_record", "get_preset", "resolve", "train",
           "train_defense"]
