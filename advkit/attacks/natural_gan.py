"""Natural adversarial examples (Zhao, Dua & Singh, "Generating Natural Adversarial
Examples", ICLR 2018, https://arxiv.org/abs/1710.11342): search the latent space of a GAN,
not the pixels, for the nearest code whose image the model labels otherwise.

The generator, critic and inverter are :class:`advkit.models.gan.GANInverter`, trained by
:func:`advkit.training.train_gan`; the search needs only the model's labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from advkit.attacks._decision import check_access_budget, check_count
from advkit.attacks.base import Attack, Taxonomy
from advkit.models.access import REJECT, Oracle
from advkit.models.gan import GANInverter
from advkit.threat import ThreatModel

SEARCHES = ("hybrid", "iterative")

#: The fine phase of the hybrid search stops once its upper radius is below this (the
#: authors' 1e-4): a code this close to I(x) is I(x).
_SMALLEST_RADIUS = 1e-4


@contextmanager
def _evaluating(*modules: nn.Module) -> Iterator[None]:
    """The generator and the inverter in eval mode, their modes restored afterwards."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class NaturalGAN(Attack):
    """The nearest natural adversarial example in a GAN's latent space.

    Zhao, Dua & Singh. "Generating Natural Adversarial Examples", ICLR 2018.
    https://arxiv.org/abs/1710.11342

    Maps each image to its latent code ``z' = I(x)`` with the inverter, then samples codes
    ``z~ = z' + r u`` (``u`` a uniform direction, ``r`` uniform in a range of radii), asks the
    model for the label of each ``G(z~)`` and keeps, per image, the adversarial code closest
    to ``z'``: ``x_adv = G(z~*)``, an image of the data's manifold rather than ``x`` plus
    noise. Needs only the model's top-1 label (``advkit.models.labels_only(model)``);
    ``samples`` queries per image and round, batched over the images, each image stopping
    on its own.

    - ``search="iterative"`` (the paper's Algorithm 1): rounds in growing shells
      ``[0, step)``, ``[step, 2 step)``, ... until a shell holds an adversarial code; the
      closest one found there is returned (or nothing, past ``max_radius``).
    - ``search="hybrid"`` (Algorithm 2, the default): a coarse phase over ``[0,
      max_radius)`` that, on a find at distance ``d``, searches ``[d/2, d)`` next, and on
      no find moves the lower end up to the middle, until the range is narrower than
      ``step`` (or ``patience`` finds in a row bring nothing closer); then a fine phase
      that scans shells of width ``step`` downwards from the best distance, stopping after
      ``patience`` empty draws of one shell. The authors propose it as a faster search
      reaching about the same distances; neither search guarantees the nearest code (both
      sample), only that nothing nearer than the model's boundary is returned.

    Not registered with the attacks that ``advkit attacks`` lists: it needs a trained GAN
    of the model's data, which the registry's ``attack(model, x, y)`` cannot supply.
    Minimal-norm: ``result.norms`` are the pixel distances ``||x_adv - x||`` in the threat
    model's norm (its eps a cap, ``float("inf")`` for none); the latent distances, the
    search's own measure, are in ``result.extras["latent_distance"]`` (``inf`` where none
    was found), the codes in ``extras["latent"]`` (``I(x)`` where none) and ``G(I(x))`` in
    ``extras["reconstruction"]``. Untargeted: a label other than ``y``; targeted: the target.

    Args:
        threat: the norm ``result.norms`` measure pixel distances in, eps a cap, bounds.
        gan: a trained :class:`~advkit.models.gan.GANInverter`, the path of its advkit
            checkpoint, or a pair ``(generator, inverter)`` of modules (``generator``: codes
            (N, d) -> images of the model's input shape in the bounds; ``inverter``: images
            -> codes (N, d)).
        search: ``"hybrid"`` (default) or ``"iterative"``.
        samples: codes drawn per image and round, one query each (default 256; the
            authors draw 5000).
        step: the shell width, the search's resolution in latent distance (default 0.05;
            the authors use 0.01).
        max_radius: the largest latent distance searched (default 10, the authors').
        patience: the hybrid search's unproductive rounds before a phase ends (default
            5, the authors' ``stop``).
        max_queries: the queries per image at most, besides the final success pass
            (default 100000: the radius ends the search first).
        batch_size: the most images per generator or model call (default 512).
        seed: seed of the sampling (same seed, same result).
    """

    paper = "Zhao, Dua & Singh 2018, Generating Natural Adversarial Examples"
    taxonomy = Taxonomy(knowledge="black box (decisions)", perturbation="optimized")
    norms = ("l2", "linf", "l1")
    kind = "minimal"

    def __init__(self, threat: ThreatModel, gan: GANInverter | str | Path
                 | tuple[nn.Module, nn.Module], *, search: str = "hybrid",
                 samples: int = 256, step: float = 0.05, max_radius: float = 10.0,
                 patience: int = 5, max_queries: int = 100_000,
                 batch_size: int | None = 512, seed: int | None = 0) -> None:
        super().__init__(threat, seed=seed)
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)} (got {search!r})")
        check_count("samples", samples)
        check_count("patience", patience)
        check_count("max_queries", max_queries)
        if batch_size is not None:
            check_count("batch_size", batch_size)
        if not step > 0:
            raise ValueError(f"step must be a latent distance > 0 (got {step})")
        if not max_radius >= step:
            raise ValueError(f"max_radius must be at least step={step} (got {max_radius})")
        if max_queries < samples:
            raise ValueError(f"max_queries={max_queries} does not pay for one round of "
                             f"samples={samples} queries: raise it or draw fewer samples")
        self._generator, self._inverter = _networks(gan)
        self.search, self.samples, self.step = search, samples, float(step)
        self.max_radius, self.patience = float(max_radius), patience
        self.max_queries, self.batch_size = max_queries, batch_size

    def _needs_clean_pass(self) -> bool:
        return False  # the search never reads the model at x

    def _run(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
             clean_logits: Tensor | None, generator: torch.Generator | None,
             ) -> tuple[Tensor, dict[str, Tensor]]:
        check_access_budget(self.name, model, self.max_queries)
        with _evaluating(self._generator, self._inverter), torch.no_grad():
            start, reconstruction = self._invert(x)
            return self._search(model, x, y, targets, start, reconstruction, generator)

    def _invert(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``I(x)`` and ``G(I(x))``, with clear errors where the networks do not fit ``x``."""
        expected = getattr(self._generator, "image_shape", None)
        if expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise ValueError(f"the GAN makes images of shape {tuple(expected)} but x has "
                             f"shape {tuple(x.shape[1:])} per image: attack images of the "
                             "data the GAN was trained on")
        try:
            z = self._inverter(x)
        except RuntimeError as err:
            raise ValueError(f"the inverter cannot take images of shape "
                             f"{tuple(x.shape[1:])} ({err}): attack images of the data the "
                             "GAN was trained on") from err
        if z.dim() != 2 or z.shape[0] != x.shape[0]:
            raise ValueError(f"the inverter must return latent codes of shape (N, d) (got "
                             f"{tuple(z.shape)} for N={x.shape[0]})")
        z_dim = getattr(self._generator, "z_dim", None)
        if z_dim is not None and z.shape[1] != z_dim:
            raise ValueError(f"the inverter returns latent codes of dimension {z.shape[1]} "
                             f"but the generator takes {z_dim}: use an inverter trained "
                             "with this generator")
        try:
            images = self._generator(z)
        except RuntimeError as err:
            raise ValueError(f"the generator cannot take the inverter's latent codes of "
                             f"dimension {z.shape[1]} ({err}): use an inverter trained with "
                             "this generator") from err
        if images.shape != x.shape:
            raise ValueError(f"the generator makes images of shape {tuple(images.shape[1:])} "
                             f"but x has shape {tuple(x.shape[1:])} per image")
        return z, self._checked(images)

    def _generate(self, z: Tensor) -> Tensor:
        size = self.batch_size or z.shape[0]
        return self._checked(torch.cat([self._generator(part) for part in z.split(size)]))

    def _checked(self, images: Tensor) -> Tensor:
        """``images`` if inside the bounds: the model must see what the result holds."""
        low, high = (v.item() for v in torch.aminmax(images))
        lo, hi = self.threat.bounds
        if not (lo <= low and high <= hi):
            raise ValueError(f"the generator's images leave the bounds {self.threat.bounds} "
                             f"(min {low:.4g}, max {high:.4g}): end it with a sigmoid (or "
                             "scale it into the bounds)")
        return images

    def _search(self, model: Oracle, x: Tensor, y: Tensor, targets: Tensor | None,
                start: Tensor, reconstruction: Tensor, generator: torch.Generator | None,
                ) -> tuple[Tensor, dict[str, Tensor]]:
        n, d, k = x.shape[0], start.shape[1], self.samples
        device = x.device
        best = torch.full((n,), torch.inf, device=device)
        best_z, x_adv = start.clone(), x.clone()
        hybrid = self.search == "hybrid"
        lo = torch.zeros(n, device=device)
        hi = torch.full((n,), self.max_radius if hybrid else self.step, device=device)
        fine = torch.zeros(n, dtype=torch.bool, device=device)  # hybrid: past the coarse phase
        counter = torch.ones(n, dtype=torch.long, device=device)
        active = torch.ones(n, dtype=torch.bool, device=device)
        # Images whose k candidates go through the generator and the model together.
        per_call = max(1, (self.batch_size or n * k) // k)
        while True:
            active &= model.queries + k <= self.max_queries
            rows = active.nonzero().flatten()
            if rows.numel() == 0:
                break
            found_d = torch.full((rows.numel(),), torch.inf, device=device)
            for part in range(0, rows.numel(), per_call):
                sub = rows[part:part + per_call]
                # A uniform direction (a normalised Gaussian) at a radius uniform in
                # [lo, hi): the authors' sampling of a shell.
                u = torch.randn(sub.numel(), k, d, generator=generator, device=device)
                u = u / u.norm(dim=2, keepdim=True)
                r = lo[sub, None] + (hi - lo)[sub, None] * torch.rand(
                    sub.numel(), k, generator=generator, device=device)
                z = start[sub, None, :] + r[..., None] * u
                images = self._generate(z.flatten(0, 1))
                labels = model.labels(images, rows=sub.repeat_interleave(k),
                                      batch_size=self.batch_size).view(sub.numel(), k)
                hit = (labels == targets[sub, None] if targets is not None
                       else (labels != y[sub, None]) & (labels != REJECT))
                r = torch.where(hit, r, torch.inf)
                closest, j = r.min(dim=1)
                found_d[part:part + sub.numel()] = closest
                better = closest < best[sub]
                win, pick = sub[better], j[better]
                best[win] = closest[better]
                local = better.nonzero().flatten()
                best_z[win] = z[local, pick]
                x_adv[win] = images.view(sub.numel(), k, *x.shape[1:])[local, pick]
            state = (lo[rows], hi[rows], fine[rows], counter[rows])
            if hybrid:
                new_lo, new_hi, new_fine, new_counter, done = self._hybrid(
                    *state, found_d, best[rows])
            else:
                new_lo, new_hi, new_fine, new_counter, done = self._iterative(*state, found_d)
            lo[rows], hi[rows], fine[rows], counter[rows] = new_lo, new_hi, new_fine, new_counter
            active[rows] = ~done
        return x_adv, {"latent_distance": best, "latent": best_z,
                       "reconstruction": reconstruction}

    def _iterative(self, lo: Tensor, hi: Tensor, fine: Tensor, counter: Tensor,
                   found: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Algorithm 1: stop at the first shell with an adversarial code, else draw the next
        (``counter``: the shell's number, from 1; a product, not a sum, of steps)."""
        hit = torch.isfinite(found)
        counter = torch.where(hit, counter, counter + 1)
        new_lo, new_hi = (counter - 1) * self.step, counter * self.step
        # The shells end at max_radius (up to rounding: 0.2 is four shells of 0.05).
        past = new_lo >= self.max_radius - 1e-3 * self.step
        return new_lo, new_hi, fine, counter, hit | past

    def _hybrid(self, lo: Tensor, hi: Tensor, fine: Tensor, counter: Tensor,
                found: Tensor, best: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Algorithm 2, one round: the coarse phase's shrinking, then the fine phase's
        downward scan (``best``: the closest distance so far, after this round)."""
        hit, step = torch.isfinite(found), self.step
        # Coarse phase. A find that improves (any find in [lo, hi) with hi the best so far)
        # searches [d/2, d) next; none moves lo up to the middle.
        improved = hit & (found <= best)
        mid = lo + (hi - lo) / 2
        c_lo = torch.where(improved, found / 2, torch.where(hit, lo, mid))
        c_hi = torch.where(improved, found, torch.where(hit, mid, hi))
        c_counter = torch.where(hit & ~improved, counter + 1, torch.ones_like(counter))
        c_end = torch.where(hit, (c_counter > self.patience) | (c_hi - c_lo < step),
                            hi - lo < step)
        # The fine phase starts just below the best distance (or the coarse range's top).
        start_hi = torch.where(torch.isfinite(best), best, torch.where(hit, c_hi, hi))
        c_lo = torch.where(c_end, (start_hi - step).clamp(min=0), c_lo)
        c_hi = torch.where(c_end, start_hi, c_hi)
        # Fine phase: a find moves one shell down; an empty shell is drawn again, at most
        # ``patience`` times.
        f_lo = torch.where(hit, (lo - step).clamp(min=0), lo)
        f_hi = torch.where(hit, lo, hi)
        f_counter = torch.where(hit, torch.ones_like(counter), counter + 1)
        new_lo = torch.where(fine, f_lo, c_lo)
        new_hi = torch.where(fine, f_hi, c_hi)
        new_counter = torch.where(fine, f_counter, torch.where(c_end, 1, c_counter))
        done = torch.where(fine, (f_counter > self.patience) | (f_hi <= _SMALLEST_RADIUS),
                           c_end & (c_hi <= _SMALLEST_RADIUS))
        return new_lo, new_hi, fine | c_end, new_counter, done


def _networks(gan: GANInverter | str | Path
              | tuple[nn.Module, nn.Module]) -> tuple[nn.Module, nn.Module]:
    """The generator and the inverter of ``gan``, checked."""
    if isinstance(gan, str | Path):
        from advkit.models.checkpoint import load_checkpoint

        gan = load_checkpoint(gan)
    if isinstance(gan, GANInverter):
        if int(gan.steps) == 0:
            raise ValueError("the GAN has never been trained (0 training steps): train it "
                             "with advkit.training.train_gan, or load a trained checkpoint")
        return gan.generator, gan.inverter
    if isinstance(gan, nn.Module):
        raise TypeError(f"gan must be a trained GANInverter, its checkpoint's path or a pair "
                        f"(generator, inverter) (got a {type(gan).__name__})")
    if not (isinstance(gan, tuple | list) and len(gan) == 2
            and all(isinstance(m, nn.Module) for m in gan)):
        raise TypeError("gan must be a trained GANInverter, its checkpoint's path or a pair "
                        f"(generator, inverter) of nn.Modules (got {type(gan).__name__})")
    return gan[0], gan[1]

