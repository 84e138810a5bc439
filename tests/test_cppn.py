"""Fooling images (Nguyen, Yosinski & Clune 2015): CPPN and direct encodings, MAP-Elites."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from toys import Saturated, affine, toy_cnn

from advkit.attacks.cppn import CPPNFooling, Genome, mutate, polynomial_mutation, random_genome
from advkit.models import labels_only, scores_only
from advkit.models.access import AccessError

SHAPE = (1, 8, 8)


def grown_genome(seed: int = 0, steps: int = 30) -> Genome:
    """A genome mutated often enough to have hidden nodes and extra connections."""
    rng = random.Random(seed)
    genome = random_genome(1, rng)
    for _ in range(steps):
        genome = mutate(genome, rng)
    return genome


class Counting(nn.Module):
    """Counts every image it scores, whoever asks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.model(x)


def test_a_genome_renders_deterministically():
    genome = grown_genome()
    assert genome.hidden > 0
    first = genome.render(28, 28)
    for _ in range(3):
        assert torch.equal(genome.render(28, 28), first)
    # The same genome rebuilt from its fields (as after saving it) renders the same.
    copy = Genome(**{f: getattr(genome, f) for f in genome.__dataclass_fields__})
    assert torch.equal(copy.render(28, 28), first)
    assert first.shape == (1, 28, 28) and first.dtype == torch.float32


def test_mutation_changes_the_genome_and_keeps_the_image_in_the_unit_box():
    rng = random.Random(1)
    genome = random_genome(3, rng)
    for _ in range(50):
        child = mutate(genome, rng)
        assert child != genome
        image = child.render(16, 12)
        assert image.shape == (3, 16, 12)
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
        # Connections always run from a lower to a higher rank: the network stays acyclic.
        assert all(child.ranks[a] < child.ranks[b] for a, b in child.connections)
        genome = child


def test_polynomial_mutation_stays_in_the_box_and_respects_the_rate():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 28, 28, generator=g)
    y = polynomial_mutation(x, 0.1, 15.0, g)
    assert y.min() >= 0 and y.max() <= 1
    changed = (y != x).float().mean().item()
    assert 0.05 < changed < 0.15


@pytest.mark.parametrize("encoding", ["cppn", "direct"])
def test_map_elites_never_lowers_an_elites_confidence(encoding):
    result = CPPNFooling(encoding, generations=15, population=20).evolve(
        scores_only(toy_cnn()), SHAPE)
    history = result.history
    assert history.shape == (result.generations, 10)
    assert (history[1:] >= history[:-1]).all()
    assert torch.equal(history[-1], result.confidences)


@pytest.mark.parametrize("encoding", ["cppn", "direct"])
def test_a_few_seconds_of_evolution_fool_a_toy_model_with_high_confidence(encoding):
    model = Saturated(affine(), 5.0).eval()
    result = CPPNFooling(encoding, generations=150, population=50, target=0.99).evolve(
        scores_only(model), SHAPE)
    assert result.seconds < 10
    assert result.success.any()
    hit = result.success.nonzero().flatten()
    # The confidences are the model's own for the returned images.
    with torch.no_grad():
        probs = model(result.images).softmax(1)
    fresh = probs[torch.arange(len(result)), result.classes]
    assert torch.allclose(fresh, result.confidences, atol=1e-5)
    assert (fresh[hit] >= 0.99).all() and (result.reached_at[hit] >= 0).all()
    assert (result.images >= 0).all() and (result.images <= 1).all()
    # A CPPN elite's genome renders back to its image.
    if encoding == "cppn":
        j = int(hit[0])
        assert torch.equal(result.genomes[j].render(8, 8), result.images[j])


def test_it_stops_once_every_class_reaches_the_target():
    model = Saturated(affine(), 5.0).eval()
    result = CPPNFooling("direct", generations=500, population=50, target=0.9).evolve(
        scores_only(model), SHAPE, classes=[1, 5])
    assert result.success.all() and result.generations < 500
    assert result.generations == int(result.reached_at.max()) + 1
    assert result.classes.tolist() == [1, 5]


@pytest.mark.parametrize("encoding", ["cppn", "direct"])
def test_same_seed_same_images(encoding):
    run = CPPNFooling(encoding, generations=8, population=10, seed=3)
    a, b = (run.evolve(scores_only(toy_cnn()), SHAPE) for _ in range(2))
    assert torch.equal(a.images, b.images) and torch.equal(a.confidences, b.confidences)
    c = CPPNFooling(encoding, generations=8, population=10, seed=4).evolve(
        scores_only(toy_cnn()), SHAPE)
    assert not torch.equal(a.images, c.images)


def test_queries_counted_equal_the_images_scored():
    model = Counting(toy_cnn()).eval()
    access = scores_only(model)
    result = CPPNFooling(generations=7, population=13, batch_size=5).evolve(access, SHAPE)
    assert result.generations == 7
    assert model.images == result.queries == result.forward_passes == 7 * 13
    assert access.queries == 7 * 13


def test_a_query_budget_stops_evolution_before_it_is_exceeded():
    model = Counting(toy_cnn()).eval()
    result = CPPNFooling(generations=100, population=10).evolve(
        scores_only(model, budget=35), SHAPE)
    assert result.generations == 3 and model.images == 30 == result.queries
    with pytest.raises(ValueError, match="smaller than one generation"):
        CPPNFooling(population=10).evolve(scores_only(toy_cnn(), budget=5), SHAPE)


def test_bad_input_is_refused():
    model = scores_only(toy_cnn())
    with pytest.raises(ValueError, match="unknown encoding"):
        CPPNFooling("pixels")
    with pytest.raises(ValueError, match="target must be a confidence"):
        CPPNFooling(target=1.5)
    with pytest.raises(ValueError, match="generations must be an integer"):
        CPPNFooling(generations=0)
    with pytest.raises(ValueError, match="population must be an integer"):
        CPPNFooling(population=2.5)
    with pytest.raises(ValueError, match="rate"):
        CPPNFooling("direct", rate=0)
    with pytest.raises(ValueError, match="shape must be"):
        CPPNFooling().evolve(model, (8, 8))
    with pytest.raises(ValueError, match="classes must lie in 0..9"):
        CPPNFooling(generations=1, population=2).evolve(model, SHAPE, classes=[3, 10])
    with pytest.raises(ValueError, match="classes must not repeat"):
        CPPNFooling().evolve(model, SHAPE, classes=[3, 3])
    with pytest.raises(ValueError, match="non-empty list of class indices"):
        CPPNFooling().evolve(model, SHAPE, classes=[])
    with pytest.raises(ValueError, match="without top_k"):
        CPPNFooling().evolve(scores_only(toy_cnn(), top_k=3), SHAPE)
    with pytest.raises(AccessError, match="scores"):
        CPPNFooling().evolve(labels_only(toy_cnn()), SHAPE)


def test_the_grid_tiles_the_images_in_class_order():
    result = CPPNFooling("direct", generations=2, population=5).evolve(
        scores_only(toy_cnn()), SHAPE, classes=[0, 1, 2])
    grid = result.grid(columns=2, gap=1)
    assert grid.shape == (1, 17, 17)
    assert torch.equal(grid[:, 9:17, 0:8], result.images[2])
    assert (grid[:, 9:, 9:] == 0.5).all()  # the empty cell
    assert result.grid().shape == (1, 8, 26)
    with pytest.raises(ValueError, match="columns must be"):
        result.grid(columns=0)


@pytest.mark.parametrize("encoding", ["cppn", "direct"])
def test_colour_images_evolve_with_one_cppn_output_per_channel(encoding):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()
    result = CPPNFooling(encoding, generations=5, population=8).evolve(
        scores_only(model), (3, 8, 8))
    assert result.images.shape == (5, 3, 8, 8) and len(result) == 5
    if encoding == "cppn":
        assert torch.equal(result.genomes[0].render(8, 8), result.images[0])


class NaNModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 10), float("nan"))


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN scores"):
        CPPNFooling(generations=2, population=3).evolve(scores_only(NaNModel().eval()), SHAPE)
