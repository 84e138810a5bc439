"""Fooling images (Nguyen, Yosinski & Clune, CVPR 2015): evolve, from nothing, images the
model labels with high confidence, one per class (MAP-Elites), CPPN- or directly encoded."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from advkit.attacks.base import Taxonomy, eval_mode
from advkit.models.access import SCORES, AccessError, ModelAccess, Oracle, as_access

ENCODINGS = ("cppn", "direct")

#: The CPPN's node functions: the paper's (sine, sigmoid, Gaussian, identity) and a few
#: more that give the symmetric and repeating motifs CPPNs are known for.
ACTIVATIONS = {
    "sin": torch.sin,
    "cos": torch.cos,
    "gauss": lambda v: torch.exp(-v * v),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": lambda v: v,
    "abs": torch.abs,
}
_HIDDEN = tuple(ACTIVATIONS)
#: Inputs of every CPPN: x, y, d (distance from the centre), bias.
N_INPUTS = 4
#: Weights are kept in [-W, W]: chains of identity nodes could otherwise grow without bound
#: and saturate every output.
MAX_WEIGHT = 8.0


@dataclass(frozen=True)
class Genome:
    """A CPPN: a feed-forward network of composed functions of (x, y, d, bias).

    Nodes ``0..3`` are the inputs, ``4..4+channels-1`` the outputs (one per colour
    channel, squashed by a sigmoid into [0, 1]), the rest hidden. ``ranks`` order the nodes
    (inputs 0, outputs 1, a hidden node between the two ends of the connection it split):
    a connection always goes from a lower to a higher rank, so the network stays acyclic
    without NEAT's innovation bookkeeping. Immutable: mutation returns a new genome.
    """

    activations: tuple[str, ...]
    ranks: tuple[float, ...]
    connections: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]
    enabled: tuple[bool, ...]
    channels: int

    @property
    def hidden(self) -> int:
        return len(self.activations) - N_INPUTS - self.channels

    def render(self, height: int, width: int) -> Tensor:
        """The image (channels, height, width) in [0, 1]; deterministic (same genome, same
        pixels, bit for bit: a fixed evaluation order, no randomness)."""
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height, dtype=torch.float64),
                                torch.linspace(-1, 1, width, dtype=torch.float64),
                                indexing="ij")
        # d scaled to [0, 1] at the corners, as x and y span [-1, 1].
        d = torch.sqrt(xs * xs + ys * ys) / math.sqrt(2)
        values: dict[int, Tensor] = {0: xs, 1: ys, 2: d, 3: torch.ones_like(xs)}
        incoming: dict[int, list[tuple[int, float]]] = {}
        for (src, dst), w, on in zip(self.connections, self.weights, self.enabled,
                                     strict=True):
            if on:
                incoming.setdefault(dst, []).append((src, w))
        order = sorted(range(N_INPUTS, len(self.activations)),
                       key=lambda i: (self.ranks[i], i))
        for node in order:
            total = torch.zeros_like(xs)
            for src, w in incoming.get(node, ()):
                total = total + w * values[src]
            values[node] = ACTIVATIONS[self.activations[node]](total)
        return torch.stack([values[N_INPUTS + c] for c in range(self.channels)]).float()


def random_genome(channels: int, rng: random.Random) -> Genome:
    """A minimal CPPN (NEAT's start): every input wired to every output, random weights,
    no hidden node."""
    activations = ("input",) * N_INPUTS + ("sigmoid",) * channels
    ranks = (0.0,) * N_INPUTS + (1.0,) * channels
    connections = tuple((i, N_INPUTS + c) for c in range(channels) for i in range(N_INPUTS))
    weights = tuple(rng.gauss(0.0, 2.0) for _ in connections)
    return Genome(activations, ranks, connections, weights, (True,) * len(connections),
                  channels)


def mutate(genome: Genome, rng: random.Random, *, weight_sigma: float = 0.5,
           p_weight: float = 0.5, p_add_node: float = 0.15, p_add_connection: float = 0.25,
           p_activation: float = 0.1) -> Genome:
    """A mutated copy of ``genome``; at least one weight always changes.

    - weights: each enabled connection perturbed with probability ``p_weight`` by
      N(0, ``weight_sigma``), clipped to [-8, 8];
    - add a node (``p_add_node``): split an enabled connection, as NEAT does (the old one
      disabled; in-weight 1, out-weight the old weight), with a random function;
    - add a connection (``p_add_connection``) between two nodes not yet connected, from
      the lower to the higher rank;
    - change a hidden node's function (``p_activation``).
    """
    acts, ranks = list(genome.activations), list(genome.ranks)
    conns, weights, enabled = list(genome.connections), list(genome.weights), list(genome.enabled)
    live = [i for i, on in enumerate(enabled) if on]
    chosen = [i for i in live if rng.random() < p_weight] or [rng.choice(live)]
    for i in chosen:
        weights[i] = max(-MAX_WEIGHT, min(MAX_WEIGHT, weights[i] + rng.gauss(0.0, weight_sigma)))
    if rng.random() < p_add_node:
        i = rng.choice(live)
        src, dst = conns[i]
        enabled[i] = False
        new = len(acts)
        acts.append(rng.choice(_HIDDEN))
        # Between its ends, so every connection still runs from lower to higher rank.
        ranks.append((ranks[src] + ranks[dst]) / 2)
        conns += [(src, new), (new, dst)]
        weights += [1.0, weights[i]]
        enabled += [True, True]
    if rng.random() < p_add_connection:
        existing = set(conns)
        pairs = [(a, b) for a in range(len(acts)) for b in range(N_INPUTS, len(acts))
                 if ranks[a] < ranks[b] and (a, b) not in existing]
        if pairs:
            conns.append(rng.choice(pairs))
            weights.append(rng.gauss(0.0, 1.0))
            enabled.append(True)
    hidden = list(range(N_INPUTS + genome.channels, len(acts)))
    if hidden and rng.random() < p_activation:
        acts[rng.choice(hidden)] = rng.choice(_HIDDEN)
    return Genome(tuple(acts), tuple(ranks), tuple(conns), tuple(weights), tuple(enabled),
                  genome.channels)


def polynomial_mutation(x: Tensor, rate: float, eta: float, generator: torch.Generator) -> Tensor:
    """Deb's polynomial mutation of pixels in [0, 1] (the paper's direct encoding on
    MNIST): each pixel mutated with probability ``rate`` by a step drawn with distribution
    index ``eta`` (larger: smaller steps), then clipped to [0, 1]."""
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
    delta = torch.where(u < 0.5, (2 * u) ** (1 / (eta + 1)) - 1,
                        1 - (2 * (1 - u)) ** (1 / (eta + 1)))
    mask = torch.rand(x.shape, generator=generator, dtype=x.dtype) < rate
    return torch.where(mask, x + delta, x).clamp(0, 1)


@dataclass
class FoolingResult:
    """One fooling image per requested class (the MAP-Elites archive at the end).

    Attributes:
        images: (K, C, H, W) in [0, 1], the elite of each class of ``classes``.
        classes: (K,) the classes.
        confidences: (K,) the model's softmax probability of each class for its image
            (0 where the archive stayed empty, which happens only with a budget of 0).
        predictions: (K,) the model's label for each image.
        reached_at: (K,) the generation at which the class first reached ``target``
            (-1: never); generation 0 is the random initial population.
        seconds_at: (K,) wall seconds from the start to that generation (nan: never).
        generations: the generations run (initial population included).
        queries / forward_passes: images scored by the model, all of them, counted by
            the access contract's oracle (one query per image rendered).
        genomes: each class's elite genome (a :class:`Genome`, or the image itself for
            the direct encoding): ``genome.render(H, W)`` gives the image back.
        history: (generations, K) each class's elite confidence after each generation
            (the archive's progress; never decreasing).
    """

    images: Tensor
    classes: Tensor
    confidences: Tensor
    predictions: Tensor
    reached_at: Tensor
    seconds_at: Tensor
    generations: int
    queries: int
    forward_passes: int
    seconds: float
    target: float
    encoding: str
    genomes: list = field(default_factory=list)
    history: Tensor | None = None
    config: dict = field(default_factory=dict)

    @property
    def success(self) -> Tensor:
        """Per class: its image is labelled that class with confidence >= ``target``."""
        return (self.confidences >= self.target) & (self.predictions == self.classes)

    @property
    def success_rate(self) -> float:
        return self.success.float().mean().item()

    def __len__(self) -> int:
        return self.classes.shape[0]

    def grid(self, columns: int | None = None, gap: int = 1) -> Tensor:
        """The images tiled in class order, ``columns`` per row (None: all in one row),
        ``gap`` pixels of mid-grey between them: (C, H', W') in [0, 1], to save or show."""
        if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int)
                                    or columns < 1):
            raise ValueError(f"columns must be an integer >= 1, or None for one row "
                             f"(got {columns!r})")
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
            raise ValueError(f"gap must be an integer >= 0 (got {gap!r})")
        k, c, h, w = self.images.shape
        columns = min(columns or k, k)
        rows = math.ceil(k / columns)
        out = torch.full((c, rows * (h + gap) - gap, columns * (w + gap) - gap), 0.5)
        for i in range(k):
            r, col = divmod(i, columns)
            out[:, r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = \
                self.images[i]
        return out


class CPPNFooling:
    """Evolve fooling images: unrecognisable images the model labels with high confidence.

    Nguyen, Yosinski, Clune. "Deep Neural Networks are Easily Fooled: High Confidence
    Predictions for Unrecognizable Images", CVPR 2015. https://arxiv.org/abs/1412.1897

    The "false positive" branch of the taxonomy: no input image, no perturbation; the
    model only has to be confident. Needs only scores (``advkit.models.scores_only``).

    Encodings:

    - ``"cppn"``: a compositional pattern-producing network maps each pixel's (x, y, d,
      bias) to its intensity through composed functions (sine, cosine, Gaussian, sigmoid,
      tanh, identity, abs): regular, often symmetric or repeating patterns. Genomes grow as
      in NEAT (weight perturbation, node insertion by splitting a connection, new
      connections). Simplified: no crossover, no speciation, no innovation numbers (the
      MAP-Elites archive keeps diversity instead; node ranks keep the network acyclic).
    - ``"direct"``: the pixels themselves, initialised uniformly at random and mutated by
      polynomial mutation, each pixel with probability ``rate`` (the paper: 0.1, halved
      every 1000 generations) and distribution index ``eta`` (the paper: 15).

    Evolution is MAP-Elites with one cell per class: every image is scored once and
    becomes the elite of every class for which its softmax probability beats that
    class's elite (so an elite's confidence never falls). Each generation, ``population``
    children are mutated from elites drawn uniformly at random from the archive; the first
    generation is random. It stops when every requested class reaches ``target`` or after
    ``generations`` generations (or ``max_seconds``), whichever is first.

    Not an :class:`~advkit.attacks.Attack` and not in the registry: it takes no images,
    has no eps-ball to respect and succeeds per class, not per sample (the registry's
    generic contract, ``attack(model, x, y)`` with norms inside a threat model, does not
    apply). Call :meth:`evolve`.

    Args:
        encoding: ``"cppn"`` (default) or ``"direct"``.
        generations: the most generations (default 1000), the random first one included.
        population: images per generation (default 100), scored in batches.
        target: the confidence every class should reach (default 0.99).
        max_seconds: stop after this wall time (default None: no limit).
        rate, eta: the direct encoding's mutation (defaults 0.1 and 15, the paper's).
        batch_size: the most images per model call (default 512).
        seed: seed of everything random (same seed, same images).
    """

    paper = "Nguyen, Yosinski & Clune 2015, Deep Neural Networks are Easily Fooled"
    taxonomy = Taxonomy(falsification="false positive", knowledge="black box (scores)",
                        specificity="targeted", frequency="iterative", scope="individual",
                        perturbation="constrained")

    def __init__(self, encoding: str = "cppn", *, generations: int = 1000,
                 population: int = 100, target: float = 0.99,
                 max_seconds: float | None = None, rate: float = 0.1, eta: float = 15.0,
                 batch_size: int | None = 512, seed: int = 0) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
        for name, value in (("generations", generations), ("population", population),
                            ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (
                    0 if name == "seed" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'seed' else 1} "
                                 f"(got {value!r})")
        if not (isinstance(target, int | float) and 0 < target <= 1):
            raise ValueError(f"target must be a confidence in (0, 1] (got {target!r})")
        if max_seconds is not None and not (isinstance(max_seconds, int | float)
                                            and max_seconds > 0):
            raise ValueError(f"max_seconds must be > 0, or None for no limit (got "
                             f"{max_seconds!r})")
        if not (isinstance(rate, int | float) and 0 < rate <= 1):
            raise ValueError(f"rate (the probability that a pixel mutates) must be in (0, 1] "
                             f"(got {rate!r})")
        if not (isinstance(eta, int | float) and eta > 0):
            raise ValueError(f"eta (polynomial mutation's distribution index) must be > 0 "
                             f"(got {eta!r})")
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1, or None for one call "
                             f"(got {batch_size!r})")
        self.encoding, self.generations, self.population = encoding, generations, population
        self.target, self.max_seconds = float(target), max_seconds
        self.rate, self.eta, self.batch_size, self.seed = float(rate), float(eta), batch_size, seed

    def __repr__(self) -> str:
        return (f"CPPNFooling(encoding={self.encoding!r}, generations={self.generations}, "
                f"population={self.population}, target={self.target}, seed={self.seed})")

    # -- one generation's children ---------------------------------------------------------
    def _random(self, shape: tuple[int, int, int], rng: random.Random,
                gen: torch.Generator) -> list:
        if self.encoding == "cppn":
            return [random_genome(shape[0], rng) for _ in range(self.population)]
        return list(torch.rand((self.population, *shape), generator=gen))

    def _children(self, elites: list, generation: int, rng: random.Random,
                  gen: torch.Generator) -> list:
        parents = [rng.choice(elites) for _ in range(self.population)]
        if self.encoding == "cppn":
            return [mutate(p, rng) for p in parents]
        # The paper's schedule: the mutation rate halves every 1000 generations.
        rate = self.rate / 2 ** (generation // 1000)
        return list(polynomial_mutation(torch.stack(parents), rate, self.eta, gen))

    def _render(self, genomes: list, shape: tuple[int, int, int]) -> Tensor:
        if self.encoding == "cppn":
            return torch.stack([g.render(shape[1], shape[2]) for g in genomes])
        return torch.stack(genomes)

    # -- the run ---------------------------------------------------------------------------
    def evolve(self, model: nn.Module | ModelAccess, shape: tuple[int, int, int],
               classes: list[int] | Tensor | None = None, *,
               device: torch.device | str = "cpu") -> FoolingResult:
        """Evolve one fooling image per class of ``classes`` (None: every class).

        ``model``: an ``nn.Module`` or an access object (``scores_only(model)``; a
        per-sample ``budget`` there caps the images scored over the whole run, and
        evolution stops before it would be exceeded). ``shape``: the images' (C, H, W).
        """
        if (not isinstance(shape, tuple | list) or len(shape) != 3
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)):
            raise ValueError(f"shape must be the images' (channels, height, width), three "
                             f"integers >= 1 (got {shape!r})")
        shape = tuple(shape)
        self._classes(classes, None)  # the form now; the range once the model has answered
        access = as_access(model)
        oracle = Oracle(access, 1, device=device, who="CPPNFooling")
        if access.level not in (SCORES, "gradients"):
            raise AccessError("CPPNFooling needs the model's scores (advkit.models."
                              f"scores_only(model)); it was given {access.level} access")
        if access.top_k is not None:
            # The softmax over the k shown scores alone would overstate the confidence (with
            # k = 1 every image would be 100% confident): the target needs every score.
            raise ValueError(f"CPPNFooling needs every score to compute confidences; it was "
                             f"given the top {access.top_k} only: use scores_only(model) "
                             "without top_k")
        rng = random.Random(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        start = time.perf_counter()
        wanted: Tensor | None = None
        best_conf: Tensor | None = None
        elites: list = []
        history: list[Tensor] = []
        images: Tensor | None = None
        reached = seconds_at = None
        generation = 0
        with eval_mode(access.module):
            while generation < self.generations:
                budget = access.budget
                if budget is not None and int(oracle.queries[0]) + self.population > budget:
                    break
                genomes = (self._random(shape, rng, gen) if not elites else
                           self._children([e for e in elites if e is not None], generation, rng,
                                          gen))
                x = self._render(genomes, shape).to(device)
                rows = torch.zeros(x.shape[0], dtype=torch.long, device=device)
                probs = oracle.logits(x, rows=rows, batch_size=self.batch_size).float() \
                    .softmax(dim=1).cpu()
                if torch.isnan(probs).any():
                    # A NaN would never beat an elite and would silently leave cells empty.
                    raise ValueError("the model returned NaN scores for an evolved image; "
                                     "check that it accepts images of shape "
                                     f"{shape} in [0, 1]")
                if wanted is None:
                    wanted = self._classes(classes, probs.shape[1])
                    k = wanted.shape[0]
                    best_conf = torch.full((k,), -1.0)
                    elites = [None] * k
                    images = torch.zeros((k, *shape))
                    labels = torch.full((k,), -1, dtype=torch.long)
                    reached = torch.full((k,), -1, dtype=torch.long)
                    seconds_at = torch.full((k,), math.nan, dtype=torch.float64)
                conf, idx = probs[:, wanted].max(dim=0)
                # Strictly better only: an elite is never replaced by an equal or worse one.
                better = conf > best_conf
                for j in better.nonzero().flatten().tolist():
                    elites[j] = genomes[idx[j]]
                    images[j] = x[idx[j]].cpu()
                    labels[j] = probs[idx[j]].argmax()
                best_conf = torch.where(better, conf, best_conf)
                history.append(best_conf.clone())
                hit = (best_conf >= self.target) & (reached < 0)
                reached[hit] = generation
                seconds_at[hit] = time.perf_counter() - start
                generation += 1
                if bool((best_conf >= self.target).all()):
                    break
                if self.max_seconds is not None and time.perf_counter() - start > self.max_seconds:
                    break
        if wanted is None:
            raise ValueError(f"the query budget ({access.budget}) is smaller than one "
                             f"generation ({self.population} images): raise the budget or "
                             "lower population")
        # The elites' probabilities are those of their own scoring: every image is scored
        # exactly once, so no further (uncounted or extra) pass is needed.
        conf_all = best_conf.clamp_min(0)
        return FoolingResult(
            images=images, classes=wanted, confidences=conf_all, predictions=labels,
            reached_at=reached, seconds_at=seconds_at, generations=generation,
            queries=int(oracle.queries.sum()), forward_passes=oracle.forward_passes,
            seconds=time.perf_counter() - start, target=self.target, encoding=self.encoding,
            genomes=elites, history=torch.stack(history),
            config={"encoding": self.encoding, "generations": self.generations,
                    "population": self.population, "target": self.target,
                    "rate": self.rate, "eta": self.eta, "seed": self.seed})

    @staticmethod
    def _classes(classes: list[int] | Tensor | None, n_classes: int | None) -> Tensor | None:
        if classes is None:
            return None if n_classes is None else torch.arange(n_classes)
        try:
            wanted = torch.as_tensor(classes)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"classes must be a non-empty list of class indices, or None "
                             f"for all (got {classes!r})") from None
        if (wanted.ndim != 1 or wanted.numel() == 0 or wanted.is_floating_point()
                or wanted.dtype == torch.bool):
            raise ValueError(f"classes must be a non-empty list of class indices, or None for "
                             f"all (got {classes!r})")
        if n_classes is None:
            return wanted
        if int(wanted.min()) < 0 or int(wanted.max()) >= n_classes:
            raise ValueError(f"classes must lie in 0..{n_classes - 1}, the model's classes "
                             f"(got {wanted.tolist()})")
        if wanted.unique().numel() != wanted.numel():
            raise ValueError(f"classes must not repeat (got {wanted.tolist()})")
        return wanted.long()
