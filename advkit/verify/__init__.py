"""Verification and certification: certified lower bounds beside attacks' upper bounds.

* bound propagation (IBP, CROWN, alpha-CROWN): incomplete, sound, fast;
* complete verification (MILP) and the Ground-Truth Attack: exact, small networks;
* randomised smoothing (Cohen et al. 2019): a probabilistic L2 certificate.
"""

from __future__ import annotations

from advkit.verify.certify import METHODS, Certificate, certify
from advkit.verify.smoothing import (
    ABSTAIN,
    SmoothedClassifier,
    SmoothingResult,
    certified_accuracy,
    certify_smoothing,
    clopper_pearson_lower,
    max_radius,
)

__all__: list[str] = [
    "METHODS", "Certificate", "certify",
    "ABSTAIN", "SmoothedClassifier", "SmoothingResult", "certified_accuracy",
    "certify_smoothing", "clopper_pearson_lower", "max_radius",
]
