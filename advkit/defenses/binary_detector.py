"""A binary detector network: a small classifier trained to tell clean from adversarial.

Metzen, Genewein, Fischer, Bischoff. "On Detecting Adversarial Perturbations", ICLR 2017.
https://arxiv.org/abs/1702.04267
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from advkit.attacks.feature_adversary import capture, resolve_layer
from advkit.defenses.detectors import Detector, Layer
from advkit.models.device import device_of
from advkit.progress import progress_bar

__all__ = ["BinaryDetector"]


class BinaryDetector(Detector):
    """A detector network on the input or on one layer's activations of the classifier,
    trained to output "adversarial" on ``x_adv`` and "clean" on clean images.

    The paper's setting (Metzen et al. 2017, CIFAR-10): a 32-layer ResNet, the detector a
    small convolutional network (conv 96, conv 192 with max pooling, a 1x1 convolution to
    two classes, global average pooling) attached at the input or after one of the
    residual stages (the middle ones detected best), trained with Adam for 20 epochs on
    clean images and adversarial examples of the attack it is meant to detect, the
    classifier frozen. Here the same design, narrower (``width`` channels, doubled after
    the first pooling), with one output, the logit of "adversarial" (the paper's
    two-class softmax has the difference of its two logits for the same role). Conv
    feature maps get up to two 2x2 max poolings while at least 8 pixels a side remain;
    flat activations (a linear layer's) get a two-layer perceptron instead. Inputs are
    standardised per channel with the clean training images' statistics.

    Not implemented: the paper's *dynamic adversary training*, which crafts the
    adversarial examples during training against classifier and detector together (an
    adaptive attacker's examples); here the detector learns from the fixed ``x_adv``
    given to ``fit``, so it is fitted to one non-adaptive attack.

    Measured on the MNIST test model against PGD (Linf 0.3, 20 steps; fitted on 1,000
    clean and 300 PGD images, tested on 300 others of each): AUROC 1.00 on the input and
    on layers 6 (the second pooling) and 9 (the hidden linear layer's ReLU).

    Args:
        layer: where the detector looks: ``None`` (default) the input image, else a layer
            of the model (a module name from ``named_modules()`` or an index into an
            ``nn.Sequential``), whose output it takes.
        width: channels of the first convolution (default 16); hidden units / 4 for flat
            activations.
        epochs: training epochs over clean and adversarial images (default 10).
        lr: Adam's learning rate (default 1e-3).
        train_batch_size: images per training step (default 64).
        progress: show a progress bar while training (default off).
        **kwargs: ``holdout``, ``batch_size``, ``seed`` (see :class:`Detector`); the seed
            also draws the network's initial weights and the training order.
    """

    paper = "Metzen et al. 2017, On Detecting Adversarial Perturbations"
    needs_adversarial = True

    def __init__(self, *, layer: Layer | None = None, width: int = 16, epochs: int = 10,
                 lr: float = 1e-3, train_batch_size: int = 64, progress: bool = False,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, str | int)):
            raise TypeError(f"layer must be None (the input), a module name (str) or an index "
                            f"into an nn.Sequential (int) (got {type(layer).__name__})")
        for name, value in (("width", width), ("epochs", epochs),
                            ("train_batch_size", train_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
        if (isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr)
                or lr <= 0):
            raise ValueError(f"lr must be a learning rate > 0, such as 1e-3 (got {lr!r})")
        self.layer = layer
        self.width = width
        self.epochs = epochs
        self.lr = float(lr)
        self.train_batch_size = train_batch_size
        self.progress = bool(progress)
        self._network: nn.Module | None = None

    def _features(self, x: Tensor) -> Tensor:
        """What the detector network sees: ``x``, or the layer's output (with gradients)."""
        if self.layer is None:
            return x
        assert self.model is not None
        with capture(resolve_layer(self.model, self.layer)) as captured:
            self.model(x)
        return captured["out"]

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor | None, x_adv: Tensor | None) -> None:
        assert x_adv is not None
        self._network = None
        device = device_of(model)
        if self.layer is not None:
            resolve_layer(model, self.layer)  # an unknown layer fails here, naming the valid ones
        with torch.no_grad():
            sample = torch.cat([self._features(x[i:i + self.batch_size].to(device)).cpu()
                                for i in range(0, min(len(x), 1000), self.batch_size)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            network = _network(sample, self.width).to(device)
        inputs = torch.cat([x, x_adv])
        labels = torch.cat([torch.zeros(len(x)), torch.ones(len(x_adv))])
        # Weigh the classes equally whatever their counts (the paper trains on pairs).
        pos_weight = torch.tensor(len(x) / len(x_adv), device=device)
        optimizer = torch.optim.Adam(network.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        steps = -(-len(inputs) // self.train_batch_size)
        bar = progress_bar(True, f"{self.name} training", self.epochs * steps) \
            if self.progress else nullcontext(None)
        network.train()
        with bar as shown:
            for _ in range(self.epochs):
                order = torch.randperm(len(inputs), generator=generator)
                for i in range(steps):
                    batch = order[i * self.train_batch_size:(i + 1) * self.train_batch_size]
                    with torch.no_grad():  # the classifier is fixed; only the detector learns
                        features = self._features(inputs[batch].to(device))
                    logits = network(features).squeeze(1)
                    loss = F.binary_cross_entropy_with_logits(
                        logits, labels[batch].to(device), pos_weight=pos_weight)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if shown is not None:
                        shown.advance(f"loss {loss.item():.4f}")
        # Attacks differentiate the score with respect to x only; frozen weights gather no
        # gradients from their backward passes.
        self._network = network.eval().requires_grad_(False)

    def _score(self, x: Tensor) -> Tensor:
        assert self._network is not None
        return self._network(self._features(x)).squeeze(1)


class _Standardize(nn.Module):
    """``(f - mean) / std`` per channel (dimension 1), with fixed statistics."""

    def __init__(self, sample: Tensor) -> None:
        super().__init__()
        dims = [d for d in range(sample.dim()) if d != 1]
        shape = (1, -1) + (1,) * (sample.dim() - 2)
        self.register_buffer("mean", sample.mean(dim=dims).reshape(shape))
        self.register_buffer("std", sample.std(dim=dims).clamp_min(1e-6).reshape(shape))

    def forward(self, f: Tensor) -> Tensor:
        return (f - self.mean) / self.std


def _network(sample: Tensor, width: int) -> nn.Module:
    """The detector network for features shaped like ``sample`` (N, ...), one logit out."""
    if sample.dim() != 4:  # flat activations (or anything not a feature map): an MLP
        return nn.Sequential(nn.Flatten(), _Standardize(sample.flatten(1)),
                             nn.Linear(sample[0].numel(), 4 * width), nn.ReLU(),
                             nn.Linear(4 * width, 1))
    channels, size = sample.shape[1], min(sample.shape[2:])
    layers: list[nn.Module] = [_Standardize(sample)]
    widths = [channels, width, 2 * width, 2 * width]
    for i in range(3):
        layers += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1), nn.ReLU()]
        if i < 2 and size >= 8:  # pool while at least 8 pixels a side remain (28 -> 14 -> 7)
            layers.append(nn.MaxPool2d(2))
            size //= 2
    layers += [nn.Conv2d(widths[-1], 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)
