"""advkit: attack, defend, certify and report the adversarial robustness of image classifiers."""

from advkit import attacks, data, models
from advkit.evaluation import evaluate
from advkit.threat import ThreatModel

__version__ = "0.1.0"
__all__ = ["ThreatModel", "attacks", "data", "evaluate", "models", "__version__"]
