"""Shared by the detector tests: the MNIST split they fit and test on, AUROC, one thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

#: Clean images the detectors fit on (cheap: forward passes only), then the images attacked
#: for fitting (x_adv) and for the test.
N_FIT, N_ADV_FIT, N_TEST = 1000, 300, 300


def pgd_split(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    """Clean fit images and labels, PGD images to fit on, clean and PGD test images: the
    first 1,600 test images, PGD Linf 0.3 (20 steps, seed 0) on the last 600 of them
    (the clean test images are the originals of the PGD test images)."""
    from advkit import ThreatModel
    from advkit.attacks import PGD

    x, y = x[:N_FIT + N_ADV_FIT + N_TEST], y[:N_FIT + N_ADV_FIT + N_TEST]
    attacked = slice(N_FIT, None)
    adv = PGD(ThreatModel("linf", 0.3), steps=20, seed=0)(model, x[attacked], y[attacked]).x_adv
    return x[:N_FIT], y[:N_FIT], adv[:N_ADV_FIT], x[N_FIT + N_ADV_FIT:], adv[N_ADV_FIT:]


def auroc(detector, clean: Tensor, adversarial: Tensor) -> float:
    """Area under the ROC curve of ``detector.score`` (adversarial = positive)."""
    scores = torch.cat([detector.score(clean), detector.score(adversarial)])
    truth = torch.cat([torch.zeros(len(clean)), torch.ones(len(adversarial))])
    return float(roc_auc_score(truth.numpy(), scores.numpy()))


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the thread count. The detector and autoencoder
    networks are tiny: their many small operations gain nothing from a second thread, and
    beside another busy process each waits for it (training the test autoencoder for one
    epoch on 5,000 images took 4.0 s on one thread and 49.9 s on two, beside a one-thread
    training job)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
