"""The recipes by the name ``advkit train --defense`` takes, and how to build one."""

from __future__ import annotations

import inspect

from torch import nn

from advkit.threat import ThreatModel
from advkit.training.adversarial_training import FastAdversarialTraining, PGDTraining
from advkit.training.certified import CROWNIBPTraining, IBPTraining
from advkit.training.denoising import DenoisingAutoencoder
from advkit.training.distillation import Distillation, TemperatureTraining
from advkit.training.mart import MART
from advkit.training.noise import GaussianAugmentation
from advkit.training.recipe import Recipe
from advkit.training.trades import TRADES

#: Recipe classes by the name ``advkit train --defense`` takes.
RECIPES: dict[str, type[Recipe]] = {cls.name: cls for cls in (
    Recipe, PGDTraining, FastAdversarialTraining, TRADES, MART, TemperatureTraining,
    Distillation, GaussianAugmentation, DenoisingAutoencoder, IBPTraining, CROWNIBPTraining)}


def build_recipe(name: str, threat: ThreatModel | None = None, *,
                 teacher: nn.Module | None = None, **options: object) -> Recipe:
    """The recipe called ``name``, configured from the options it takes (None = default).

    Adversarial recipes take ``threat``; distillation takes ``teacher``. Options a
    recipe does not take are an error.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown defense {name!r}: use one of {', '.join(RECIPES)}")
    cls = RECIPES[name]
    accepted = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in options.items() if v is not None}
    extra = [k for k in given if k not in accepted]
    if extra:
        raise ValueError(f"the {name} recipe takes no option {', '.join(extra)}")
    if "threat" in accepted:
        given["threat"] = threat
    if "teacher" in accepted:
        if teacher is None:
            raise ValueError("distillation needs a teacher trained at the same temperature")
        given["teacher"] = teacher
    return cls(**given)
