"""Model access: what an attack may ask of a model, counted per sample and budgeted.

Three levels, from most to least knowledge:

- ``"gradients"`` (white box): scores, and input gradients of any function of them;
- ``"scores"`` (score-based black box): the model's output scores, no gradient;
- ``"labels"`` (decision-based black box): the top-1 label only.

A user hands an attack an ``nn.Module`` (gradient access) or a view that exposes less:
:func:`scores_only` (all scores, or only the ``top_k`` highest) or :func:`labels_only`.
Every attack declares the level it needs (derived from its taxonomy), and an attack asking
for more than it was given is refused before any query.

A black box need not be a torch module: the two views also take a *scorer*, any function
from images to scores with no gradient behind it (an ONNX Runtime session,
:func:`advkit.models.onnx_session`; a remote endpoint, :func:`advkit.models.remote`).

Hidden scores are ``-inf``: the log of a probability the model did not show. A top-k view
sets every score outside the k highest to ``-inf``; a remote endpoint that answers
probabilities is seen through their logarithms (a probability of 0 is ``-inf``), which
rank the classes as the logits do and differ from them by one constant per image, so the
margin and the cross-entropy of an attack are the same on both.

Inside one attack call the model is seen through an :class:`Oracle`: the only way into
it. Each door counts, per sample, every image it sends through the model (a gradient
costs its forward and its backward pass), and refuses to go past the access object's
per-sample ``budget``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

GRADIENTS, SCORES, LABELS = "gradients", "scores", "labels"
#: Access levels from least to most knowledge; a level includes the ones before it.
LEVELS = (LABELS, SCORES, GRADIENTS)
_WHAT = {GRADIENTS: "gradient access (a white-box nn.Module)",
         SCORES: "score access (advkit.models.scores_only)",
         LABELS: "label-only access (advkit.models.labels_only)"}


#: The label a model that rejects inputs (a :class:`~advkit.defenses.Protected` pipeline
#: with detectors) gives an input it rejects. A rejected adversarial example is a defended
#: one: no attack counts it as a success.
REJECT = -1


def rejects(model: nn.Module) -> bool:
    """Whether ``model`` may reject inputs: it says so with ``rejects_inputs`` and gives
    ``rejected(x)`` (per image, a bool)."""
    return getattr(model, "rejects_inputs", False) is True


class AccessError(PermissionError):
    """An attack asked a model for more than its access level allows."""


class QueryBudgetExceeded(RuntimeError):
    """A query would take a sample past its per-sample budget."""


class Scorer(Protocol):
    """A black box: images (N, C, H, W) in [0, 1] in, scores (N, classes) out, no gradient.

    An ``nn.Module`` is one; :func:`advkit.models.onnx_session` and the endpoint behind
    :func:`advkit.models.remote` are others. Scores are logits or log-probabilities;
    ``-inf`` marks a score the black box does not show.
    """

    def __call__(self, x: Tensor) -> Tensor: ...


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"unknown access level {level!r}: use one of {', '.join(LEVELS)}")
    return level


def allows(given: str, needed: str) -> bool:
    """Whether access at level ``given`` includes level ``needed``."""
    return LEVELS.index(check_level(given)) >= LEVELS.index(check_level(needed))


def check_budget(budget: int | None) -> int | None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or budget < 1):
        raise ValueError(f"budget must be a number of queries per sample >= 1, or None for "
                         f"no limit (got {budget!r})")
    return budget


def _check_top_k(top_k: int | None) -> int | None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k must be a number of scores >= 1, or None for all of them "
                         f"(got {top_k!r})")
    return top_k


def top_k_scores(scores: Tensor, k: int) -> Tensor:
    """``scores`` (N, classes) with all but the ``k`` highest of each row set to ``-inf``."""
    if k >= scores.shape[1]:
        return scores
    top = scores.topk(k, dim=1)
    return torch.full_like(scores, -math.inf).scatter(1, top.indices, top.values)


class ModelAccess:
    """A model exposed at one access level, with an optional per-sample query budget.

    ``model`` is an ``nn.Module`` or, below gradient access, any :class:`Scorer`.
    Subclasses answer :meth:`scores` (no gradient); gradient access also exposes its
    ``module``. ``queries`` counts every image this object ever answered, over all
    calls (a per-call, per-sample count is the attack result's ``queries``).
    """

    level: ClassVar[str]

    def __init__(self, model: nn.Module | Scorer, *, budget: int | None = None,
                 top_k: int | None = None) -> None:
        if not callable(model):
            raise TypeError(f"model must be a torch.nn.Module or a scorer (a function from "
                            f"images to scores) (got {type(model).__name__})")
        self.model = model
        self.budget = check_budget(budget)
        self.top_k = _check_top_k(top_k)
        self.queries = 0

    @property
    def module(self) -> nn.Module | None:
        """The local module (for eval mode), None for a black box that is not one; gradient
        access alone may differentiate it."""
        return self.model if isinstance(self.model, nn.Module) else None

    def scores(self, x: Tensor) -> Tensor:
        """The model's scores for ``x`` (N, classes), without a graph; ``-inf`` where a
        score is hidden (outside the top k)."""
        with torch.no_grad():
            scores = self.model(x)
        # Counted once answered: a query that failed (a remote endpoint that did not answer)
        # raised above and was never seen.
        self.queries += x.shape[0]
        return scores if self.top_k is None else top_k_scores(scores, self.top_k)

    def labels(self, x: Tensor, scores: Tensor | None = None) -> Tensor:
        """The model's labels for ``x`` (N,): the top score, or :data:`REJECT` where a model
        that rejects inputs rejects it (``scores``: the scores at ``x`` if already known)."""
        if scores is None:
            scores = self.scores(x)
        labels = scores.argmax(dim=1)
        if rejects(self.model):
            with torch.no_grad():
                rejected = self.model.rejected(x).to(labels.device)
            labels = torch.where(rejected, torch.full_like(labels, REJECT), labels)
        return labels

    def __repr__(self) -> str:
        model = (type(self.model).__name__ if isinstance(self.model, nn.Module)
                 else repr(self.model))
        top_k = f", top_k={self.top_k}" if self.top_k is not None else ""
        budget = f", budget={self.budget}" if self.budget is not None else ""
        return f"{type(self).__name__}({model}{top_k}{budget})"


class GradientAccess(ModelAccess):
    """White box: the model's scores and input gradients (what an ``nn.Module`` gives)."""

    level = GRADIENTS

    def __init__(self, model: nn.Module, *, budget: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            if callable(model):
                raise AccessError(
                    f"gradient access needs a local torch.nn.Module; {model!r} answers "
                    "scores only (no gradient can be read through it): use "
                    "advkit.models.scores_only or labels_only, and a black-box attack")
            raise TypeError(f"model must be a torch.nn.Module (got {type(model).__name__})")
        super().__init__(model, budget=budget)


class ScoresOnly(ModelAccess):
    """Score-based black box: the model's output scores (all, or the ``top_k`` highest),
    never a gradient."""

    level = SCORES


class LabelsOnly(ModelAccess):
    """Decision-based black box: only the label the model predicts."""

    level = LABELS

    def __init__(self, model: nn.Module | Scorer, *, budget: int | None = None) -> None:
        super().__init__(model, budget=budget)


def gradients(model: nn.Module, budget: int | None = None) -> GradientAccess:
    """``model`` with full (white-box) access, and an optional per-sample query budget."""
    return GradientAccess(model, budget=budget)


def scores_only(model: nn.Module | Scorer, top_k: int | None = None,
                budget: int | None = None) -> ScoresOnly:
    """``model`` seen as a score-based black box: attacks get its scores, no gradient.

    ``model`` is an ``nn.Module`` or a :class:`Scorer` (an ONNX Runtime session from
    :func:`advkit.models.onnx_session`, any function from images to scores). ``top_k``
    shows only the k highest scores of each image, the others ``-inf`` (None: all).
    ``budget`` caps the queries per sample of one attack call, its entry check and its
    final success pass included.
    """
    return ScoresOnly(model, budget=budget, top_k=top_k)


def labels_only(model: nn.Module | Scorer, budget: int | None = None) -> LabelsOnly:
    """``model`` (an ``nn.Module`` or a :class:`Scorer`) seen as a decision-based black
    box: attacks get its top-1 label only."""
    return LabelsOnly(model, budget=budget)


def as_access(model: nn.Module | ModelAccess) -> ModelAccess:
    """An ``nn.Module`` gets gradient access; an access object stays what it is."""
    if isinstance(model, ModelAccess):
        return model
    if isinstance(model, nn.Module):
        return GradientAccess(model)
    raise TypeError(f"model must be a torch.nn.Module or an access object such as "
                    f"advkit.models.scores_only(model) (got {type(model).__name__}); wrap a "
                    "black box (an ONNX session, a scoring function) with scores_only")


class _Counts:
    """Per-sample and total counts of one attack call, shared by an oracle and its views."""

    def __init__(self, n: int, device: torch.device, budget: int | None) -> None:
        self.queries = torch.zeros(n, dtype=torch.int64, device=device)
        self.forward = 0
        self.backward = 0
        self.budget = budget
        self.reserved = 0  # queries per sample kept back for the final success pass

    def add(self, rows: Tensor | None, n: int, forward: int, backward: int,
            who: str) -> None:
        cost = forward + backward
        if self.budget is not None:
            after = self.queries.clone()
            if rows is None:
                after += cost
            else:
                after.index_add_(0, rows, torch.full_like(rows, cost))
            over = after > self.budget - self.reserved
            if over.any():
                raise QueryBudgetExceeded(
                    f"{who} would take {int(over.sum())} samples past the budget of "
                    f"{self.budget} queries per sample ({self.reserved} kept for the final "
                    "success pass); give the attack fewer queries or the access a larger "
                    "budget")
            self.queries = after
        elif rows is None:
            self.queries += cost
        else:
            self.queries.index_add_(0, rows, torch.full_like(rows, cost))
        self.forward += n * forward
        self.backward += n * backward


class Oracle:
    """The model as one attack call sees it: doors gated by the access level, every image
    counted against the sample it belongs to.

    Every door takes ``rows``: for each image of the batch, the index of the sample it
    belongs to (repeats allowed). It may be left out when the batch holds exactly the
    oracle's samples in order. :meth:`view` gives an oracle over a subset of samples, so
    code working on a subset indexes it locally.

    ``check_first``, if given, is called once with the scores of the first pass through
    any door, before anything else sees them: the entry checks of attacks that need no
    clean pass.
    """

    def __init__(self, access: nn.Module | ModelAccess, n: int, *,
                 device: torch.device | str = "cpu", who: str = "the attack",
                 check_first: Callable[[Tensor], None] | None = None) -> None:
        self.access = as_access(access)
        self.who = who
        self._counts = _Counts(n, torch.device(device), self.access.budget)
        self._rows: Tensor | None = None  # the samples this view covers (None: all)
        self._n = n
        self._check = [check_first]

    # -- bookkeeping ---------------------------------------------------------------------
    @property
    def level(self) -> str:
        return self.access.level

    @property
    def model(self) -> nn.Module | None:
        return self.access.module

    @property
    def forward_passes(self) -> int:
        """Images sent forward through the model so far (this call, all samples)."""
        return self._counts.forward

    @property
    def backward_passes(self) -> int:
        """Images whose gradient was taken so far (this call, all samples)."""
        return self._counts.backward

    @property
    def queries(self) -> Tensor:
        """Per sample (of the whole call): forward plus backward passes so far."""
        return self._counts.queries

    @property
    def check_first(self) -> Callable[[Tensor], None] | None:
        return self._check[0]

    @check_first.setter
    def check_first(self, check: Callable[[Tensor], None] | None) -> None:
        self._check[0] = check

    def __len__(self) -> int:
        return self._n

    def view(self, rows: Tensor) -> Oracle:
        """An oracle over samples ``rows`` of this one (same counts, same model)."""
        sub = object.__new__(Oracle)
        sub.access, sub.who, sub._counts, sub._check = (self.access, self.who, self._counts,
                                                        self._check)
        sub._rows = rows if self._rows is None else self._rows[rows]
        sub._n = rows.shape[0]
        return sub

    def _charge(self, x: Tensor, rows: Tensor | None, forward: int, backward: int) -> None:
        if rows is None:
            if x.shape[0] != self._n:
                raise RuntimeError(
                    f"{self.who} sent {x.shape[0]} images through an oracle over {self._n} "
                    "samples without rows=: say which sample each image belongs to")
            rows = self._rows
        elif self._rows is not None:
            rows = self._rows[rows]
        self._counts.add(rows, x.shape[0], forward, backward, self.who)

    def _need(self, level: str, door: str) -> None:
        if not allows(self.level, level):
            raise AccessError(f"{self.who} asked for {door}, which needs {_WHAT[level]}; it "
                              f"was given {_WHAT[self.level]}")

    def _checked(self, scores: Tensor) -> Tensor:
        if self._check[0] is not None:
            check, self._check[0] = self._check[0], None
            check(scores.detach())
        return scores

    # -- the doors -----------------------------------------------------------------------
    def logits(self, x: Tensor, rows: Tensor | None = None,
               batch_size: int | None = None) -> Tensor:
        """The model's scores at ``x`` (logits for a local model), one query per image.

        ``batch_size``: the most images per model call (None: all at once). The whole
        batch is charged first, so a batch that would break the budget sends nothing.
        """
        self._need(SCORES, "scores")
        self._charge(x, rows, 1, 0)
        return torch.cat([self._checked(self.access.scores(part))
                          for part in _chunks(x, batch_size)])

    def labels(self, x: Tensor, rows: Tensor | None = None,
               batch_size: int | None = None) -> Tensor:
        """The labels the model predicts at ``x``, one query per image; :data:`REJECT`
        where a model that rejects inputs (a pipeline with detectors) rejects it.
        ``batch_size`` as for :meth:`logits`."""
        self._charge(x, rows, 1, 0)
        if self.level == LABELS:
            return torch.cat([self.access.labels(part) for part in _chunks(x, batch_size)])
        return torch.cat([self.access.labels(part, self._checked(self.access.scores(part)))
                          for part in _chunks(x, batch_size)])

    def gradient(self, x: Tensor, objective: Callable[[Tensor], Tensor],
                 rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits at ``x`` and the input gradient of ``objective(logits)`` (per sample,
        summed): one forward and one backward pass per image. No parameter gradient
        accumulates."""
        self._need(GRADIENTS, "a gradient")
        self._charge(x, rows, 1, 1)
        self.access.queries += x.shape[0]
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self._checked(self.access.module(x))
            (grad,) = torch.autograd.grad(objective(logits).sum(), x)
        return logits.detach(), grad

    def gradients(self, x: Tensor,
                  objectives: Callable[[Tensor, Tensor], Sequence[Tensor]],
                  rows: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Logits at ``x`` and k per-sample objectives with their input gradients.

        ``objectives(logits, x)`` returns k tensors (n,); each may read, besides the
        logits, anything the model computes from ``x`` (a pipeline's detector scores: see
        :meth:`advkit.defenses.detectors.Detector.attack_score`). Returns the logits, the
        objectives' values and their gradients (zero where one does not depend on ``x``).
        Costs one forward and k backward passes per image: the model, with whatever the
        objectives run on the same input, is one query.
        """
        self._need(GRADIENTS, "gradients")
        self.access.queries += x.shape[0]
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self._checked(self.access.module(xg))
            values = list(objectives(logits, xg))
            self._charge(x, rows, 1, len(values))
            grads = []
            for j, value in enumerate(values):
                grad = None
                if value.requires_grad:
                    (grad,) = torch.autograd.grad(value.sum(), xg, retain_graph=j < len(values) - 1,
                                                  allow_unused=True)
                grads.append(grad if grad is not None else torch.zeros_like(xg))
        return logits.detach(), [v.detach() for v in values], grads

    def jacobian(self, x: Tensor, coefficients: Tensor | Callable[[Tensor], Tensor],
                 rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Input gradients of k linear combinations of the logits at ``x``, per sample.

        ``coefficients`` is a tensor (n, k, C), or a function of the logits at ``x``
        returning one (so the combinations may depend on the current prediction).
        Returns the logits (n, C), the combinations' values (n, k) and their input
        gradients (n, k, *x.shape[1:]). Costs one forward and k backward passes per
        image: one graph, k backward passes through it, batched over the samples. (One
        backward with the k cotangents batched by ``is_grads_batched`` was no faster on
        CPU, and needs every operation of the model to support vmap.)
        """
        self._need(GRADIENTS, "a Jacobian")
        self.access.queries += x.shape[0]
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self._checked(self.access.module(xg))
            coef = coefficients(logits.detach()) if callable(coefficients) else coefficients
            coef = coef.to(logits.dtype)
            k = coef.shape[1]
            self._charge(x, rows, 1, k)
            values = (coef * logits[:, None, :]).sum(dim=2)
            grads = [torch.autograd.grad(values[:, j].sum(), xg, retain_graph=j < k - 1)[0]
                     for j in range(k)]
        return logits.detach(), values.detach(), torch.stack(grads, dim=1)

    # -- for Attack.__call__ -------------------------------------------------------------
    def reserve(self, queries: int) -> None:
        """Keep ``queries`` per sample of the budget back (for the final success pass)."""
        self._counts.reserved = queries


def _chunks(x: Tensor, batch_size: int | None) -> list[Tensor]:
    """``x`` in model calls of at most ``batch_size`` images (None: one call). On CPU one
    call of thousands of small images ran at half the images/s of 512 (the activations no
    longer fit in cache)."""
    if batch_size is None or x.shape[0] <= batch_size:
        return [x]
    return [x[i:i + batch_size] for i in range(0, x.shape[0], batch_size)]
