"""Attacks: configured objects called as ``attack(model, x, y, targets=None)``.

Every attack returns an :class:`AttackResult` whose ``success`` comes from a fresh
forward pass. ``REGISTRY`` maps each attack's name to its class. :class:`CPPNFooling`
(fooling images evolved from nothing, one per class) is exported but not registered: it
takes no images and succeeds per class, not per sample. :class:`NaturalGAN` is exported
but not registered either: it needs a GAN trained on the model's data
(:func:`advkit.training.train_gan`), which the registry cannot build from a name.
"""

from advkit.attacks.a3 import A3
from advkit.attacks.apgd import APGD, APGDT
from advkit.attacks.bandits import Bandits
from advkit.attacks.base import Attack, AttackResult, Taxonomy
from advkit.attacks.bim import BIM, ILLC
from advkit.attacks.boundary import Boundary
from advkit.attacks.carlini_wagner import CarliniWagnerL2, CarliniWagnerLinf
from advkit.attacks.cppn import CPPNFooling, FoolingResult
from advkit.attacks.deepfool import DeepFool
from advkit.attacks.ead import EAD
from advkit.attacks.eot import EOT
from advkit.attacks.fab import FAB
from advkit.attacks.feature_adversary import FeatureAdversary
from advkit.attacks.fgsm import FGSM
from advkit.attacks.gen_attack import GenAttack
from advkit.attacks.ground_truth import GroundTruth
from advkit.attacks.hop_skip_jump import HopSkipJump
from advkit.attacks.hot_cold import HotCold
from advkit.attacks.jsma import JSMA
from advkit.attacks.malt import MALT
from advkit.attacks.mifgsm import MIFGSM
from advkit.attacks.natural_gan import NaturalGAN
from advkit.attacks.nes import NES
from advkit.attacks.one_pixel import OnePixel
from advkit.attacks.orthogonal_pgd import OrthogonalPGD
from advkit.attacks.patch import AdversarialPatch, PatchResult
from advkit.attacks.pgd import PGD
from advkit.attacks.rp2 import RP2, RP2Result
from advkit.attacks.simba import SimBA
from advkit.attacks.square import Square
from advkit.attacks.substitute import Substitute
from advkit.attacks.transfer import MEA, Ensemble, Transfer
from advkit.attacks.universal import UniversalPerturbation
from advkit.attacks.zoo import ZOO

REGISTRY: dict[str, type[Attack]] = {
    cls.name.lower(): cls for cls in (FGSM, BIM, ILLC, PGD, MIFGSM, APGD, APGDT, MALT, A3,
                                      Square,
                                      DeepFool, FAB, CarliniWagnerL2, CarliniWagnerLinf, EAD,
                                      JSMA, HotCold, FeatureAdversary, UniversalPerturbation,
                                      OrthogonalPGD, HopSkipJump, Boundary, GenAttack, OnePixel,
                                      SimBA, NES, ZOO, Bandits, GroundTruth,
                                      Transfer, MEA, Substitute, EOT, RP2)
}


def get(name: str) -> type[Attack]:
    """The attack class called ``name`` (case-insensitive)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in REGISTRY:
        raise ValueError(f"unknown attack {name!r}: use one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


__all__ = ["Attack", "AttackResult", "Taxonomy", "REGISTRY", "get",
           "FGSM", "BIM", "ILLC", "PGD", "MIFGSM", "APGD", "APGDT", "MALT", "A3", "Square",
           "JSMA", "HotCold",
           "FeatureAdversary", "UniversalPerturbation", "DeepFool", "FAB",
           "CarliniWagnerL2", "CarliniWagnerLinf", "EAD", "OrthogonalPGD", "HopSkipJump",
           "Boundary", "GenAttack", "OnePixel",
           "SimBA", "NES", "ZOO", "Bandits", "GroundTruth",
           "Transfer", "MEA", "Substitute", "Ensemble", "CPPNFooling", "FoolingResult",
           "RP2", "RP2Result",
           "EOT", "AdversarialPatch", "PatchResult", "NaturalGAN"]
