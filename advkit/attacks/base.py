"""The attack contract shared by every attack.

An attack is a configured object: ``attack(model, x, y, targets=None) -> AttackResult``.
:class:`Attack.__call__` does everything that must be the same for all attacks —
entry checks, eval mode, pass counting, timing, and the fresh forward pass that
decides success — so an attack's own code (``_run``) only crafts ``x_adv``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from advkit.models.access import (
    GRADIENTS,
    LABELS,
    REJECT,
    SCORES,
    AccessError,
    ModelAccess,
    Oracle,
    allows,
    as_access,
)
from advkit.threat import ThreatModel

#: The knowledge axis's values, and the model access each one needs. Gray-box attacks
#: craft on surrogates they hold themselves and need only the target's labels.
KNOWLEDGE = {"white box": GRADIENTS, "gray box": LABELS, "black box (scores)": SCORES,
             "black box (decisions)": LABELS}
#: The other axes' values (DESIGN.md's taxonomy).
AXES = {
    "falsification": ("false negative", "false positive"),
    "knowledge": tuple(KNOWLEDGE),
    "specificity": ("untargeted+targeted", "untargeted", "targeted"),
    "frequency": ("one-time", "iterative"),
    "scope": ("individual", "universal"),
    "perturbation": ("constrained", "optimized"),
}


@dataclass(frozen=True)
class Taxonomy:
    """Where an attack sits on the six axes of DESIGN.md's taxonomy (values checked)."""

    falsification: str = "false negative"
    knowledge: str = "white box"
    specificity: str = "untargeted+targeted"
    frequency: str = "iterative"
    scope: str = "individual"
    perturbation: str = "constrained"  # "optimized": finds the smallest perturbation

    def __post_init__(self) -> None:
        for axis, values in AXES.items():
            if getattr(self, axis) not in values:
                raise ValueError(f"taxonomy {axis} must be one of {', '.join(values)} "
                                 f"(got {getattr(self, axis)!r})")

    @property
    def access(self) -> str:
        """The model access this knowledge needs: gradients, scores or labels."""
        return KNOWLEDGE[self.knowledge]

    @property
    def black_box(self) -> bool:
        return self.knowledge.startswith("black box")


@dataclass
class AttackResult:
    """What every attack returns; every tensor is per sample (first dim N).

    Attributes:
        x_adv: the adversarial images, inside the bounds (and, for budgeted
            attacks, inside the eps-ball).
        success: the attack's goal holds for ``x_adv`` according to a fresh
            forward pass after the attack (misclassified, or classified as the
            target), never the attack's own bookkeeping. For minimal-norm attacks
            with a finite eps cap, success also requires ``norms <= eps``.
        norms: ``||x_adv - x||`` in the threat model's norm; for minimal-norm
            attacks, ``inf`` where no adversarial example was found.
        predictions: the labels predicted for ``x_adv`` by that forward pass.
        targets: the target classes of a targeted attack, else None.
        forward_passes / backward_passes: images sent through the model
            (one image through the model once = 1), checks and the success
            pass included.
        queries: the per-sample cost (int64, N): for each sample, the forward plus
            the backward passes spent on it, the entry check and the final success
            pass included, whatever the attack. For a score- or label-only model it
            is the number of queries; for a white-box attack a gradient costs 2.
            ``queries.sum() == forward_passes + backward_passes``.
        seconds: wall time of the whole call.
        extras: further per-sample tensors (first dim N) an attack reports, such as
            several candidate examples per image. Query-based minimal-norm attacks
            (HopSkipJump, Boundary) record ``extras["norm_at_queries"]`` (N, K): the
            smallest norm found within each budget of ``config["checkpoints"]``
            (:meth:`norms_at`, :meth:`curve` with ``queries=``).
    """

    x_adv: Tensor
    success: Tensor
    norms: Tensor
    predictions: Tensor
    labels: Tensor
    targets: Tensor | None
    forward_passes: int
    backward_passes: int
    queries: Tensor
    seconds: float
    attack: str
    threat: ThreatModel
    kind: str = "budgeted"
    config: dict = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x_adv.shape[0]

    @property
    def success_rate(self) -> float:
        """Fraction of samples on which the attack reached its goal."""
        return self.success.float().mean().item()

    @property
    def robust_accuracy(self) -> float:
        """Fraction of samples still classified correctly after the attack."""
        return (self.predictions == self.labels).float().mean().item()

    @property
    def images_per_second(self) -> float:
        return len(self) / self.seconds if self.seconds > 0 else math.inf

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """The query budgets at which the attack recorded its norms (() for none)."""
        if "norm_at_queries" not in self.extras:
            return ()
        return tuple(self.config.get("checkpoints", ()))

    def norms_at(self, queries: int) -> Tensor:
        """Per sample, the smallest perturbation found within ``queries`` queries of that
        sample (``inf`` where none yet), for an attack that records its norms at query
        budgets (``checkpoints``). The count is the attack's own, its first look at ``x``
        included, the final success pass not."""
        if not self.checkpoints:
            raise ValueError(f"{self.attack} records no norm per query budget; the "
                             "decision-based attacks (HopSkipJump, Boundary) do")
        if queries not in self.checkpoints:
            raise ValueError(f"{self.attack} recorded its norms at {list(self.checkpoints)} "
                             f"queries, not at {queries}; pass checkpoints= to the attack "
                             "to record other budgets")
        return self.extras["norm_at_queries"][:, self.checkpoints.index(queries)]

    def curve(self, eps_list: Sequence[float],
              queries: int | None = None) -> list[tuple[float, float]]:
        """Robust accuracy at each eps, read off the per-sample perturbation norms.

        Exact for minimal-norm attacks (a sample is broken at eps iff its smallest
        adversarial perturbation is <= eps). For a budgeted attack only eps values
        up to the budget it ran with are meaningful. ``queries``: the curve after that
        many queries per sample, for an attack that records its norms at query budgets
        (:meth:`norms_at`).
        """
        if queries is not None:
            broken = self.norms_at(queries)
            return [(float(e), (broken > e).float().mean().item()) for e in eps_list]
        if self.kind == "budgeted":
            too_big = [e for e in eps_list if e > self.threat.eps * (1 + 1e-9)]
            if too_big:
                raise ValueError(
                    f"a budgeted attack run at eps={self.threat.eps} says nothing about "
                    f"eps={too_big[0]}; run it at that eps or use a minimal-norm attack"
                )
        broken_norms = torch.where(self.success, self.norms, torch.full_like(self.norms, math.inf))
        return [(float(e), (broken_norms > e).float().mean().item()) for e in eps_list]

    def summary(self) -> dict[str, float | int | str]:
        """Headline numbers as plain Python values (for tables and JSON)."""
        broken = self.norms[self.success & torch.isfinite(self.norms)]
        return {
            "attack": self.attack,
            "norm": self.threat.norm,
            "eps": self.threat.eps,
            "n": len(self),
            "robust_acc": self.robust_accuracy,
            "success_rate": self.success_rate,
            "median_norm": broken.median().item() if broken.numel() else math.nan,
            "mean_norm": broken.mean().item() if broken.numel() else math.nan,
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
            "seconds": self.seconds,
            "images_per_s": self.images_per_second,
        }


def require_at_least(minimum: int, **values: int) -> None:
    """Raise a clear ValueError for the first of ``values`` (name=value) below ``minimum``:
    the constructors' check of step counts, restarts and batch sizes."""
    for name, value in values.items():
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum} (got {value})")


def goal_reached(logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    """Per-sample: classified as the target (targeted) or not as the label (untargeted)."""
    pred = logits.argmax(dim=1)
    return pred == targets if targets is not None else pred != labels


@contextmanager
def eval_mode(model: nn.Module | None) -> Iterator[None]:
    """Run in eval mode and restore the modules' previous modes afterwards (None: a black
    box that is not a torch module, which has no mode to set)."""
    if model is None:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    if any(training for _, training in modes):
        warnings.warn(
            "the model is in train mode (dropout / batch-norm statistics would change "
            "its answers); attacking it in eval mode and restoring the mode afterwards. "
            "Call model.eval() to silence this.",
            stacklevel=4,
        )
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


_ACCESS_HINT = {
    SCORES: "Use a score-based attack (advkit attacks lists each attack's access), or "
            "pass the nn.Module itself if you may read its gradients.",
    LABELS: "Use a decision-based attack (advkit attacks lists each attack's access), or "
            "give the model with more access.",
    GRADIENTS: "",
}


class Attack(ABC):
    """Base class: subclasses set the class attributes and implement ``_run``.

    ``name`` is the class name; ``access`` (the model access the attack needs) follows
    from ``taxonomy.knowledge``. A configuration may need less than its class (NES's
    label-only setting makes do with labels): what decides whether a model can be
    attacked is the configured attack's ``access`` and :meth:`check_call`, the class's
    is what the registry lists.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    taxonomy: ClassVar[Taxonomy]
    access: ClassVar[str]
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    kind: ClassVar[str] = "budgeted"   # or "minimal"
    targeted_only: ClassVar[bool] = False
    #: Whether the attack optimises against a pipeline's detectors too (an adaptive attack
    #: on a reactive defense); the evaluation engine checks that a suite run on a
    #: pipeline with detectors has one.
    evades_detectors: ClassVar[bool] = False
    #: Per-call inputs the attack takes besides ``targets``: keywords of ``__call__`` handed
    #: on to ``_run`` (the decision-based attacks' ``starting_points``). Per call, never
    #: stored on the configured object.
    call_options: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.__name__
        if "taxonomy" in cls.__dict__:
            cls.access = cls.taxonomy.access

    def __init__(self, threat: ThreatModel, *, seed: int | None = 0) -> None:
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be an advkit.ThreatModel (got {type(threat).__name__})")
        if threat.norm not in self.norms:
            raise ValueError(
                f"{type(self).__name__} supports norms {', '.join(self.norms)} "
                f"(got {threat.norm!r})"
            )
        if self.kind == "budgeted" and not threat.bounded:
            raise ValueError(f"{type(self).__name__} needs a finite eps (got eps=inf)")
        self.threat = threat
        self.seed = seed

    def config(self) -> dict:
        """The attack's configuration as plain values (recorded with every result)."""
        cfg = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "threat"}
        cfg.update(norm=self.threat.norm, eps=self.threat.eps, bounds=list(self.threat.bounds))
        return cfg

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __call__(
        self, model: nn.Module | ModelAccess, x: Tensor, y: Tensor,
        targets: Tensor | None = None, **options: Tensor | None,
    ) -> AttackResult:
        """Attack ``model`` on images ``x`` (N,C,H,W in the bounds) with labels ``y``.

        ``model`` is an ``nn.Module`` (white box) or an access object that exposes less
        (:func:`advkit.models.scores_only`, :func:`advkit.models.labels_only`); an attack
        that needs more access than it is given is refused before any query. Pass
        ``targets`` (N,) for a targeted attack, and the attack's own per-call inputs
        (``call_options``, such as ``starting_points=``) as keywords. Returns an
        :class:`AttackResult`.
        """
        start = time.perf_counter()
        unknown = sorted(set(options) - set(self.call_options))
        if unknown:
            takes = (f"it takes {', '.join(o + '=' for o in self.call_options)}"
                     if self.call_options else "it takes only model, x, y and targets=")
            raise TypeError(f"{self.name} takes no argument {unknown[0]}= when called; {takes}")
        access = as_access(model)
        if not allows(access.level, self.access):
            raise AccessError(
                f"{self.name} is a {self.taxonomy.knowledge} attack: it needs {self.access} "
                f"access, but the model was given with {access.level} access only. "
                f"{_ACCESS_HINT[access.level]}")
        x, y, targets = check_inputs(access, x, y, targets, self.threat)
        self.check_call(access.level, targeted=targets is not None)
        if self.kind == "budgeted":
            self.threat.check_eps_for(x)
        oracle = Oracle(access, x.shape[0], device=x.device, who=self.name)
        # A black box may hide scores (-inf: outside its top k, or a probability of 0).
        hidden = access.level != GRADIENTS
        with eval_mode(access.module):
            clean_logits: Tensor | None = None
            if not self._needs_clean_pass():
                # Check the logits of the attack's own first pass (at x or at a random start)
                # instead of paying for a clean forward pass; they run before any use. A
                # label-only model shows no logits: there is nothing to check.
                if access.level != LABELS:
                    oracle.check_first = lambda logits: check_logits(
                        logits, y, targets, where=FIRST_POINT, hidden_ok=hidden)
            elif access.level == LABELS:
                oracle.labels(x)
            else:
                clean_logits = oracle.logits(x)
                check_logits(clean_logits, y, targets, hidden_ok=hidden)
                targets = self._choose_targets(clean_logits, y, targets)
            generator = None
            if self.seed is not None:
                generator = torch.Generator(device=x.device).manual_seed(self.seed)
            oracle.reserve(1)
            out = self._run(oracle, x, y, targets, clean_logits, generator, **options)
            oracle.reserve(0)
            if oracle.check_first is not None:
                raise RuntimeError(f"{self.name} declared that it needs no clean pass "
                                   "but made no model pass; fix its _needs_clean_pass()")
            x_adv, extras = out if isinstance(out, tuple) else (out, {})
            x_adv = x_adv.detach().clamp(*self.threat.bounds)
            predictions = oracle.labels(x_adv)
        norms = self.threat.norms(x_adv - x)
        # A rejected input (a pipeline's detector flagged it) is defended, never a success.
        success = (predictions == targets if targets is not None
                   else (predictions != y) & (predictions != REJECT))
        if self.kind == "minimal":
            norms = torch.where(success, norms, torch.full_like(norms, math.inf))
            if self.threat.bounded:
                success = success & (norms <= self.threat.eps)
        return AttackResult(
            x_adv=x_adv, success=success, norms=norms, predictions=predictions,
            labels=y, targets=targets, forward_passes=oracle.forward_passes,
            backward_passes=oracle.backward_passes, queries=oracle.queries,
            seconds=time.perf_counter() - start, attack=self.name, threat=self.threat,
            kind=self.kind, config=self.config(), extras=extras,
        )

    def check_call(self, level: str, *, targeted: bool) -> None:
        """Refuse (ValueError, naming the fix) a call this configured attack cannot make on
        a model given with ``level`` access, targeted or not; the access itself is checked
        apart (:class:`~advkit.models.access.AccessError`). ``__call__`` runs it before any
        query, and the evaluation engine, which attacks without targets, on every stage
        before its run. Here: a ``targeted_only`` attack needs targets."""
        if self.targeted_only and not targeted:
            raise ValueError(f"{self.name} is targeted: pass targets=")

    def _choose_targets(self, clean_logits: Tensor, y: Tensor,
                        targets: Tensor | None) -> Tensor | None:
        """Attacks that pick their own targets (ILLC) override this."""
        return targets

    def _needs_clean_pass(self) -> bool:
        """True (the default) when ``_run`` reads ``clean_logits`` or targets come from them.

        An attack that returns False saves that forward pass: ``_run`` gets
        ``clean_logits=None`` and the entry checks run on the logits of its first model
        pass, wherever it is (at ``x``, or at a random start in the ball), before the
        objective is evaluated. The checks (shapes, finite values, label range,
        probabilities) do not depend on where the model is evaluated.
        """
        return True

    @abstractmethod
    def _run(
        self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
        clean_logits: Tensor | None, generator: torch.Generator | None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Return adversarial images for ``x`` (shape of x, inside the threat model).

        ``model`` is the only way into the model: every door counts per sample (see
        :class:`~advkit.models.access.Oracle`; a door used on a subset of the samples
        needs ``rows=``, or a :meth:`~advkit.models.access.Oracle.view`).
        ``clean_logits`` are the model's logits at ``x``, or None for an attack whose
        :meth:`_needs_clean_pass` is False (or that has label-only access).

        An attack may also return ``(x_adv, extras)``: per-sample tensors that end
        up in ``AttackResult.extras``. Minimal-norm attacks return ``x`` itself
        where they found nothing.
        """


def check_inputs(
    model: nn.Module | ModelAccess, x: Tensor, y: Tensor, targets: Tensor | None,
    threat: ThreatModel,
) -> tuple[Tensor, Tensor, Tensor | None]:
    as_access(model)  # a clear TypeError for anything that is not a model
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor (got {type(x).__name__})")
    if x.dim() != 4:
        raise ValueError(
            f"x must have shape (N, C, H, W) (got {tuple(x.shape)}); "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if x.shape[0] == 0:
        raise ValueError("x is empty (N = 0)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor in [0, 1] (got {x.dtype}); "
                        "for uint8 images use x.float() / 255")
    # One pass: NaN propagates into min and max, and an inf is itself the min or the max.
    x_min, x_max = (v.item() for v in torch.aminmax(x))
    if not (math.isfinite(x_min) and math.isfinite(x_max)):
        raise ValueError(f"x contains {int((~torch.isfinite(x)).sum())} NaN or inf values")
    lo, hi = threat.bounds
    if x_min < lo or x_max > hi:
        raise ValueError(
            f"x has values outside the bounds {threat.bounds} (min {x_min:.4g}, max "
            f"{x_max:.4g}); scale images to the bounds and put normalisation inside the "
            "model (advkit.models.Normalize)"
        )
    y = _check_labels(y, x, "y")
    if targets is not None:
        targets = _check_labels(targets, x, "targets")
        same = int((targets == y).sum())
        if same:
            raise ValueError(f"{same} targets equal their true labels; a target must differ")
    x = x.detach()
    return x, y, targets


def _check_labels(labels: Tensor, x: Tensor, what: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of class indices")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer class indices (got {labels.dtype})")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"{what} must have shape ({x.shape[0]},) to match x (got "
                         f"{tuple(labels.shape)})")
    return labels.to(device=x.device, dtype=torch.long)


CLEAN_IMAGES = "on the clean images"
FIRST_POINT = "at the attack's first point (x or its random start)"


def check_label_range(classes: int, y: Tensor, targets: Tensor | None = None) -> None:
    """Labels (and targets) must name one of the model's ``classes`` outputs."""
    for name, labels in (("y", y), ("targets", targets)):
        if labels is not None and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"{name} must be in [0, {classes - 1}] for a model with {classes} "
                             f"classes (got min {labels.min().item()}, max {labels.max().item()})")


def check_logits(logits: Tensor, y: Tensor, targets: Tensor | None,
                 where: str = CLEAN_IMAGES, hidden_ok: bool = False) -> None:
    """The entry checks on a model's logits at the clean images (or, for an attack that
    needs no clean pass, at its first point: ``where`` says which, for the message).
    ``hidden_ok``: a black box's scores, where ``-inf`` marks a hidden score (outside its
    top k, or the log of a probability of 0); each row must still show one score."""
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"the model must return logits of shape (N, classes) (got "
                         f"{tuple(logits.shape)} for N={y.shape[0]})")
    shown = torch.isfinite(logits)
    if hidden_ok:
        if (logits.isnan() | (logits == math.inf)).any() or not shown.any(1).all():
            raise ValueError(f"the model returned NaN, +inf or no finite score {where}")
    elif not shown.all():
        raise ValueError(f"the model returned NaN or inf logits {where}")
    check_label_range(logits.shape[1], y, targets)
    if logits.min() >= 0 and logits.max() <= 1 and torch.allclose(
            logits.sum(1), torch.ones_like(logits[:, 0]), atol=1e-3):
        warnings.warn(
            "the model's outputs look like probabilities (each row in [0, 1] summing to 1); "
            "attacks need logits: remove the final softmax. Gradients through a softmax "
            "saturate and make attacks look weaker than they are.",
            stacklevel=_outside_advkit(),
        )


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep


def _outside_advkit() -> int:
    """The ``stacklevel`` that makes a warning name the first caller outside advkit.

    To be called by the function that warns; the depth below the user's call varies
    (the entry checks may run inside an attack's first model pass).
    """
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level
