"""Pipeline files: a protected pipeline written as data, built and fitted on demand.

A pipeline file (TOML or JSON) names the transforms and detectors to put in front of a
model, with their options; :func:`build_pipeline` builds them and fits the detectors on
clean training images (and, for detectors that learn from adversarial examples, on PGD
examples of those images). Fitting is seeded and takes seconds, so the file, not a
pickled object, is what is stored and shared::

    fpr = 0.05            # detectors' false-positive rate on held-out clean images
    fit_images = 2000     # training images the detectors fit on

    [[transform]]
    kind = "bit_depth"
    bits = 4

    [[detector]]
    kind = "feature_squeezing"

    [[detector]]
    kind = "mahalanobis"
    layers = [3, 6, 9]
"""

from __future__ import annotations

import inspect
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advkit.defenses import detectors as detectors_lib
from advkit.defenses import transforms as transforms_lib
from advkit.defenses.binary_detector import BinaryDetector
from advkit.defenses.magnet import MagNetDetector, Reformer
from advkit.defenses.pipeline import Protected

#: Transform kinds: name -> factory taking the file's options.
TRANSFORMS: dict[str, Callable[..., nn.Module]] = {
    "bit_depth": transforms_lib.BitDepth,
    "median": transforms_lib.MedianSmoothing,
    "jpeg": transforms_lib.JPEG,
    "tvm": transforms_lib.TotalVariation,
    "reformer": Reformer,   # autoencoder = "path/to/model.safetensors"
}
#: Detector kinds: name -> factory taking the file's options.
DETECTORS: dict[str, Callable[..., Any]] = {
    "feature_squeezing": detectors_lib.FeatureSqueezing,
    "mahalanobis": detectors_lib.Mahalanobis,
    "lid": detectors_lib.LID,
    "magnet": MagNetDetector,   # autoencoder = "path/to/model.safetensors"
    "binary": BinaryDetector,
}
_TOP_KEYS = ("fpr", "fit_images", "fit_attack_steps", "seed", "transform", "detector")


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline as data: transforms and detectors (each ``{"kind": ..., options}``),
    the detectors' false-positive rate, and how they are fitted."""

    transforms: tuple[dict, ...] = ()
    detectors: tuple[dict, ...] = ()
    fpr: float = 0.05
    fit_images: int = 2000
    fit_attack_steps: int = 20
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.transforms and not self.detectors:
            raise ValueError("a pipeline file needs at least one [[transform]] or [[detector]]")
        if isinstance(self.fpr, bool) or not isinstance(self.fpr, int | float) \
                or not 0 < self.fpr < 1:
            raise ValueError(f"fpr must be a false-positive rate in (0, 1), such as 0.05 "
                             f"(got {self.fpr!r})")
        for name in ("fit_images", "fit_attack_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
        for what, entries, kinds in (("transform", self.transforms, _transforms()),
                                     ("detector", self.detectors, _detectors())):
            for i, entry in enumerate(entries):
                _check_entry(what, i, entry, kinds)

    def to_dict(self) -> dict:
        return {"fpr": self.fpr, "fit_images": self.fit_images,
                "fit_attack_steps": self.fit_attack_steps, "seed": self.seed,
                "transform": [dict(t) for t in self.transforms],
                "detector": [dict(d) for d in self.detectors]}

    @classmethod
    def from_dict(cls, data: dict) -> PipelineSpec:
        if not isinstance(data, dict):
            raise ValueError("a pipeline file holds a table (transforms, detectors, fpr)")
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise ValueError(f"pipeline file: unknown keys {unknown}; it takes "
                             f"{', '.join(_TOP_KEYS)}")
        def entries(key: str) -> tuple[dict, ...]:
            raw = data.get(key, [])
            if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
                raise ValueError(f"pipeline file: {key} must be a list of tables "
                                 f"([[{key}]] in TOML)")
            return tuple(dict(e) for e in raw)
        return cls(transforms=entries("transform"), detectors=entries("detector"),
                   fpr=data.get("fpr", 0.05), fit_images=data.get("fit_images", 2000),
                   fit_attack_steps=data.get("fit_attack_steps", 20),
                   seed=data.get("seed", 0))

    @property
    def needs_adversarial(self) -> bool:
        """Whether fitting needs adversarial examples (some detector learns from them)."""
        kinds = _detectors()
        return any(_learns_from_adversarial(kinds[d["kind"]], d) for d in self.detectors)


def load_spec(path: str | Path) -> PipelineSpec:
    """Read a pipeline file (.toml or .json)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline file {path} does not exist")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ValueError(f"pipeline file {path}: use .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"pipeline file {path} is not valid: {err}") from err
    return PipelineSpec.from_dict(data)


def build_pipeline(spec: PipelineSpec, model: nn.Module, x_fit: Tensor, y_fit: Tensor, *,
                   eps: float, norm: str = "linf",
                   log: Callable[[str], None] = lambda _: None) -> Protected:
    """Build the pipeline of ``spec`` around ``model`` and fit its detectors.

    Detectors fit on the clean ``x_fit`` (labels ``y_fit``), their thresholds at
    ``spec.fpr``; detectors that learn from adversarial examples also get PGD examples
    (``spec.fit_attack_steps`` steps at ``norm``/``eps``) of the first half of ``x_fit``,
    crafted on the bare model.
    """
    from advkit.attacks import PGD
    from advkit.threat import ThreatModel

    transforms = [_make("transform", i, entry, _transforms())
                  for i, entry in enumerate(spec.transforms)]
    detectors = [_make("detector", i, entry, _detectors())
                 for i, entry in enumerate(spec.detectors)]
    pipeline = Protected(model, transforms, detectors)
    if not detectors:
        return pipeline
    x_adv = None
    if spec.needs_adversarial:
        half = max(1, x_fit.shape[0] // 2)
        log(f"crafting {half} PGD examples ({norm} eps {eps:g}, {spec.fit_attack_steps} "
            "steps) for the detectors that learn from them")
        attack = PGD(ThreatModel(norm, eps), steps=spec.fit_attack_steps, seed=spec.seed)
        x_adv = attack(model, x_fit[:half], y_fit[:half]).x_adv
    for detector, entry in zip(detectors, spec.detectors, strict=True):
        learns = _learns_from_adversarial(type(detector), entry)
        log(f"fitting {detector.name} on {x_fit.shape[0]} clean images"
            + (f" and {x_adv.shape[0]} PGD images" if learns else ""))
        with torch.enable_grad():
            detector.fit(model, x_fit, y_fit, fpr=spec.fpr, x_adv=x_adv if learns else None)
    return pipeline


def _transforms() -> dict[str, Callable[..., Any]]:
    return TRANSFORMS


def _detectors() -> dict[str, Callable[..., Any]]:
    return DETECTORS


def _learns_from_adversarial(cls: Any, entry: dict) -> bool:
    # LID and the binary detector need x_adv; Mahalanobis uses it for its layer ensemble.
    if getattr(cls, "needs_adversarial", False):
        return True
    return cls is detectors_lib.Mahalanobis and len(entry.get("layers") or []) > 1


def _check_entry(what: str, i: int, entry: dict, kinds: dict[str, Callable[..., Any]]) -> None:
    kind = entry.get("kind")
    if kind not in kinds:
        raise ValueError(f"{what} {i + 1}: kind must be one of {', '.join(kinds)} "
                         f"(got {kind!r})")
    accepted = [k for k, p in inspect.signature(kinds[kind]).parameters.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and k != "self"]
    for key in entry:
        if key != "kind" and key not in accepted:
            raise ValueError(f"{what} {i + 1} ({kind}): unknown option {key!r}; it takes "
                             f"{', '.join(accepted) or 'no options'}")


def _make(what: str, i: int, entry: dict, kinds: dict[str, Callable[..., Any]]) -> Any:
    # MagNet's ``autoencoder`` may be the path of its advkit checkpoint (safetensors: nothing
    # is unpickled); magnet.load_autoencoder reads it.
    options = {k: v for k, v in entry.items() if k != "kind"}
    try:
        return kinds[entry["kind"]](**options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} {i + 1} ({entry['kind']}): {err}") from err
