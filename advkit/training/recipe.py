"""A training recipe: how one batch becomes a loss. The trainer runs any recipe.

Standard training is the plain recipe; adversarial training, TRADES, MART,
distillation and noise augmentation are recipes too, so they all share one
trainer (seeding, checkpoints, resume, progress, distributed data parallelism).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class StopTraining(Exception):
    """Raised by a recipe's ``end_epoch`` to end training early (with the reason)."""


class Recipe:
    """Standard training: cross-entropy on the clean batch.

    Subclasses override :meth:`loss` (and may override :meth:`start_epoch`,
    :meth:`start_step`, :meth:`end_epoch`). A recipe that trains several parts of the model
    with optimizers of their own, in alternating updates (a GAN's critic, generator and
    inverter), names them in :meth:`parts` and overrides :meth:`step`. Everything that
    changes the result must be in :meth:`params`: it is recorded in the checkpoint, and a
    resumed run with other parameters is refused.
    """

    name = "standard"
    #: A reconstructing recipe trains an autoencoder (images -> images) instead of a
    #: classifier: the trainer then reports the held-out reconstruction MSE instead of
    #: accuracies, and :meth:`loss` returns the reconstruction in place of the logits.
    reconstructs = False

    def params(self) -> dict[str, Any]:
        """The recipe's settings as JSON values."""
        return {}

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (``epoch`` counts from 0): schedules live here."""

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        """Called before each batch (``step`` counts batches from 0 over the whole run,
        resumed runs included): schedules that move per step live here (certified
        training ramps eps every step, as its papers do)."""

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The loss of a batch (the model is in train mode) and the logits whose
        accuracy the progress bar shows."""
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def parts(self, model: nn.Module) -> dict[str, nn.Module]:
        """The parts of ``model`` that get an optimizer (and a schedule) of their own, by
        name; the trainer checkpoints each. Default: the whole model, one optimizer."""
        return {"model": model}

    def step(self, model: nn.Module, x: Tensor, y: Tensor,
             update: Callable[[str, Tensor], None]) -> tuple[Tensor, Tensor]:
        """One training step on a batch: each ``update(part, loss)`` backpropagates ``loss``
        and steps the optimizer of that part of :meth:`parts` (the other parts' gradients
        are not used). Returns what :meth:`loss` returns, for the history and the progress
        bar. Default: one update of the whole model with :meth:`loss`. A recipe of several
        parts alternates its updates here, each loss computed after the update before it
        (a GAN's generator loss reads the critic just updated)."""
        loss, logits = self.loss(model, x, y)
        update("model", loss)
        return loss, logits

    def end_epoch(self, model: nn.Module, epoch: int, x_val: Tensor,
                  y_val: Tensor) -> dict[str, float]:
        """Called after each epoch with the model in eval mode and the held-out data;
        returns extra metrics for the history, or raises :class:`StopTraining`."""
        return {}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (attacks run on it directly:
    an input-gradient pass through the wrapper would confuse its gradient reducer)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Craft training-time adversarial examples in eval mode (attack passes must not
    update batch-norm statistics), then restore train mode. Yields the bare module."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        yield inner
    finally:
        inner.train(was_training)
