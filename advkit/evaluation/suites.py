"""Attack suites: named compositions of configured attacks, nothing more.

A suite is an ordered list of :class:`Stage` s. In a *budgeted* suite each stage
attacks only the samples no earlier stage broke, and robust accuracy is the
per-sample worst case over all stages. In a *minimal* suite every stage runs on
every correctly classified sample without an eps cap, and each sample keeps its
smallest perturbation: one run gives the whole accuracy-versus-eps curve.

Users compose their own suites in TOML (or YAML, when PyYAML is installed)::

    kind = "budgeted"
    [[stage]]
    name = "apgd-ce"
    attack = "apgd"
    params = { steps = 100, loss = "ce" }
    [[stage]]
    name = "square"
    attack = "square"
    params = { n_queries = 5000 }
"""

from __future__ import annotations

import difflib
import inspect
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from advkit import attacks as attack_lib
from advkit.attacks.base import Attack
from advkit.threat import ThreatModel

KINDS = ("budgeted", "minimal")


@dataclass(frozen=True)
class Stage:
    """One configured attack of a suite.

    Attributes:
        name: a short unique label ("apgd-ce"), used in logs, the store and reports.
        attack: the attack's registry name (see ``advkit attacks``).
        params: constructor keyword arguments (besides the threat model and seed).
        eot: expectation over transformation: the stage attacks the average of the
            logits over this many forward passes (for randomised models); 1 = off.
        norms: the threat-model norms the stage applies to (empty: every norm the
            attack supports); stages that do not apply to a norm are skipped.
    """

    name: str
    attack: str
    params: dict = field(default_factory=dict)
    eot: int = 1
    norms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a stage needs a non-empty name (got {self.name!r})")
        attack_lib.get(self.attack)  # unknown attack: a clear error now, not mid-run
        if not isinstance(self.params, dict):
            raise ValueError(f"stage {self.name!r}: params must be a table/dict")
        if isinstance(self.eot, bool) or not isinstance(self.eot, int) or self.eot < 1:
            raise ValueError(f"stage {self.name!r}: eot must be an integer >= 1 (got {self.eot!r})")
        object.__setattr__(self, "norms", tuple(self.norms))
        # A misspelt option must fail here, before any work, not when the stage first runs.
        accepted = [k for k, p in inspect.signature(self.attack_class.__init__).parameters.items()
                    if p.kind is p.KEYWORD_ONLY and k != "seed"]
        for key in self.params:
            if key not in accepted:
                raise ValueError(f"stage {self.name!r} ({self.attack}): unknown option {key!r}"
                                 f"{_did_you_mean(key, accepted)}; it takes "
                                 f"{', '.join(accepted) or 'no options'}")

    @property
    def attack_class(self) -> type[Attack]:
        return attack_lib.get(self.attack)

    def applies_to(self, norm: str) -> bool:
        return norm in self.attack_class.norms and (not self.norms or norm in self.norms)

    def build(self, threat: ThreatModel, seed: int) -> Attack:
        """The configured attack for ``threat`` (minimal-norm attacks get ``threat``'s eps as
        their cap) with the given seed. A bad option value is an error naming the stage."""
        try:
            return self.attack_class(threat, **self.params, seed=seed)
        except (TypeError, ValueError) as err:
            raise ValueError(f"stage {self.name!r} ({self.attack}): {err}") from err

    def to_dict(self) -> dict:
        return {"name": self.name, "attack": self.attack, "params": dict(self.params),
                "eot": self.eot, "norms": list(self.norms)}


@dataclass(frozen=True)
class Suite:
    """An ordered list of stages and how their results combine (budgeted or minimal)."""

    name: str
    stages: tuple[Stage, ...]
    kind: str = "budgeted"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"suite kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if not self.stages:
            raise ValueError(f"suite {self.name!r} has no stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"suite {self.name!r}: stage names must be unique (got {names})")
        if "clean" in names:
            raise ValueError("'clean' is reserved for the clean-accuracy pass; rename the stage")
        object.__setattr__(self, "stages", tuple(self.stages))

    def for_norm(self, norm: str) -> Suite:
        """The stages that apply to ``norm``; an error if none does."""
        stages = tuple(s for s in self.stages if s.applies_to(norm))
        if not stages:
            raise ValueError(f"no stage of suite {self.name!r} supports the {norm} norm")
        return Suite(self.name, stages, self.kind)

    def check(self, threat: ThreatModel) -> None:
        """Build every stage once for ``threat``: bad option values fail before any work."""
        for stage in self.stages:
            stage.build(threat, seed=0)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: dict, name: str = "custom") -> Suite:
        if not isinstance(data, dict):
            raise ValueError("a suite must be a table with a list of stages")
        keys = ("name", "kind", "stage", "stages")
        for key in data:
            if key not in keys:
                raise ValueError(f"suite: unknown key {key!r}{_did_you_mean(key, keys)}; a suite "
                                 f"has {', '.join(keys)}")
        raw = data.get("stages", data.get("stage"))
        if not isinstance(raw, list) or not raw:
            raise ValueError("a suite needs a non-empty list of stages ([[stage]] in TOML)")
        stages = []
        for i, entry in enumerate(raw):
            if not isinstance(entry, dict) or "attack" not in entry:
                raise ValueError(f"stage {i + 1}: needs at least `attack = \"...\"`")
            unknown = set(entry) - {"name", "attack", "params", "eot", "norms"}
            if unknown:
                raise ValueError(f"stage {i + 1}: unknown keys {sorted(unknown)}; use name, "
                                 "attack, params, eot, norms")
            stages.append(Stage(name=entry.get("name", entry["attack"]), attack=entry["attack"],
                                params=dict(entry.get("params", {})), eot=entry.get("eot", 1),
                                norms=tuple(entry.get("norms", ()))))
        return cls(data.get("name", name), tuple(stages), data.get("kind", "budgeted"))


def _did_you_mean(key: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _standard() -> list[Stage]:
    # AutoAttack's published "standard" configuration (Croce & Hein 2020).
    return [
        Stage("apgd-ce", "apgd", {"steps": 100, "loss": "ce"}),
        Stage("apgd-t", "apgdt", {"steps": 100, "n_target_classes": 9}),
        Stage("fab-t", "fab", {"steps": 100, "target_classes": 9}),
        Stage("square", "square", {"n_queries": 5000}),
    ]


#: The suite ``advkit.evaluate`` runs when none is named: ``lean`` since its figures held on
#: every adversarially trained preset (robust accuracy never above AutoAttack's, at least
#: 5x fewer gradient passes, at most 0.25x the time; benchmarks/evaluate.py, RESULTS.md).
DEFAULT_SUITE = "lean"

SUITES: dict[str, Suite] = {
    "fast": Suite("fast", (Stage("apgd-ce", "apgd", {"steps": 100, "loss": "ce"}),)),
    "standard": Suite("standard", tuple(_standard())),
    # The black-box stages come last: the black-box check asks whether they broke images
    # that every white-box attack missed, which is only true of images they get after all
    # of them. HopSkipJump reads labels only: a model whose scores say nothing (flat,
    # quantised or saturated) stops Square as it stops the gradients, not a decision-based
    # attack.
    "thorough": Suite("thorough", tuple(_standard()[:-1] + [
        Stage("apgd-ce-restarts", "apgd", {"steps": 100, "loss": "ce", "restarts": 5}),
        Stage("apgd-dlr", "apgd", {"steps": 100, "loss": "dlr", "restarts": 5}),
        Stage("fab", "fab", {"steps": 100, "restarts": 5}),
        Stage("pgd-margin", "pgd", {"steps": 200, "loss": "margin", "restarts": 2}),
        Stage("cw-l2", "carliniwagnerl2", {}, norms=("l2",)),
        Stage("cw-linf", "carliniwagnerlinf", {}, norms=("linf",)),
        Stage("ead", "ead", {}, norms=("l1",)),
        Stage("hopskipjump", "hopskipjump", {"max_queries": 5000}),
    ] + _standard()[-1:])),
    # AutoAttack's strength for a fraction of its passes (issue 19): AutoAttack's APGD-CE,
    # then A3's restarts, which spend a fixed gradient budget where images are closest to
    # breaking, APGD-T (3 targets) on the 10% of survivors nearest the boundary (the images
    # AutoAttack's APGD-T alone broke on the Fashion-MNIST PGD preset were there), and its
    # polish: Square only on the 20% of survivors nearest the boundary.
    # Chosen on the MNIST PGD preset (benchmarks/square_gap.py: every image AutoAttack's
    # Square alone breaks sits among the survivors of highest margin; APGD-CE breaks an
    # image of the test CNN that A3 misses), measured against AutoAttack in
    # benchmarks/evaluate.py (RESULTS.md).
    "lean": Suite("lean", (
        Stage("apgd-ce", "apgd", {"steps": 100, "loss": "ce"}),
        Stage("a3", "a3", {"budget": 200, "targeted_share": 0.1, "polish_queries": 5000,
                           "polish_share": 0.2}),
    )),
    # For randomised models (AutoAttack's "rand" version): APGD on the expected logits.
    "rand": Suite("rand", (
        Stage("apgd-ce-eot", "apgd", {"steps": 100, "loss": "ce"}, eot=20),
        Stage("apgd-dlr-eot", "apgd", {"steps": 100, "loss": "dlr"}, eot=20),
    )),
    "minimal": Suite("minimal", (
        Stage("deepfool", "deepfool", {}, norms=("l2", "linf")),
        Stage("fab", "fab", {"steps": 100}),
        Stage("fab-t", "fab", {"steps": 100, "target_classes": 9}),
        Stage("cw-l2", "carliniwagnerl2", {}, norms=("l2",)),
        Stage("ead", "ead", {}, norms=("l1",)),
    ), kind="minimal"),
}


#: Stages of the adaptive suite against a pipeline's detectors (Bryniarski et al. 2022's
#: orthogonal and selective PGD, C&W 2017's combined loss). No one variant wins on every
#: detector (measured on the MNIST test model: the combined loss on Mahalanobis, a heavier
#: combined weight on the binary detector, selective steps with a logit margin on feature
#: squeezing and LID, larger steps where 100 small ones stall), so the suite runs them all,
#: each on the images the earlier ones left, and keeps each image's worst case.
DETECTOR_STAGES = (
    Stage("opgd-combined", "orthogonalpgd", {"steps": 100, "mode": "combined"}),
    Stage("opgd-combined-w10", "orthogonalpgd", {"steps": 100, "mode": "combined",
                                                  "weight": 10.0}),
    Stage("opgd-orthogonal", "orthogonalpgd", {"steps": 100, "mode": "orthogonal"}),
    Stage("opgd-selective-k5", "orthogonalpgd", {"steps": 100, "mode": "selective",
                                                  "confidence": 5.0}),
    Stage("opgd-orthogonal-k5", "orthogonalpgd", {"steps": 100, "mode": "orthogonal",
                                                   "confidence": 5.0}),
    # 40 steps of the default rule's length (2.5 eps / steps): 2.5 times longer steps.
    Stage("opgd-selective-40", "orthogonalpgd", {"steps": 40, "mode": "selective"}),
)
#: Draws per gradient for a pipeline with random transforms (AutoAttack's rand version).
ADAPTIVE_EOT = 20
#: Square's queries per image in the adaptive suite (AutoAttack's standard suite: 5,000;
#: the suite runs it only on the images every gradient stage left).
SQUARE_QUERIES = 1000


def reactive_parts(model: object) -> tuple[list, list, list]:
    """A protected pipeline's transforms, detectors, and the transforms that are random
    (declared ``adaptive.kind == "eot"``); empty lists for a plain model."""
    transforms = list(getattr(model, "transforms", ()) or ())
    detectors = list(getattr(model, "detectors", ()) or ())
    random = [t for t in transforms
              if getattr(getattr(t, "adaptive", None), "kind", None) == "eot"]
    return transforms, detectors, random


def adaptive_suite(model: object) -> Suite:
    """The attacks a pipeline's declared components call for (``suite="adaptive"``).

    Every stage attacks the pipeline through its transforms' declared approximations
    (BPDA; the engine attacks ``model.for_attack()``), with expectation over
    transformation (``eot`` draws) where a transform is random: APGD-CE and APGD-DLR,
    then, where the pipeline has detectors, the detector-aware stages (orthogonal,
    selective and combined-loss PGD), and last, where it has transforms, Square (gradient
    free). On a plain model it is APGD-CE and APGD-DLR.
    """
    transforms, detectors, random = reactive_parts(model)
    eot = ADAPTIVE_EOT if random else 1
    stages = [Stage("apgd-ce", "apgd", {"steps": 100, "loss": "ce"}, eot=eot),
              Stage("apgd-dlr", "apgd", {"steps": 100, "loss": "dlr"}, eot=eot)]
    if detectors:
        stages += [Stage(s.name, s.attack, dict(s.params), eot=eot) for s in DETECTOR_STAGES]
    if transforms:
        # A transform's gradient stand-in can understate it: through the identity, Square
        # after the gradient stages lowered the MNIST PGD-trained model behind TVM from 86%
        # to 60%, JPEG to 44% (benchmarks/protection.py; with the exact and differentiable
        # stand-ins since, a second Square run moves no figure by more than 2 points). A
        # gradient-free stage comes last, so the black-box check says when it found what
        # the gradient stages missed.
        stages.append(Stage("square", "square", {"n_queries": SQUARE_QUERIES}, eot=eot))
    return Suite("adaptive", tuple(stages))


def parse_suite(spec: str) -> Suite:
    """A suite written inline: stages joined by ``+``, each ``attack`` or
    ``attack:option=value,option=value`` (values read as JSON where they parse, else as
    text), e.g. ``apgd:steps=50,loss=dlr+square:n_queries=1000``. Stage names are the
    attack names, numbered where one repeats."""
    stages = []
    for i, part in enumerate(p.strip() for p in spec.split("+")):
        attack, _, options = part.partition(":")
        params = {}
        for item in filter(None, (o.strip() for o in options.split(","))):
            key, eq, raw = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"stage {i + 1} of {spec!r}: options are key=value (got "
                                 f"{item!r})")
            try:
                params[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                params[key.strip()] = raw.strip()
        name = attack.strip()
        if any(s.name == name for s in stages):
            name = f"{name}-{i + 1}"
        stages.append(Stage(name, attack.strip(), params))
    return Suite("custom", tuple(stages))


#: Queries per image of the black-box suite (AutoAttack's budget for Square).
BLACKBOX_QUERIES = 5000


def blackbox_suite(model: object) -> Suite:
    """The attack a black box's access allows (``suite="blackbox"``): Square (score-based)
    for score access, HopSkipJump (decision-based, its norm capped at eps) for label-only
    access, each with :data:`BLACKBOX_QUERIES` queries per image. A model with gradient
    access gets Square too (the suite then measures what a black-box attacker finds)."""
    if getattr(model, "level", None) == "labels":
        stage = Stage("hopskipjump", "hopskipjump", {"max_queries": BLACKBOX_QUERIES})
    else:
        stage = Stage("square", "square", {"n_queries": BLACKBOX_QUERIES})
    return Suite("blackbox", (stage,))


def get_suite(name_or_path: str | Path | Suite, model: object = None) -> Suite:
    """A built-in suite by name, a suite file (.toml, .json, .yaml/.yml), or an inline
    suite (see :func:`parse_suite`). ``"adaptive"`` and ``"blackbox"`` are composed for
    ``model`` (see :func:`adaptive_suite`, :func:`blackbox_suite`)."""
    if isinstance(name_or_path, Suite):
        return name_or_path
    key = str(name_or_path)
    if key == "adaptive":
        return adaptive_suite(model)
    if key == "blackbox":
        return blackbox_suite(model)
    if key in SUITES:
        return SUITES[key]
    if not isinstance(name_or_path, Path) and ("+" in key or ":" in key or key.lower().replace(
            "-", "").replace("_", "") in attack_lib.REGISTRY):
        return parse_suite(key)
    path = Path(key)
    if not path.suffix:
        raise ValueError(f"unknown suite {key!r}: use one of {', '.join(SUITES)}, adaptive, "
                         "blackbox, a "
                         ".toml / .yaml / .json file, or attacks joined by + "
                         "(apgd:steps=50+square)")
    if not path.is_file():
        raise FileNotFoundError(f"suite file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as err:
                raise ValueError("YAML suite files need PyYAML (pip install pyyaml); "
                                 "or write the suite in TOML") from err
            data = yaml.safe_load(text)
        else:
            raise ValueError(f"suite file {path}: use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"suite file {path} is not valid: {err}") from err
    return Suite.from_dict(data, name=path.stem)

