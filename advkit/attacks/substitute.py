"""Substitute training (Papernot et al. 2017): learn a local copy from the target's labels,
then transfer attacks crafted on it.

Papernot, McDaniel, Goodfellow, Jha, Celik, Swami. "Practical Black-Box Attacks against
Machine Learning", AsiaCCS 2017. https://arxiv.org/abs/1602.02697
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.attacks.base import Attack, Oracle, Taxonomy, require_at_least
from advkit.attacks.transfer import Transfer, white_box_attack
from advkit.models.access import REJECT
from advkit.threat import ThreatModel


def jacobian_augmentation(substitute: nn.Module, x: Tensor, labels: Tensor,
                          lam: float) -> Tensor:
    """The paper's augmentation step: ``x + lam * sign(J_F(x)[O(x)])`` for each image.

    ``J_F(x)[O(x)]`` is the row of the substitute's Jacobian for the class the oracle gave
    ``x``: the gradient of the substitute's output ``F`` (its softmax probabilities, the
    paper's ``F``) for that class. The new points lie along the directions in which the
    substitute's output varies most, near the target's decision boundaries. Clipped to
    [0, 1] (the paper's inputs are images).
    """
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        probs = F.softmax(substitute(xg), dim=1)
        (grad,) = torch.autograd.grad(probs.gather(1, labels[:, None]).sum(), xg)
    return (x + lam * grad.sign()).clamp(0.0, 1.0).detach()


def reservoir_sample(n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices of a uniform sample of ``k`` of ``n`` items, read as a stream (Vitter's
    algorithm R): the first ``k`` fill the reservoir, item ``i`` then replaces a random
    slot with probability ``k / (i + 1)``. All ``n`` when ``k >= n``."""
    if k >= n:
        return torch.arange(n)
    reservoir = torch.arange(k)
    draws = torch.rand(n - k, generator=generator,
                       device=generator.device if generator is not None else "cpu")
    for offset, u in enumerate(draws.tolist()):
        i = k + offset
        slot = int(u * (i + 1))
        if slot < k:
            reservoir[slot] = i
    return reservoir


def augmentation_sizes(n_seed: int, rounds: int, sigma: int | None, kappa: int) -> list[int]:
    """How many new points each substitute epoch labels: ``n_seed`` in the first, then the
    whole previous set (the set doubles) while ``rho <= sigma``, then ``kappa`` per epoch
    (reservoir sampling). Their sum is every label query of the training."""
    sizes, total = [n_seed], n_seed
    for rho in range(1, rounds):
        new = total if sigma is None or rho <= sigma else min(kappa, total)
        sizes.append(new)
        total += new
    return sizes


def _answered(points: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The points the target labelled: a target behind a detector answers REJECT (-1) for
    the ones it flags, which name no class to learn (their queries still count)."""
    keep = labels != REJECT
    return points[keep], labels[keep]


class Substitute(Attack):
    """Train a substitute from the target's labels, then transfer an attack crafted on it.

    Papernot, McDaniel, Goodfellow, Jha, Celik, Swami. "Practical Black-Box Attacks against
    Machine Learning", AsiaCCS 2017. https://arxiv.org/abs/1602.02697

    The paper's Algorithm 1: start from a small set ``S_0`` of inputs (``seed_images``;
    None: the attacked images themselves), and for each substitute epoch ``rho`` ask the
    target (labels only) for the labels of the new points of ``S_rho``, train the
    substitute on all labelled points, and grow ``S_{rho+1} = S_rho U {x + lambda_rho *
    sign(J_F(x)[O(x)])}`` (:func:`jacobian_augmentation`). The periodic step size
    ``lambda_rho = lam * (-1)^floor(rho / tau)`` and reservoir sampling (after ``sigma``
    doubling epochs, only ``kappa`` points of the set, drawn uniformly, are augmented per
    epoch) are the paper's section 6 refinements that bound the number of queries at
    ``n * 2^sigma + kappa * (rounds - 1 - sigma)``.

    Queries: the training's label queries are spread over the call's samples (the j-th
    query is charged to sample ``j mod N``), so ``result.queries.sum()`` is every query the
    target answered: ``2 N + label_queries(|S_0|)``. ``extras["substitute_labels"]`` holds
    the substitute's labels at the clean images (for its agreement with the target).
    A target behind a detector answers REJECT for the images it flags: they are queried
    (and counted) but not learned, nor augmented (fewer points, so fewer later queries than
    the bound says).

    Args:
        threat: norm, eps, bounds of the transferred attack.
        substitute: the substitute's architecture: an untrained ``nn.Module`` (copied per
            call, never trained in place) or a zoo name.
        seed_images: ``S_0``, images in the bounds (None: the attacked images).
        rounds: substitute epochs ``rho`` (paper: 6 on MNIST).
        lam: the augmentation step ``lambda`` (paper: 0.1).
        tau: period of the step's sign flip (None: never flip).
        sigma, kappa: reservoir sampling after ``sigma`` doubling epochs, ``kappa`` new
            points per epoch after that (None: always double).
        epochs, batch_size, lr: the substitute's training per substitute epoch (Adam).
        attack: the attack crafted on the trained substitute (a configured attack or a
            registry name; default FGSM, the paper's), with ``attack_options``.
        seed: seeds the substitute's initialisation (for a zoo name), its training and the
            reservoir draws.
    """

    paper = "Papernot et al. 2017, Practical Black-Box Attacks against Machine Learning"
    taxonomy = Taxonomy(knowledge="black box (decisions)", frequency="iterative")
    norms = ("linf", "l2")

    def __init__(self, threat: ThreatModel, substitute: nn.Module | str, *,
                 seed_images: Tensor | None = None, rounds: int = 6, lam: float = 0.1,
                 tau: int | None = None, sigma: int | None = None, kappa: int = 400,
                 epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
                 attack: Attack | str = "fgsm", seed: int | None = 0,
                 **attack_options: object) -> None:
        super().__init__(threat, seed=seed)
        require_at_least(1, rounds=rounds, epochs=epochs, batch_size=batch_size, kappa=kappa)
        if tau is not None:
            require_at_least(1, tau=tau)
        if sigma is not None:
            require_at_least(0, sigma=sigma)
        if not lam > 0:
            raise ValueError(f"lam must be > 0 (got {lam})")
        if not lr > 0:
            raise ValueError(f"lr must be > 0 (got {lr})")
        if isinstance(substitute, str):
            from advkit.models import zoo

            # Initialised from the attack's seed: the same configuration, the same substitute.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed if seed is not None else torch.seed())
                substitute = zoo.create(substitute)
        if not isinstance(substitute, nn.Module):
            raise TypeError(f"substitute must be an nn.Module or a zoo name (got "
                            f"{type(substitute).__name__})")
        if seed_images is not None:
            if not isinstance(seed_images, Tensor) or seed_images.dim() != 4 or not len(
                    seed_images):
                raise ValueError("seed_images must be a non-empty (N, C, H, W) tensor")
            lo, hi = threat.bounds
            if seed_images.min() < lo or seed_images.max() > hi:
                raise ValueError(f"seed_images must lie in the bounds {threat.bounds}")
        self._substitute = substitute
        self._seed_images = None if seed_images is None else seed_images.detach()
        self.rounds, self.lam, self.tau, self.sigma, self.kappa = rounds, lam, tau, sigma, kappa
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self._attack = white_box_attack(attack, threat, attack_options)

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(substitute=type(self._substitute).__name__,
                   seed_images=None if self._seed_images is None else len(self._seed_images),
                   attack=self._attack.name, attack_config=self._attack.config())
        return cfg

    def label_queries(self, n_seed: int) -> int:
        """The label queries the substitute's training spends from ``n_seed`` seed images."""
        return sum(augmentation_sizes(n_seed, self.rounds, self.sigma, self.kappa))

    def step(self, rho: int) -> float:
        """``lambda_rho``: ``lam``, its sign flipped every ``tau`` epochs when ``tau`` is set."""
        return self.lam * (-1) ** (rho // self.tau) if self.tau else self.lam

    def train_substitute(self, oracle_labels: Callable[[Tensor], Tensor], seeds: Tensor,
                         generator: torch.Generator | None = None) -> nn.Module:
        """Algorithm 1: the substitute (a trained copy of the architecture, eval mode),
        from ``seeds`` (``S_0``) and ``oracle_labels`` (images -> the target's labels)."""
        model = copy.deepcopy(self._substitute).to(seeds.device)
        points, labels = _answered(seeds.detach(), oracle_labels(seeds.detach()))
        if not len(points):
            raise ValueError("the target rejected every seed image (a detector in front of "
                             "it answers REJECT): no label to train the substitute on; seed "
                             "with images it accepts (seed_images=...)")
        sizes = augmentation_sizes(len(seeds), self.rounds, self.sigma, self.kappa)
        with torch.random.fork_rng(devices=[]):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            for rho in range(self.rounds):
                self._fit(model, points, labels, generator)
                if rho + 1 == self.rounds:
                    break
                chosen = torch.arange(len(points), device=points.device)
                if sizes[rho + 1] < len(points):
                    chosen = reservoir_sample(len(points), sizes[rho + 1],
                                              generator).to(points.device)
                new = jacobian_augmentation(model.eval(), points[chosen], labels[chosen],
                                            self.step(rho))
                new, new_labels = _answered(new, oracle_labels(new))
                points = torch.cat([points, new])
                labels = torch.cat([labels, new_labels])
        return model.eval()

    def _fit(self, model: nn.Module, points: Tensor, labels: Tensor,
             generator: torch.Generator | None) -> None:
        # A fresh optimiser each substitute epoch, as the paper retrains on the grown set.
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.epochs):
                order = torch.randperm(len(points), generator=generator, device=(
                    generator.device if generator is not None else "cpu")).to(points.device)
                for start in range(0, len(points), self.batch_size):
                    batch = order[start:start + self.batch_size]
                    loss = F.cross_entropy(model(points[batch]), labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        model.eval()

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None,
             ) -> tuple[Tensor, dict[str, Tensor]]:
        n = x.shape[0]
        spent = [0]

        def oracle_labels(images: Tensor) -> Tensor:
            # Round robin over the call's samples: the training's queries are shared by
            # all of them, and their sum is exactly what the target answered.
            rows = (torch.arange(len(images), device=x.device) + spent[0]) % n
            spent[0] += len(images)
            return model.labels(images.to(x.device), rows=rows)

        seeds = x if self._seed_images is None else self._seed_images.to(x.device)
        if seeds.shape[1:] != x.shape[1:]:
            raise ValueError(f"seed_images have shape {tuple(seeds.shape[1:])} per image but "
                             f"x has {tuple(x.shape[1:])}")
        substitute = self.train_substitute(oracle_labels, seeds, generator)
        with torch.no_grad():
            substitute_labels = substitute(x).argmax(1)
        crafted = Transfer(self.threat, substitute, self._attack).craft(x, y, targets)
        return crafted.x_adv, {"substitute_labels": substitute_labels,
                               "surrogate_queries": crafted.queries,
                               "surrogate_success": crafted.success}
