"""The generator, critic and inverter of natural adversarial examples (Zhao, Dua & Singh,
"Generating Natural Adversarial Examples", ICLR 2018, https://arxiv.org/abs/1710.11342).

One module holds the three networks so that the trainer checkpoints and resumes them
together; as a zoo architecture (``"ngan"``, kind ``"autoencoder"``) its forward pass is the
reconstruction ``G(I(x))``, whose held-out mean squared error the trainer reports. The
networks follow the authors' MNIST ones at a configurable width: the generator a linear
layer to 4x4 and three stride-2 transposed convolutions to 28x28 with a final sigmoid, the
critic and the inverter three stride-2 convolutions with leaky ReLUs (the inverter then two
linear layers to the latent code). No batch normalisation: the critic's gradient penalty
is per image, and a batch statistic would couple the images of a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The image side the networks take and produce.
SIDE = 28


class _Generator(nn.Module):
    """z (N, z_dim) -> images (N, C, 28, 28) in [0, 1]; ``z_dim`` and ``image_shape`` say
    what it takes and makes (:class:`advkit.attacks.NaturalGAN` checks both)."""

    def __init__(self, z_dim: int, width: int, channels: int) -> None:
        super().__init__()
        self.z_dim, self.width, self.image_shape = z_dim, width, (channels, SIDE, SIDE)
        self.input = nn.Linear(z_dim, 4 * width * 4 * 4)
        # kernel 5, stride 2, padding 2, output padding 1: each doubles the side.
        self.up1 = nn.ConvTranspose2d(4 * width, 2 * width, 5, 2, 2, output_padding=1)
        self.up2 = nn.ConvTranspose2d(2 * width, width, 5, 2, 2, output_padding=1)
        self.out = nn.ConvTranspose2d(width, channels, 5, 2, 2, output_padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = F.relu(self.input(z)).view(-1, 4 * self.width, 4, 4)
        h = F.relu(self.up1(h))[:, :, :7, :7]  # 8x8 cropped to 7x7, as the authors do
        h = F.relu(self.up2(h))
        return torch.sigmoid(self.out(h))


class _Encoder(nn.Module):
    """Images (N, C, 28, 28) -> features (N, 4 * width * 16): the critic's and the inverter's
    convolutions (each its own weights)."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, width, 5, 2, 2), nn.LeakyReLU(0.2),          # 14x14
            nn.Conv2d(width, 2 * width, 5, 2, 2), nn.LeakyReLU(0.2),         # 7x7
            nn.Conv2d(2 * width, 4 * width, 5, 2, 2), nn.LeakyReLU(0.2),     # 4x4
            nn.Flatten(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


class GANInverter(nn.Module):
    """A WGAN-GP generator ``G: z -> x``, its critic ``D: x -> score`` and an inverter
    ``I: x -> z`` (the trainer's ``natural_gan`` recipe trains them:
    :class:`advkit.training.NaturalGANTraining`).

    ``forward(x)`` is the reconstruction ``G(I(x))``. ``steps`` counts the training steps
    taken (a buffer, so checkpoints keep it): :class:`advkit.attacks.NaturalGAN` refuses a
    model that has never been trained.

    Args:
        z_dim: the latent dimension (default 64, the authors').
        width: the channels of the first convolution; the others have 2x and 4x (default
            64, the authors'; 32 trains about 3x faster on a CPU).
        channels: image channels (1 for MNIST and Fashion-MNIST).
    """

    def __init__(self, z_dim: int = 64, width: int = 64, channels: int = 1) -> None:
        super().__init__()
        for name, value in (("z_dim", z_dim), ("width", width), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
        self.z_dim, self.width, self.channels = z_dim, width, channels
        self.generator = _Generator(z_dim, width, channels)
        self.critic = nn.Sequential(_Encoder(width, channels), nn.Linear(4 * width * 16, 1))
        self.inverter = nn.Sequential(
            _Encoder(width, channels), nn.Linear(4 * width * 16, 8 * width), nn.LeakyReLU(0.2),
            nn.Linear(8 * width, z_dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, SIDE, SIDE)

    def generate(self, z: Tensor) -> Tensor:
        """``G(z)``: images (N, C, 28, 28) in [0, 1] from latent codes (N, z_dim)."""
        return self.generator(z)

    def invert(self, x: Tensor) -> Tensor:
        """``I(x)``: latent codes (N, z_dim) of images (N, C, 28, 28)."""
        return self.inverter(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.generator(self.inverter(x))


def ngan(channels: int = 1, z_dim: int = 64, width: int = 64) -> GANInverter:
    """The zoo's factory (``zoo.create("ngan", z_dim=..., width=...)``)."""
    return GANInverter(z_dim=z_dim, width=width, channels=channels)
