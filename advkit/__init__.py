"""advkit: attack, defend, certify and report the adversarial robustness of image classifiers."""

from advkit import attacks, data, models
from advkit._version import __version__
from advkit.evaluation import evaluate
from advkit.threat import ThreatModel

__all__ = ["ThreatModel", "attacks", "data", "evaluate", "models", "__version__"]
