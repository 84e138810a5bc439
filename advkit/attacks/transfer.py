"""Transfer attacks: craft on surrogate models the attacker holds, judge on the target.

Adversarial examples made for one model often fool another trained for the same task
(Szegedy et al. 2014; Papernot, McDaniel & Goodfellow 2016). :class:`Transfer` runs any
configured attack on one surrogate, or on several fused into one (:class:`Ensemble`), and
hands the result to the target; :class:`MEA` is Liu et al.'s ensemble attack, the
surrogates' softmax outputs averaged before the loss. Neither sends the target anything
but the contract's entry pass and its final success pass (2 label queries per sample,
:attr:`Transfer.target_queries`): the zero-query attack (ZQA) of the literature.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.attacks.base import Attack, AttackResult, Oracle, Taxonomy, require_at_least
from advkit.models.checkpoint import fingerprint
from advkit.threat import ThreatModel

#: How an ensemble fuses its members: their logits averaged, or their softmax outputs
#: averaged (read back as log-probabilities, which are logits of the same softmax).
FUSIONS = ("logits", "softmax")


def check_surrogates(surrogates: Sequence[nn.Module] | nn.Module,
                     what: str = "surrogates") -> list[nn.Module]:
    """The surrogate models as a list, refused with the fix when empty, not modules, or in
    train mode (dropout and batch-norm statistics would change what is crafted)."""
    if isinstance(surrogates, nn.Module):
        surrogates = [surrogates]
    surrogates = list(surrogates)
    if not surrogates:
        raise ValueError(f"{what} is empty: give at least one surrogate model (an nn.Module "
                         "trained for the target's task)")
    for i, model in enumerate(surrogates):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{what}[{i}] must be a torch.nn.Module (got "
                            f"{type(model).__name__}); a transfer attack needs the "
                            "surrogates' gradients")
        if any(m.training for m in model.modules()):
            raise ValueError(f"{what}[{i}] ({type(model).__name__}) is in train mode: call "
                             ".eval() on it before crafting with it")
    return surrogates


def check_weights(weights: Sequence[float] | None, k: int) -> list[float]:
    """Ensemble weights: k non-negative numbers, normalised to sum 1 (None: uniform)."""
    if weights is None:
        return [1.0 / k] * k
    weights = [float(w) for w in weights]
    if len(weights) != k:
        raise ValueError(f"weights must have one entry per surrogate ({k}), got {len(weights)}")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum (got {weights})")
    total = sum(weights)
    return [w / total for w in weights]


class Ensemble(nn.Module):
    """Several classifiers as one: ``sum_i w_i logits_i`` (``fuse="logits"``), or
    ``log(sum_i w_i softmax(logits_i))`` (``fuse="softmax"``, Liu et al. 2017's fusion).

    The softmax fusion returns log-probabilities: logits whose softmax is the weighted mean
    of the members' softmax outputs, so the cross-entropy of its output is Liu et al.'s
    ``-log((sum_i w_i J_i(x)) . 1_y)``. Members must agree on the number of classes; the
    first forward pass checks it.
    """

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None,
                 fuse: str = "logits") -> None:
        super().__init__()
        if fuse not in FUSIONS:
            raise ValueError(f"unknown fusion {fuse!r}: use one of {', '.join(FUSIONS)}")
        self.members = nn.ModuleList(check_surrogates(models))
        self.weights = check_weights(weights, len(self.members))
        self.fuse = fuse
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        outputs = [model(x) for model in self.members]
        classes = {out.shape[-1] for out in outputs}
        if len(classes) > 1:
            raise ValueError(f"the surrogates disagree on the number of classes "
                             f"({[out.shape[-1] for out in outputs]}); use models of the same "
                             "task")
        if self.fuse == "logits":
            return sum(w * out for w, out in zip(self.weights, outputs, strict=True))
        # logsumexp of log w_i + log_softmax_i: the log of the weighted mean of the softmax
        # outputs, without the underflow of summing probabilities first.
        log_w = torch.tensor(self.weights, dtype=outputs[0].dtype, device=x.device).log()
        stacked = torch.stack([F.log_softmax(out, dim=-1) for out in outputs])
        return torch.logsumexp(stacked + log_w.view(-1, 1, 1), dim=0)


def white_box_attack(attack: Attack | str, threat: ThreatModel, options: dict) -> Attack:
    """The crafting attack: a configured one, or the registry's ``attack`` built on ``threat``
    with ``options`` (early exit off where the attack has it: stopping as soon as the
    surrogate is fooled leaves examples at its boundary, which transfer worst)."""
    if isinstance(attack, Attack):
        if options:
            raise TypeError(f"options {sorted(options)} are for an attack given by name; "
                            f"configure the {attack.name} instance itself")
        return attack
    if not isinstance(attack, str):
        raise TypeError(f"attack must be an advkit attack or its name (got "
                        f"{type(attack).__name__})")
    from advkit.attacks import get  # the registry imports this module

    cls = get(attack)
    if "early_exit" in inspect.signature(cls.__init__).parameters:
        options = {"early_exit": False, **options}
    return cls(threat, **options)


class Transfer(Attack):
    """Craft with a white-box attack on surrogate models, judge on the target.

    Papernot, McDaniel, Goodfellow. "Transferability in Machine Learning: from Phenomena to
    Black-Box Attacks using Adversarial Samples", 2016. https://arxiv.org/abs/1605.07277

    ``attack`` runs on the surrogate (several surrogates: on their :class:`Ensemble`, logits
    averaged by default); its examples, projected into the threat model's ball, go to the
    target unchanged. The target answers only the entry check and the final success pass:
    :attr:`target_queries` (2) per sample, so ``labels_only(target, budget=2)`` is enough.
    The surrogates' passes are the attacker's own and are reported apart:
    ``extras["surrogate_queries"]`` and ``extras["surrogate_success"]`` (the white-box
    success on the surrogate, per sample).

    Args:
        threat: norm, eps, bounds (or a configured attack, whose threat is taken).
        surrogates: one ``nn.Module`` or several, in eval mode, for the target's task.
        attack: a configured attack, or a registry name (default ``"pgd"``) built on
            ``threat`` with ``attack_options`` (early exit off where the attack has it).
        weights: ensemble weights (default uniform).
        fuse: ``"logits"`` or ``"softmax"`` (see :class:`Ensemble`).
    """

    paper = "Papernot, McDaniel & Goodfellow 2016, Transferability in Machine Learning"
    taxonomy = Taxonomy(knowledge="gray box")
    norms = ("linf", "l2", "l1")
    #: Label queries to the target per sample: the entry pass and the final success pass.
    target_queries = 2

    def __init__(self, threat: ThreatModel | Attack, surrogates: Sequence[nn.Module] | nn.Module,
                 attack: Attack | str = "pgd", *, weights: Sequence[float] | None = None,
                 fuse: str = "logits", seed: int | None = 0, **attack_options: object) -> None:
        if isinstance(threat, Attack):
            threat, attack = threat.threat, threat
        super().__init__(threat, seed=seed)
        self._surrogate = Ensemble(surrogates, weights, fuse)
        self._attack = white_box_attack(attack, threat, attack_options)
        if self._attack.threat != threat:
            raise ValueError(f"the crafting attack's threat model ({self._attack.threat}) "
                             f"differs from the transfer attack's ({threat})")

    @property
    def surrogates(self) -> list[nn.Module]:
        return list(self._surrogate.members)

    @property
    def attack(self) -> Attack:
        """The configured attack that crafts on the surrogates."""
        return self._attack

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(attack=self._attack.name, attack_config=self._attack.config(),
                   surrogates=[fingerprint(m) for m in self._surrogate.members],
                   weights=self._surrogate.weights, fuse=self._surrogate.fuse)
        return cfg

    def craft(self, x: Tensor, y: Tensor, targets: Tensor | None = None) -> AttackResult:
        """Run the crafting attack on the surrogates only (no target involved): its result,
        with ``x_adv`` projected into the threat model's ball and counts on the surrogate."""
        if any(m.training for m in self._surrogate.modules()):
            raise ValueError("a surrogate was put in train mode after the attack was built: "
                             "call .eval() on it")
        result = self._attack(self._surrogate, x, y, targets=targets)
        result.x_adv = self.threat.project(result.x_adv, x.detach())
        return result

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None,
             ) -> tuple[Tensor, dict[str, Tensor]]:
        _check_classes(self._surrogate, x, clean_logits, y, targets)
        result = self.craft(x, y, targets)
        return result.x_adv, {"surrogate_queries": result.queries,
                              "surrogate_success": result.success}


def _check_classes(surrogate: nn.Module, x: Tensor, clean_logits: Tensor | None, y: Tensor,
                   targets: Tensor | None) -> None:
    """On the first image of the batch: the surrogates' number of classes must be the
    target's (known from its clean scores; under label-only access only the labels can be
    checked against it)."""
    with torch.no_grad():
        classes = surrogate(x[:1]).shape[-1]
    if clean_logits is not None and clean_logits.shape[-1] != classes:
        raise ValueError(f"the target has {clean_logits.shape[-1]} classes but the surrogates "
                         f"have {classes}: surrogates must be trained for the target's task")
    for name, labels in (("labels", y), ("targets", targets)):
        if labels is not None and int(labels.max()) >= classes:
            raise ValueError(f"{name} go up to {int(labels.max())} but the surrogates have "
                             f"{classes} classes: surrogates must be trained for the "
                             "target's task")


class MEA(Transfer):
    """Liu et al.'s ensemble attack: one attack against the surrogates' fused softmax.

    Liu, Chen, Liu, Song. "Delving into Transferable Adversarial Examples and Black-box
    Attacks", ICLR 2017. https://arxiv.org/abs/1611.02770

    The paper fuses k white-box models' softmax outputs ``J_i`` with weights ``alpha_i``
    and optimises ``-log((sum_i alpha_i J_i(x*)) . 1_y*)`` (targeted: descend it for the
    target ``y*``; untargeted: ascend it for the true label). Here the same loss
    (:meth:`loss`) is optimised inside the threat model's eps-ball by projected steepest
    ascent (the sign of the gradient for Linf) for ``steps`` steps of ``step_size``,
    without early exit: the paper's optimisation trades distance for loss with a
    Lagrange factor, a budgeted attack keeps the budget fixed instead.

    Args:
        threat: norm, eps, bounds.
        surrogates: the ensemble (in eval mode).
        weights: the alpha_i (default uniform, as in the paper's experiments).
        steps: ascent steps (default 20); step_size: default ``2.5 * eps / steps``.
        random_start: start from a uniform point of the ball (default False).
    """

    paper = "Liu et al. 2017, Delving into Transferable Adversarial Examples and Black-box Attacks"
    taxonomy = Taxonomy(knowledge="gray box")

    def __init__(self, threat: ThreatModel, surrogates: Sequence[nn.Module] | nn.Module, *,
                 weights: Sequence[float] | None = None, steps: int = 20,
                 step_size: float | None = None, random_start: bool = False,
                 seed: int | None = 0) -> None:
        require_at_least(1, steps=steps)
        from advkit.attacks.pgd import PGD

        crafter = PGD(threat, steps=steps, step_size=step_size, random_start=random_start,
                      loss="ce", early_exit=False, seed=seed)
        super().__init__(threat, surrogates, crafter, weights=weights, fuse="softmax",
                         seed=seed)

    def loss(self, x: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
        """The per-sample fused loss ``-log(sum_i alpha_i softmax(f_i(x))[c])`` with ``c``
        the target (targeted) or the true label (untargeted): what MEA ascends (untargeted)
        or descends (targeted)."""
        cls = targets if targets is not None else y
        return F.cross_entropy(self._surrogate(x), cls, reduction="none")
