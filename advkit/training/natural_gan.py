"""Training the generator, critic and inverter of natural adversarial examples (Zhao, Dua &
Singh, "Generating Natural Adversarial Examples", ICLR 2018): WGAN-GP for the generator and
its critic (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs"), the inverter
by reconstruction, all three through the one trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.models.gan import GANInverter
from advkit.training.recipe import Recipe, unwrap
from advkit.training.trainer import TrainConfig, TrainResult, train


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Build graphs that pass gradients through ``module`` without computing its weights'
    gradients (another part's update: they would be discarded anyway)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class NaturalGANTraining(Recipe):
    """WGAN-GP with an inverter, on the zoo's ``ngan`` model (:class:`GANInverter`).

    One trainer step is one generator iteration of WGAN-GP: the batch is split into
    ``critic_steps`` equal parts; on each, the critic takes one step on
    ``E[D(G(z))] - E[D(x)] + gradient_penalty * E[(||grad D(x_hat)|| - 1)^2]`` (``x_hat`` on
    the segment between a real and a generated image, ``z ~ N(0, I)``), then the inverter one
    on ``E||G(I(x)) - x||^2 + latent_weight * E||I(G(z)) - z||^2`` (mean squared errors per
    pixel and per latent coordinate, as the authors' code); then the generator takes one step
    on ``-E[D(G(z))]`` with a batch the size of a part. The authors train the inverter with the
    critic, each on the same images, five critic steps per generator step, gradient
    penalty 10, latent weight 0.1, Adam at 1e-4: the defaults here, with the batch split
    (a batch of 400 gives their parts of 80).

    ``loss`` (the history's loss) is the inverter's mean loss over the parts; the trainer's
    held-out metric is the reconstruction MSE of ``G(I(x))``.

    Args:
        critic_steps: critic (and inverter) steps per generator step (default 5).
        gradient_penalty: the weight of the critic's gradient penalty (default 10).
        latent_weight: the weight of the latent reconstruction ``||I(G(z)) - z||^2``
            (default 0.1, the authors' lambda).
    """

    name = "natural_gan"
    reconstructs = True

    def __init__(self, critic_steps: int = 5, gradient_penalty: float = 10.0,
                 latent_weight: float = 0.1) -> None:
        if isinstance(critic_steps, bool) or not isinstance(critic_steps, int) \
                or critic_steps < 1:
            raise ValueError(f"critic_steps must be an integer >= 1 (got {critic_steps!r})")
        for name, value in (("gradient_penalty", gradient_penalty),
                            ("latent_weight", latent_weight)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name} must be a weight >= 0 (got {value!r})")
        self.critic_steps = critic_steps
        self.gradient_penalty = float(gradient_penalty)
        self.latent_weight = float(latent_weight)

    def params(self) -> dict[str, Any]:
        return {"critic_steps": self.critic_steps, "gradient_penalty": self.gradient_penalty,
                "latent_weight": self.latent_weight}

    def parts(self, model: nn.Module) -> dict[str, nn.Module]:
        gan = _gan(model)
        return {"critic": gan.critic, "inverter": gan.inverter, "generator": gan.generator}

    def critic_loss(self, gan: GANInverter, x: Tensor, fake: Tensor) -> Tensor:
        """The WGAN-GP critic loss on real ``x`` and generated ``fake`` (no graph to G)."""
        alpha = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
        between = (x + alpha * (fake - x)).requires_grad_(True)
        (grad,) = torch.autograd.grad(gan.critic(between).sum(), between, create_graph=True)
        penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        return (gan.critic(fake).mean() - gan.critic(x).mean()
                + self.gradient_penalty * penalty)

    def inverter_loss(self, gan: GANInverter, x: Tensor, z: Tensor,
                      fake: Tensor) -> tuple[Tensor, Tensor]:
        """The inverter's loss on real ``x`` and generated ``fake = G(z)``, and ``G(I(x))``."""
        with _frozen(gan.generator):
            reconstruction = gan.generate(gan.invert(x))
        loss = (F.mse_loss(reconstruction, x)
                + self.latent_weight * F.mse_loss(gan.invert(fake), z))
        return loss, reconstruction

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The inverter's loss on ``x`` (with fresh latent codes) and the reconstruction."""
        gan = _gan(model)
        z = torch.randn(x.shape[0], gan.z_dim, device=x.device)
        with torch.no_grad():
            fake = gan.generate(z)
        return self.inverter_loss(gan, x, z, fake)

    def step(self, model: nn.Module, x: Tensor, y: Tensor,
             update: Callable[[str, Tensor], None]) -> tuple[Tensor, Tensor]:
        gan = _gan(model)
        parts = [part for part in x.tensor_split(self.critic_steps) if part.shape[0]]
        losses, reconstructions = [], []
        for real in parts:
            z = torch.randn(real.shape[0], gan.z_dim, device=x.device)
            with torch.no_grad():
                fake = gan.generate(z)
            update("critic", self.critic_loss(gan, real, fake))
            loss, reconstruction = self.inverter_loss(gan, real, z, fake)
            update("inverter", loss)
            losses.append(loss.detach() * real.shape[0])
            reconstructions.append(reconstruction.detach())
        z = torch.randn(parts[0].shape[0], gan.z_dim, device=x.device)
        with _frozen(gan.critic):
            generator_loss = -gan.critic(gan.generate(z)).mean()
        update("generator", generator_loss)
        with torch.no_grad():
            gan.steps += 1
        return torch.stack(losses).sum() / x.shape[0], torch.cat(reconstructions)


def _gan(model: nn.Module) -> GANInverter:
    gan = unwrap(model)
    if not isinstance(gan, GANInverter):
        raise ValueError(f"the natural_gan recipe trains the zoo's ngan model (a "
                         f"GANInverter), not a {type(gan).__name__}: use "
                         "TrainConfig(arch='ngan')")
    return gan


def train_gan(out_dir: str | Path, *, dataset: str = "mnist", epochs: int = 10,
              batch_size: int = 400, train_limit: int | None = None,
              val_limit: int | None = 1000, z_dim: int = 64, width: int = 64,
              lr: float = 1e-4, seed: int = 0, recipe: NaturalGANTraining | None = None,
              progress: bool = True, device: str | torch.device = "cpu",
              log: Callable[[str], None] = print, **config: Any) -> TrainResult:
    """Train a :class:`GANInverter` on ``dataset`` with :class:`NaturalGANTraining` through
    the trainer (checkpointed to ``out_dir`` every epoch; an interrupted run resumes, and a
    finished one is reused). Adam at ``lr`` (default 1e-4, the authors'), a constant rate.
    ``batch_size`` images per generator step (split among the critic steps); ``config``:
    further :class:`TrainConfig` fields. Returns the trainer's :class:`TrainResult`, whose
    ``model`` is the trained :class:`GANInverter` in eval mode."""
    recipe = recipe or NaturalGANTraining()
    settings = TrainConfig(arch="ngan", dataset=dataset, epochs=epochs, batch_size=batch_size,
                           lr=lr, optimizer="adam", schedule="constant", seed=seed,
                           train_limit=train_limit, val_limit=val_limit, recipe=recipe.name,
                           arch_kwargs={"z_dim": z_dim, "width": width})
    return train(replace(settings, **config), out_dir, recipe=recipe, progress=progress,
                 device=device, log=log)
