"""The architecture zoo: classifiers that take [0, 1] images and return logits, and
autoencoders that map [0, 1] images to [0, 1] images (input reconstruction defenses).

Each factory returns a fresh, randomly initialised model; a classifier's first layer is a
:class:`Normalize`. ``ARCHITECTURES`` maps names to factories (``kind`` says which of the
two a model is); ``create(name)`` builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.models.gan import ngan
from advkit.models.normalize import Normalize

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def mnist_cnn(num_classes: int = 10, channels: int = 1) -> nn.Module:
    """The MNIST CNN of Madry et al. (2018): conv32-5x5, pool, conv64-5x5, pool, fc1024."""
    return nn.Sequential(
        Normalize(MNIST_MEAN * channels, MNIST_STD * channels),
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 1024), nn.ReLU(), nn.Linear(1024, num_classes),
    )


def small_cnn(num_classes: int = 10, channels: int = 1) -> nn.Module:
    """A small, fast MNIST CNN (conv16, conv32, fc128): ~99% on MNIST in a minute on a CPU."""
    return nn.Sequential(
        Normalize(MNIST_MEAN * channels, MNIST_STD * channels),
        nn.Conv2d(channels, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


def stride_cnn(num_classes: int = 10, channels: int = 1) -> nn.Module:
    """A fast MNIST CNN for adversarial training: conv32-4x4/2, conv64-4x4/2, fc512.

    Stride-2 convolutions instead of pooling (after the MNIST network of Wong et al.
    2020, twice as wide and with a wider hidden layer): on a CPU it runs about 2.5x
    the input-gradient throughput of the Madry CNN, which is what PGD training spends.
    """
    return nn.Sequential(
        Normalize(MNIST_MEAN * channels, MNIST_STD * channels),
        nn.Conv2d(channels, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, num_classes),
    )


def lenet5(num_classes: int = 10, channels: int = 1) -> nn.Module:
    """LeNet-5 (LeCun et al., 1998) with ReLU and max pooling, for 28x28 inputs."""
    return nn.Sequential(
        Normalize(MNIST_MEAN * channels, MNIST_STD * channels),
        nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def mlp(num_classes: int = 10, channels: int = 1, size: int = 28,
        hidden: tuple[int, ...] = (100, 100)) -> nn.Module:
    """A small ReLU MLP (Linear and ReLU layers only: what verifiers handle exactly)."""
    layers: list[nn.Module] = [Normalize(MNIST_MEAN * channels, MNIST_STD * channels), nn.Flatten()]
    width = channels * size * size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 (He et al., 2016, "Identity Mappings in Deep Residual Networks")."""

    def __init__(self, num_classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        self.normalize = Normalize(CIFAR_MEAN if channels == 3 else MNIST_MEAN,
                                   CIFAR_STD if channels == 3 else MNIST_STD)
        self.conv = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_PreActBlock(cin, cout, stride), _PreActBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.conv(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.fc(out)


class WideResNet(nn.Module):
    """Wide ResNet (Zagoruyko & Komodakis, 2016); WRN-28-10 by default."""

    def __init__(self, num_classes: int = 10, channels: int = 3, depth: int = 28,
                 widen: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 (got {depth})")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = Normalize(CIFAR_MEAN if channels == 3 else MNIST_MEAN,
                                   CIFAR_STD if channels == 3 else MNIST_STD)
        self.conv = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2), strict=True):
            for j in range(n):
                blocks.append(_PreActBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.conv(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.fc(out)


def magnet_ae(channels: int = 1, filters: int = 3) -> nn.Module:
    """MagNet's MNIST autoencoder (Meng & Chen 2017, table 1, detector I and reformer):
    conv 3x3xF sigmoid, average pooling 2x2, two conv 3x3xF sigmoid, upsampling 2x2, conv
    3x3xF sigmoid, conv 3x3xC sigmoid, all "same" padded (F = ``filters``, 3 in the
    paper). The final sigmoid keeps the output in [0, 1]. Height and width must be even.
    """
    return nn.Sequential(
        nn.Conv2d(channels, filters, 3, padding=1), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.Conv2d(filters, filters, 3, padding=1), nn.Sigmoid(),
        nn.Conv2d(filters, filters, 3, padding=1), nn.Sigmoid(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(filters, filters, 3, padding=1), nn.Sigmoid(),
        nn.Conv2d(filters, channels, 3, padding=1), nn.Sigmoid(),
    )


@dataclass(frozen=True)
class Architecture:
    """A zoo entry: its factory, the input shape it expects, and what it is for.

    ``kind`` is ``"classifier"`` (images -> logits; the factory takes ``num_classes``) or
    ``"autoencoder"`` (images -> images of the same shape, in [0, 1]).
    """

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    description: str
    kind: str = "classifier"


ARCHITECTURES: dict[str, Architecture] = {
    "mnist_cnn": Architecture(mnist_cnn, (1, 28, 28), "Madry et al. MNIST CNN (3.3M params)"),
    "small_cnn": Architecture(small_cnn, (1, 28, 28), "small fast MNIST CNN (0.2M params)"),
    "stride_cnn": Architecture(stride_cnn, (1, 28, 28),
                               "stride-2 MNIST CNN for adversarial training (1.6M params)"),
    "lenet5": Architecture(lenet5, (1, 28, 28), "LeNet-5"),
    "mlp": Architecture(mlp, (1, 28, 28), "ReLU MLP 784-100-100-10 (for verification)"),
    "preact_resnet18": Architecture(PreActResNet18, (3, 32, 32), "PreAct ResNet-18 (CIFAR)"),
    "wrn_28_10": Architecture(WideResNet, (3, 32, 32), "WideResNet-28-10 (CIFAR)"),
    "magnet_ae": Architecture(magnet_ae, (1, 28, 28),
                              "MagNet's MNIST denoising autoencoder (images -> images)",
                              kind="autoencoder"),
    "ngan": Architecture(ngan, (1, 28, 28),
                         "NaturalGAN's WGAN-GP generator, critic and inverter (x -> G(I(x)))",
                         kind="autoencoder"),
}

#: The zoo's classifiers and autoencoders, by name.
CLASSIFIERS = [name for name, a in ARCHITECTURES.items() if a.kind == "classifier"]
AUTOENCODERS = [name for name, a in ARCHITECTURES.items() if a.kind == "autoencoder"]


def create(name: str, *, lipschitz: bool = False, **kwargs: object) -> nn.Module:
    """A fresh model of the zoo architecture ``name`` (in eval mode).

    ``kwargs`` go to the factory (``num_classes``, ``channels``, ...). With
    ``lipschitz=True`` every convolution and linear layer is spectrally normalised
    (Miyato et al. 2018, arXiv 1802.05957), which bounds each layer's Lipschitz
    constant (for convolutions, the normalised quantity is the reshaped kernel's
    largest singular value: a bound up to a kernel-size factor, not exact).
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}: use one of "
                         f"{', '.join(ARCHITECTURES)}")
    model = ARCHITECTURES[name].factory(**kwargs)
    if lipschitz:
        spectral_normalize(model)
    return model.eval()


def spectral_normalize(model: nn.Module) -> nn.Module:
    """Spectrally normalise every Conv2d and Linear layer of ``model`` in place."""
    from torch.nn.utils.parametrizations import spectral_norm

    for module in list(model.modules()):
        if isinstance(module, nn.Conv2d | nn.Linear):
            spectral_norm(module)
    return model


def settle_spectral_norms(model: nn.Module, x: Tensor, rounds: int = 50) -> None:
    """Converge the power iteration of every spectral norm (in place, without gradients).

    During training the estimate of each layer's largest singular value takes one
    power-iteration step per batch while the weights move, so it lags behind; the
    model as saved would then exceed the unit bound by a few percent. Only the
    normalisations run in train mode here: batch-norm statistics do not change.
    """
    from torch.nn.utils.parametrize import is_parametrized

    norms = [p for m in model.modules() if is_parametrized(m, "weight")
             for p in m.parametrizations.weight]
    if not norms:
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for p in norms:
        p.train()
    try:
        with torch.no_grad():
            for _ in range(rounds):
                model(x)
    finally:
        for module, training in modes:
            module.training = training
